"""Trajectory-state memory and quality of each `input_cache` / `output_cache` format.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/state_memory.py --out out/state-memory [--steps 100 --samples 256]

For W8A4 MoDiff (dynamic per-sample scales): state bytes per image on digits16 and the CIFAR-10
UNet, and FD / PSNR-vs-FP on digits16, every format sampled from the same noise. Writes results.json and table.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import torch

import modiff_quant as mq
from modiff_quant.api import state_bytes
from modiff_quant.evaluate import Harness
from modiff_quant.models import load_model

FORMATS = (
    ("full", "full"),
    ("float16", "float16"),
    ("bfloat16", "bfloat16"),
    ("int16", "full"),
    ("full", "float16"),
    ("int8", "full"),
    ("int8", "float16"),
    ("full", "int8"),
    ("int8", "int8"),
)
RECIPE = "w8a4-modiff"


def with_state(input_cache: str, output_cache: str) -> mq.Recipe:
    recipe = mq.load_recipe(RECIPE)
    return dataclasses.replace(
        recipe, defaults=recipe.defaults.updated({"input_cache": input_cache, "output_cache": output_cache})
    )


@torch.no_grad()
def cifar10_bytes_per_image(recipe: mq.Recipe) -> int:
    """The state after three calls of the CIFAR-10 UNet, when every layer holds â and ô."""
    quantized = mq.convert(mq.prepare(load_model("cifar10-ddpm"), recipe))
    x = torch.randn(2, 3, 32, 32)
    with mq.sampling(quantized):
        for t in (900, 800, 700):
            quantized(x, torch.tensor(t))
        return state_bytes(quantized) // 2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("out/state-memory"))
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--samples", type=int, default=256)
    args = parser.parse_args()
    harness = Harness("digits16", steps=args.steps, samples=args.samples)
    rows = []
    for input_cache, output_cache in FORMATS:
        recipe = with_state(input_cache, output_cache)
        metrics, _ = harness.evaluate(recipe)
        rows.append(
            {
                "input_cache": input_cache,
                "output_cache": output_cache,
                "cifar10_bytes_per_image": cifar10_bytes_per_image(recipe),
                **metrics,
            }
        )
    full = rows[0]
    lines = [
        f"W8A4 MoDiff, digits16 DDIM {args.steps} steps, {args.samples} samples "
        f"(FD with float32 state {full['fd']:.2f}).",
        "",
        "| â | ô | digits16 MB / image | CIFAR-10 MB / image | share of float32 | FD | FD change | FD to FP "
        "| PSNR vs FP (dB) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        share = r["cifar10_bytes_per_image"] / full["cifar10_bytes_per_image"]
        lines.append(
            f"| {r['input_cache']} | {r['output_cache']} | {r['cache_bytes_per_image'] / 1e6:.2f} "
            f"| {r['cifar10_bytes_per_image'] / 1e6:.1f} | {share:.1%} | {r['fd']:.2f} "
            f"| {r['fd'] / full['fd'] - 1:+.1%} | {r['fd_to_fp']:.2f} | {r['psnr_vs_fp']:.1f} |"
        )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(
        json.dumps({"recipe": RECIPE, "steps": args.steps, "samples": args.samples, "rows": rows}, indent=1),
        encoding="utf-8",
    )
    (args.out / "table.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
