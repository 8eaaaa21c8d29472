"""Weight quantization choices measured on more than one model: the weights-only ε error of each
weight grid (min-max or MSE clipping, symmetric or asymmetric) and rounding (nearest or AdaRound)
at W8 and W4, activations float, teacher-forced along full-precision DDIM trajectories.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/weight_defaults.py --out out/weight-defaults \
        --models digits16 cifar10-ddpm path/to/digits16-deep

A model is a name `load_model` knows or a diffusers folder (`python -m
modiff_quant.training.digits16 --architecture digits16-deep --out DIR` trains the second digits
model). The `cifar10-ddpm` UNet has seeded random weights, so its trajectories are random inputs.
Each cell is the mean over steps of ||ε_q − ε|| / ||ε|| (the harness's `eps_rel_error`, with
the quantized model fed the full-precision inputs). At W4 the first and last layer keep W8, as in
the shipped W4 recipes. AdaRound calibrates on the same trajectories it is measured on (weights
only, so there is no activation scale to overfit). Writes results.json and table.md.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

import modiff_quant as mq
from modiff_quant.models import load_model, training_schedule
from modiff_quant.search import float_trajectory

MSE = "weight_observer: mse, weight_observer_options: {min_ratio: 0.5, grid: 100}"
CONFIGS = {
    "min-max, symmetric": ("dynamic", True, False),
    "min-max, symmetric, conv_out per input channel": ("dynamic", True, True),
    "min-max, asymmetric": ("dynamic", False, False),
    "min-max, asymmetric, conv_out per input channel": ("dynamic", False, True),
    "MSE, symmetric": (f"{{name: dynamic, {MSE}}}", True, False),
    "MSE, asymmetric": (f"{{name: dynamic, {MSE}}}", False, False),
    "AdaRound on min-max, symmetric": ("{name: adaround, iters: ITERS}", True, False),
    "AdaRound on min-max, asymmetric": ("{name: adaround, iters: ITERS}", False, False),
    "AdaRound on MSE, symmetric": (f"{{name: adaround, iters: ITERS, {MSE}}}", True, False),
}
"""Row name -> (base_quantizer, w_symmetric, conv_out at group:9, a scale per input channel of
its 3×3 kernel); ITERS is --adaround-iters."""


def rules(bits: int, conv_out_groups: bool) -> str:
    """At W4 the first and last layer keep W8, as in the shipped W4 recipes."""
    lines = ["  - match: [conv_in, conv_out]\n    w_bits: 8\n"] if bits < 8 else []
    lines += ["  - match: conv_out\n    w_granularity: group:9\n"] if conv_out_groups else []
    return "rules:\n" + "".join(lines) if lines else ""


Trajectory = list[tuple[Tensor, Tensor, Tensor]]


def recipe(folder: Path, config: str, bits: int, iters: int) -> Path:
    """The recipe file of one cell: W`bits` weights as `config` says, float activations."""
    base, symmetric, conv_out_groups = CONFIGS[config]
    path = folder / f"w{bits}-{''.join(c if c.isalnum() else '-' for c in config.lower())}.yaml"
    path.write_text(
        f"version: 1\nextends: w8a8-modiff\ndefaults:\n  scheme: plain\n  a_bits: 32\n  w_bits: {bits}\n"
        f"  w_symmetric: {str(symmetric).lower()}\n  base_quantizer: {base.replace('ITERS', str(iters))}\n"
        + rules(bits, conv_out_groups),
        encoding="utf-8",
    )
    return path


@torch.no_grad()
def eps_error(model: nn.Module, settings: Path, trajectory: Trajectory) -> float:
    """Mean relative ε error of the quantized model on the full-precision trajectory."""
    quantized = mq.prepare(copy.deepcopy(model), settings)
    with mq.calibrate(quantized):  # a no-op for `dynamic`; AdaRound's calibration data otherwise
        for x, t, _ in trajectory:
            quantized(x, t)
    mq.convert(quantized)
    with mq.sampling(quantized):
        errors = [float((quantized(x, t).sample - eps).norm() / eps.norm()) for x, t, eps in trajectory]
    return sum(errors) / len(errors)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--models", nargs="+", default=["digits16", "cifar10-ddpm"])
    parser.add_argument("--bits", nargs="+", type=int, default=[8, 4])
    parser.add_argument("--steps", type=int, default=20, help="DDIM steps of each trajectory")
    parser.add_argument("--samples", type=int, default=8, help="trajectories (one batch)")
    parser.add_argument("--adaround-iters", type=int, default=300)
    parser.add_argument("--configs", nargs="+", choices=list(CONFIGS), default=list(CONFIGS))
    args = parser.parse_args()
    (args.out / "recipes").mkdir(parents=True, exist_ok=True)
    results_path = args.out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    for name in args.models:
        model = load_model(name)
        trajectory = float_trajectory(model, "ddim", training_schedule(name), args.steps, args.samples, seed=0)
        label = Path(name).name
        for config in tqdm(args.configs, desc=label):
            for bits in args.bits:
                start = time.perf_counter()
                error = eps_error(model, recipe(args.out / "recipes", config, bits, args.adaround_iters), trajectory)
                results.setdefault(label, {}).setdefault(config, {})[f"W{bits}"] = {
                    "eps_rel_error": error,
                    "seconds": round(time.perf_counter() - start, 1),
                }
                results_path.write_text(json.dumps(results, indent=1), encoding="utf-8")
    (args.out / "table.md").write_text(table(results), encoding="utf-8")
    print(table(results))


def table(results: dict[str, dict[str, dict[str, dict[str, float]]]]) -> str:
    """Rows: configurations; columns: model × bits; cells: ε error, the best of each column bold."""
    columns = [
        (model, bits)
        for model, rows in results.items()
        for bits in sorted({b for r in rows.values() for b in r}, key=lambda b: -int(b[1:]))
    ]
    best = {
        column: min(rows[column[1]]["eps_rel_error"] for rows in results[column[0]].values() if column[1] in rows)
        for column in columns
    }
    lines = [
        "| weights | " + " | ".join(f"{model} {bits}" for model, bits in columns) + " |",
        "|---" * (len(columns) + 1) + "|",
    ]
    for config in CONFIGS:
        cells = []
        for model, bits in columns:
            value = results[model].get(config, {}).get(bits, {}).get("eps_rel_error")
            cells.append(
                "" if value is None else f"**{value:.4f}**" if value == best[(model, bits)] else f"{value:.4f}"
            )
        if any(cells):
            lines.append(f"| {config} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
