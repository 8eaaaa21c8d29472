"""Samples per second and calibration time of `eval` in one process and under torchrun, side by
side, and how far the quality keys of their JSON are apart.

Each setting runs `python -m modiff_quant eval` (under `torchrun --standalone` for N > 1) as a
fresh subprocess; `wall_seconds` and `wall_seconds_fp` are the harness's own sampling times (rank
0's, under torchrun), so start-up, model loading and FD are not in the rate; `quantize_seconds`
is the time to calibrate and convert (rank 0's). torchrun gives each process one thread; the
one-process rows are run with one thread (the same arithmetic as each torchrun process) and with
as many threads as the machine has cores (the fair single-process peer).

    OMP_WAIT_POLICY=PASSIVE python benchmarks/distributed_scaling.py --out out/distributed
    OMP_WAIT_POLICY=PASSIVE python benchmarks/distributed_scaling.py --out out/distributed-calibration \
        --recipes w8a4-modiff-ptq4dm w8a4-modiff-qdiffusion --samples 256
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

QUALITY_KEYS = ("fd", "fd_fp", "fd_to_fp", "psnr_vs_fp", "eps_rel_error", "gbops_per_step", "cache_bytes_per_image")


def run_eval(args: argparse.Namespace, recipe: str, processes: int, threads: int, out: Path) -> dict[str, Any]:
    """One `eval` run; its JSON with the run's whole wall time (start-up included) added."""
    launcher = ["-m"] if processes == 1 else ["-m", "torch.distributed.run", "--standalone"]
    if processes > 1:
        launcher += ["--nproc-per-node", str(processes), "-m"]
    command = [sys.executable, *launcher, "modiff_quant", "eval", "--model", args.model, "--recipe", recipe]
    command += ["--steps", str(args.steps), "--samples", str(args.samples), "--batch-size", str(args.batch_size)]
    environment = {**os.environ, "OMP_NUM_THREADS": str(threads), "OMP_WAIT_POLICY": "PASSIVE"}
    start = time.perf_counter()
    subprocess.run([*command, "--json", str(out)], env=environment, check=True, capture_output=True, text=True)
    return {**json.loads(out.read_text(encoding="utf-8")), "process_seconds": time.perf_counter() - start}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("out/distributed"))
    parser.add_argument("--model", default="digits16")
    parser.add_argument("--recipes", nargs="+", default=["w8a4-modiff"])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--samples", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--processes", type=int, nargs="+", default=[2])
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    cores = os.cpu_count() or 1
    settings = [
        (recipe, processes, threads)
        for recipe in args.recipes
        for processes, threads in [(1, cores), (1, 1), *((n, 1) for n in args.processes)]
    ]
    rows = []
    for recipe, processes, threads in tqdm(settings, desc="eval runs"):
        result = run_eval(args, recipe, processes, threads, args.out / f"{recipe}-n{processes}-t{threads}.json")
        rows.append(
            {
                "recipe": recipe,
                "processes": processes,
                "threads_per_process": threads,
                "samples_per_second": args.samples / result["wall_seconds"],
                "samples_per_second_fp": args.samples / result["wall_seconds_fp"],
                "quantize_seconds": result["quantize_seconds"],
                "process_seconds": result["process_seconds"],
                "quality": {key: result[key] for key in QUALITY_KEYS},
            }
        )
    for recipe in args.recipes:
        mine = [row for row in rows if row["recipe"] == recipe]
        peer, one_thread = mine[0], mine[1]["quality"]
        for row in mine:
            row["speed_vs_one_process"] = row["samples_per_second"] / peer["samples_per_second"]
            row["quantize_speed_vs_one_process"] = peer["quantize_seconds"] / row["quantize_seconds"]
            row["quality_equals_one_process_one_thread"] = row["quality"] == one_thread
            row["quality_difference_to_one_process_one_thread"] = {
                key: abs(row["quality"][key] - one_thread[key]) for key in QUALITY_KEYS if one_thread[key] is not None
            }
    report = {"settings": {k: v for k, v in vars(args).items() if k != "out"}, "cores": cores, "runs": rows}
    (args.out / "scaling.json").write_text(json.dumps(report, indent=1, default=str), encoding="utf-8")
    for row in rows:
        print(
            f"{row['recipe']}, {row['processes']} process(es) x {row['threads_per_process']} thread(s): "
            f"{row['samples_per_second']:.2f} samples/s quantized (x{row['speed_vs_one_process']:.2f}), "
            f"{row['samples_per_second_fp']:.2f} full precision, quantized in {row['quantize_seconds']:.1f} s "
            f"(x{row['quantize_speed_vs_one_process']:.2f}); quality keys equal one process: "
            f"{row['quality_equals_one_process_one_thread']}"
        )


if __name__ == "__main__":
    main()
