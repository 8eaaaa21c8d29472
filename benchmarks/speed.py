"""Sampling speed and memory of every execution mode, side by side, as ratios to float32.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/speed.py --out out/speed [--repeats 3]

Each (model, batch, mode) runs in a fresh process (so peak memory is its own): one untimed
warm-up trajectory, then `--repeats` timed trajectories of `--steps` DDIM steps whose median is
reported, with the PSNR of its samples against float32's from the same noise. Modes are timed
in the same run, one after the other; ratios are time / float32 time (lower is faster). Also
times one calibration (PTQ4DM W8A4 MoDiff on digits16). Writes results.json and table.md.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch


@dataclass(frozen=True)
class Mode:
    """One way to sample: the float model (recipe None), torchao's W8A8 peer, or a recipe; run in
    eager PyTorch or through `torch.compile` (`compile_mode` None: eager)."""

    recipe: str | None = None
    execution: str = "fake"  # fake or integer (recipes); float32, bfloat16 or torchao-int8 (no recipe)
    compile_mode: str | None = None


COMPILED = "default"
MODES: dict[str, Mode] = {
    "fp32": Mode(execution="float32"),
    "fp32-compiled": Mode(execution="float32", compile_mode=COMPILED),
    "bf16-autocast": Mode(execution="bfloat16"),
    "bf16-autocast-compiled": Mode(execution="bfloat16", compile_mode=COMPILED),
    "torchao-w8a8-compiled": Mode(execution="torchao-int8", compile_mode=COMPILED),
    "plain-fake": Mode("w8a4-plain"),
    "plain-fake-compiled": Mode("w8a4-plain", compile_mode=COMPILED),
    "modiff-fake": Mode("w8a4-modiff"),
    "modiff-fake-compiled": Mode("w8a4-modiff", compile_mode=COMPILED),
    "modiff-fake-max-autotune": Mode("w8a4-modiff", compile_mode="max-autotune-no-cudagraphs"),
    "modiff-integer": Mode("w8a4-modiff", "integer"),
    "modiff-integer-compiled": Mode("w8a4-modiff", "integer", COMPILED),
    "modiff-lean-state": Mode("w8a4-modiff-lean"),
    "deepcache": Mode("deepcache", "float32"),
    "adaptive-cache": Mode("adaptive-cache", "float32"),
    "modiff-deepcache": Mode("w8a8-modiff-deepcache"),
    "modiff-deepcache-compiled": Mode("w8a8-modiff-deepcache", compile_mode=COMPILED),
}
DEFAULT_MODES = [name for name in MODES if name != "modiff-fake-max-autotune"]  # autotuning takes many minutes
SETTINGS = (("digits16", 1, 100), ("digits16", 16, 100), ("cifar10-ddpm", 1, 10), ("cifar10-ddpm", 16, 10))
"""(model, batch, steps): digits16 samples whole 100-step trajectories; the CIFAR-10 UNet is
timed on 10 steps (its cost per step does not depend on the step count)."""


def build(model: torch.nn.Module, mode: Mode) -> tuple[torch.nn.Module, torch.nn.Module | None]:
    """The module to call for `mode` and the prepared model behind it (None when not MoDiff's)."""
    import modiff_quant as mq

    if mode.recipe is None:
        net = copy.deepcopy(model)
        if mode.execution == "torchao-int8":
            from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

            quantize_(net, Int8DynamicActivationInt8WeightConfig())
        prepared = None
    else:
        net = prepared = mq.convert(mq.prepare(copy.deepcopy(model), mode.recipe))
        if mode.execution == "integer":
            mq.set_execution(prepared, "integer")
    if mode.compile_mode is not None:
        net = torch.compile(net, mode=mode.compile_mode)
    return net, prepared


def trajectory(
    net: torch.nn.Module,
    noise: torch.Tensor,
    model_name: str,
    steps: int,
    *,
    prepared: torch.nn.Module | None = None,
    autocast: bool = False,
) -> torch.Tensor:
    """One DDIM trajectory of `net` from `noise`: in the sampling scope of the prepared model behind
    it (if any), under bf16 autocast when asked."""
    import modiff_quant as mq
    from modiff_quant.models import training_schedule
    from modiff_quant.samplers import make_scheduler, sample

    with (
        mq.sampling(prepared) if prepared is not None else nullcontext(),
        torch.autocast(noise.device.type, dtype=torch.bfloat16) if autocast else nullcontext(),
    ):
        images = sample(net, noise, make_scheduler("ddim", training_schedule(model_name)), steps, progress=False)
        return images.float().cpu()  # on the host: a finished trajectory on any device


def run_mode(model_name: str, batch: int, steps: int, mode_name: str, repeats: int, device: str) -> dict[str, Any]:
    """Time one mode in this process on `device`; returns seconds per trajectory, PSNR vs float32, memory."""
    import modiff_quant as mq
    from modiff_quant.api import state_bytes
    from modiff_quant.metrics import psnr_vs
    from modiff_quant.models import load_model, sample_shape, training_schedule
    from modiff_quant.samplers import make_scheduler, sample

    torch.manual_seed(0)
    mode = MODES[mode_name]
    if mode.execution == "integer":
        from modiff_quant.integer_kernels import unavailable_reason

        if unavailable_reason() is not None:
            return {"skipped": unavailable_reason()}
        if device != "cpu":
            return {"skipped": "integer execution runs oneDNN's CPU kernels"}
    model = load_model(model_name).to(device)
    noise = torch.randn(batch, *sample_shape(model), generator=torch.Generator().manual_seed(0)).to(device)
    net, prepared = build(model, mode)
    options = {"prepared": prepared, "autocast": mode.execution == "bfloat16"}
    reference = trajectory(model, noise, model_name, steps)
    start = time.perf_counter()
    trajectory(net, noise, model_name, steps, **options)  # warm-up: compilation, allocations, packing caches
    warm_up = time.perf_counter() - start
    seconds, images = [], reference
    for _ in range(repeats):
        start = time.perf_counter()
        images = trajectory(net, noise, model_name, steps, **options)
        seconds.append(time.perf_counter() - start)
    cache = 0
    if prepared is not None:
        with mq.sampling(prepared):
            sample(net, noise, make_scheduler("ddim", training_schedule(model_name)), 2, progress=False)
            cache = state_bytes(prepared) // batch
    return {
        "seconds": statistics.median(seconds),
        "seconds_all": seconds,
        "warm_up_seconds": warm_up,
        "psnr_vs_fp32": None if mode_name == "fp32" else psnr_vs(reference, images),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "peak_device_mb": torch.cuda.max_memory_allocated() / 2**20 if noise.is_cuda else None,
        "state_bytes_per_image": cache,
    }


def time_calibration() -> dict[str, Any]:
    from modiff_quant.evaluate import Harness

    harness = Harness("digits16", steps=100, samples=16)
    start = time.perf_counter()
    harness.quantize("w8a4-modiff-ptq4dm")
    return {
        "recipe": "w8a4-modiff-ptq4dm",
        "model": "digits16",
        "calibration_samples": 32,
        "steps": 100,
        "seconds": time.perf_counter() - start,
    }


def _child(job: tuple[str, int, int, str], repeats: int, limit: float, device: str) -> dict[str, Any]:
    """One mode in a fresh process; a mode still running after `limit` seconds is reported as such."""
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
    command = [sys.executable, __file__, "--child", *map(str, job), "--repeats", str(repeats), "--device", device]
    try:
        done = subprocess.run(command, capture_output=True, text=True, env=env, check=False, timeout=limit)
    except subprocess.TimeoutExpired:
        return {"skipped": f"still running after {limit:.0f} s (warm-up and {repeats} trajectories)"}
    if done.returncode:
        raise RuntimeError(f"benchmark {job} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def table(rows: list[dict[str, Any]], calibration: dict[str, Any] | None) -> str:
    lines = [
        "| model | batch | steps | mode | s / trajectory | × fp32 | × fp32 compiled | PSNR vs fp32 (dB) "
        "| peak RSS (MB) | state (MB / image) | warm-up (s) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "skipped" in r:
            lines.append(f"| {r['model']} | {r['batch']} | {r['steps']} | {r['mode']} | not run: {r['skipped']} |")
            continue
        psnr = "-" if r["psnr_vs_fp32"] is None else f"{r['psnr_vs_fp32']:.1f}"
        lines.append(
            f"| {r['model']} | {r['batch']} | {r['steps']} | {r['mode']} | {r['seconds']:.2f} "
            f"| {r['ratio_to_fp32']:.2f} | {_ratio(r['ratio_to_fp32_compiled'])} | {psnr} | {r['peak_rss_mb']:.0f} "
            f"| {r['state_bytes_per_image'] / 1e6:.2f} | {r['warm_up_seconds']:.1f} |"
        )
    if calibration is None:
        return "\n".join(lines) + "\n"
    lines.append("")
    lines.append(
        f"Calibration: {calibration['recipe']} on {calibration['model']} "
        f"({calibration['calibration_samples']} samples × {calibration['steps']} steps): "
        f"{calibration['seconds']:.1f} s."
    )
    return "\n".join(lines) + "\n"


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("out/speed"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--modes", nargs="+", default=DEFAULT_MODES, choices=list(MODES))
    parser.add_argument("--models", nargs="+", default=["digits16", "cifar10-ddpm"])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 16])
    parser.add_argument("--no-calibration", action="store_true", help="skip timing a calibration")
    parser.add_argument("--limit", type=float, default=1800.0, help="seconds a mode may take in all")
    parser.add_argument("--device", default="cpu", help="torch device to sample on (default cpu)")
    parser.add_argument("--child", nargs=4, metavar=("MODEL", "BATCH", "STEPS", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        model, batch, steps, mode = args.child
        print(json.dumps(run_mode(model, int(batch), int(steps), mode, args.repeats, args.device)))
        return
    from modiff_quant.evaluate import checked_device

    checked_device(args.device)  # refused before any work
    from tqdm.auto import tqdm

    modes = ["fp32", *(mode for mode in args.modes if mode != "fp32")]  # every ratio is to fp32
    jobs = [(m, b, s, mode) for m, b, s in SETTINGS if m in args.models and b in args.batches for mode in modes]
    rows = []
    args.out.mkdir(parents=True, exist_ok=True)
    with (args.out / "rows.jsonl").open("w", encoding="utf-8") as progress:  # what is done, should a run stop
        for job in tqdm(jobs, desc="benchmarks"):
            rows.append(
                {
                    **dict(zip(("model", "batch", "steps", "mode"), job)),
                    **_child(job, args.repeats, args.limit, args.device),
                }
            )
            progress.write(json.dumps(rows[-1]) + "\n")
            progress.flush()
    timed = [r for r in rows if "skipped" not in r]
    for row in timed:
        for peer in ("fp32", "fp32-compiled"):
            found = [r for r in timed if (r["model"], r["batch"], r["mode"]) == (row["model"], row["batch"], peer)]
            row[f"ratio_to_{peer.replace('-', '_')}"] = row["seconds"] / found[0]["seconds"] if found else None
    calibration = None if args.no_calibration else time_calibration()
    (args.out / "results.json").write_text(
        json.dumps(
            {
                "threads": torch.get_num_threads(),
                "device": args.device,
                "repeats": args.repeats,
                "rows": rows,
                "calibration": calibration,
            },
            indent=1,
        ),
        encoding="utf-8",
    )
    (args.out / "table.md").write_text(table(rows, calibration), encoding="utf-8")
    print(table(rows, calibration))


if __name__ == "__main__":
    main()
