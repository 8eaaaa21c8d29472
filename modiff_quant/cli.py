"""`modiff-quant` command line: explain a recipe on a model, run the demo."""

from __future__ import annotations

import argparse
import sys

import torch

from .models import load_model
from .recipe import RecipeError, load_recipe
from .registry import UnknownNameError
from .samplers import SAMPLERS


def _explain(args: argparse.Namespace) -> None:
    print(load_recipe(args.recipe).explain(load_model(args.model)))


def _demo(args: argparse.Namespace) -> None:
    from .demo import format_rows, run_demo

    print(
        f"model {args.model}: relative error of the ε prediction vs full precision along a fixed forward-diffusion path "
        f"({args.sampler} timesteps, {args.steps} steps, {args.samples} samples, seed {args.seed})"
    )
    rows = run_demo(args.model, args.recipes, steps=args.steps, samples=args.samples, seed=args.seed, sampler=args.sampler)
    print(format_rows(rows))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="modiff-quant", description="MoDiff quantization for diffusion models")
    commands = parser.add_subparsers(dest="command", required=True)

    explain = commands.add_parser("explain", help="per-layer table of what a recipe does to a model")
    explain.add_argument("--model", required=True, help="cifar10-ddpm or a diffusers model folder")
    explain.add_argument("--recipe", required=True, help="shipped recipe name or YAML file")
    explain.set_defaults(run=_explain)

    demo = commands.add_parser("demo", help="plain vs MoDiff: ε-prediction error vs full precision along a diffusion path")
    demo.add_argument("--model", default="cifar10-ddpm")
    demo.add_argument("--recipes", nargs="+", default=["w8a4-plain", "w8a4-modiff"])
    demo.add_argument("--sampler", default="ddim", choices=SAMPLERS)
    demo.add_argument("--steps", type=int, default=50)
    demo.add_argument("--samples", type=int, default=4)
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(run=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        with torch.no_grad():
            args.run(args)
    except (RecipeError, FileNotFoundError, UnknownNameError, ValueError) as exc:
        print(f"modiff-quant: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
