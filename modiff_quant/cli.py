"""`modiff-quant` command line: explain, bops, eval, demo, gate, plot."""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

from .bops import BopsConventions, count_bops, count_macs
from .evaluate import CALIBRATION_SAMPLES, Harness
from .gate import format_checks, run_gate
from .models import load_model, sample_shape
from .plots import write_distributions, write_eval_figures, write_fd_vs_bits, write_step_error
from .recipe import RecipeError, load_recipe
from .registry import UnknownNameError
from .report import save_grid, write_report
from .samplers import SAMPLERS


def _explain(args: argparse.Namespace) -> None:
    print(load_recipe(args.recipe).explain(load_model(args.model, weights=args.weights)))


def _conventions(args: argparse.Namespace) -> BopsConventions:
    return BopsConventions(attention=args.bops_attention, float_bits=args.bops_float_bits)


def _bops(args: argparse.Namespace) -> None:
    model = load_model(args.model, weights=args.weights)
    plan = load_recipe(args.recipe).resolve(model) if args.recipe else None
    entries = count_macs(model, torch.zeros(1, *sample_shape(model)), torch.tensor(0))
    bops = count_bops(entries, plan, args.steps, _conventions(args))
    gmacs = {kind: sum(e.macs for e in entries if e.kind == kind) / 1e9 for kind in ("layer", "attention")}
    result = {
        "settings": {"model": args.model, "recipe": args.recipe, "steps": args.steps},
        "conventions": {"attention": args.bops_attention, "float_bits": args.bops_float_bits},
        "gmacs_per_step": {"layers": gmacs["layer"], "attention_matmuls": gmacs["attention"]},
        **bops.summary(),
        "per_step": bops.per_step,
        "per_layer": bops.per_entry,
    }
    _write_json(args.json, result)
    print(f"{args.model}, {args.recipe or 'full precision'}: {gmacs['layer']:.3f} GMACs in {sum(e.kind == 'layer' for e in entries)} layers + {gmacs['attention']:.3f} in attention matmuls per image-step")
    print(f"GBops per image-step: {bops.gbops_per_step:.1f} nominal, {bops.gbops_per_step_amortized:.1f} amortized over {args.steps} steps (attention: {args.bops_attention}, float as {args.bops_float_bits}-bit)")


def _write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1, allow_nan=False), encoding="utf-8")


def _harness(args: argparse.Namespace) -> Harness:
    return Harness(
        args.model,
        sampler=args.sampler,
        steps=args.steps,
        samples=args.samples,
        seed=args.seed,
        batch_size=args.batch_size,
        weights=args.weights,
        calibration_cache=args.calibration_cache,
        bops_conventions=_conventions(args),
    )


def _eval(args: argparse.Namespace) -> None:
    harness = _harness(args)
    metrics, run = harness.evaluate(args.recipe, args.base_quantizer, args.calibration_samples)
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k not in ("run", "json", "out", "command")}
    finite = {k: v if not isinstance(v, float) or math.isfinite(v) else None for k, v in metrics.items()}  # JSON has no NaN
    _write_json(args.json, {"settings": settings, **finite})
    if args.out:
        save_grid(args.out / "grid.png", {"full precision": harness.reference.images, args.recipe: run.images})
        figures = write_eval_figures(harness, args.recipe, run, args.out)
        write_report(args.out / "report.md", f"modiff-quant eval: {args.recipe} on {args.model}", settings, [{"recipe": args.recipe, **metrics}], "grid.png", figures)
    print(json.dumps(finite, indent=1))


def _demo(args: argparse.Namespace) -> None:
    harness = _harness(args)
    rows = [{"recipe": "full precision", **harness.evaluate(None)[0]}]
    images = {"full precision": harness.reference.images}
    for recipe in args.recipes:
        metrics, run = harness.evaluate(recipe)
        rows.append({"recipe": recipe, **metrics})
        images[recipe] = run.images
    columns = ("fd", "fd_to_fp", "psnr_vs_fp", "gbops_per_step", "wall_seconds")
    print(f"{args.model}, {args.sampler} {args.steps} steps, {args.samples} samples, seed {args.seed} (FD: lower is better, to held-out real digits)")
    print(f"{'recipe':<16}" + "".join(f"{c:>16}" for c in columns))
    for row in rows:
        print(f"{row['recipe']:<16}" + "".join(f"{row[c]:>16.2f}" if row[c] is not None else f"{'-':>16}" for c in columns))
    save_grid(args.out / "grid.png", images)
    settings = {k: getattr(args, k) for k in ("model", "sampler", "steps", "samples", "seed")}
    write_report(args.out / "report.md", "modiff-quant demo: full precision vs plain vs MoDiff", settings, rows, "grid.png")
    print(f"wrote {args.out / 'grid.png'} and {args.out / 'report.md'}")


def _plot_distributions(args: argparse.Namespace) -> None:
    print(f"wrote {write_distributions(_harness(args), args.out, args.layers)}")


def _plot_step_error(args: argparse.Namespace) -> None:
    print(f"wrote {write_step_error(_harness(args), args.recipe, args.out)}")


def _plot_fd_vs_bits(args: argparse.Namespace) -> None:
    print(f"wrote {write_fd_vs_bits(args.results, args.out, args.w_bits)}")


def _gate(args: argparse.Namespace) -> int:
    checks, recorded = run_gate(args.baseline, update=args.update)
    print(format_checks(checks))
    failed = [check for check in checks if not check.passed]
    if recorded:
        print(f"recorded the current values in {args.baseline}")
        return 0
    if failed:
        refused = " (nothing recorded)" if args.update else ""
        print(f"quality gate FAILED: {len(failed)} of {len(checks)} checks out of tolerance{refused}")
        return 1
    print(f"quality gate passed: {len(checks)} checks")
    return 0


def _sampling_options(parser: argparse.ArgumentParser, *, model: str | None, samples: int) -> None:
    parser.add_argument("--model", default=model, required=model is None, help="digits16, cifar10-ddpm or a diffusers model folder")
    parser.add_argument("--weights", help="checkpoint for cifar10-ddpm (safetensors, torch state dict or diffusers folder)")
    parser.add_argument("--sampler", default="ddim", choices=SAMPLERS)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--samples", type=int, default=samples)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--calibration-cache", type=Path, help="folder where calibrations are saved and reused by later runs")
    _bops_options(parser)


def _bops_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--bops-attention", default="layer", choices=("layer", "float", "exclude"), help="charge attention matmuls at their projection's W×A (the paper), float×float, or not at all")
    parser.add_argument("--bops-float-bits", type=int, default=32, help="bit-width a float operand is charged at (the paper: 32)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="modiff-quant", description="MoDiff quantization for diffusion models")
    commands = parser.add_subparsers(dest="command", required=True)

    explain = commands.add_parser("explain", help="per-layer table of what a recipe does to a model")
    explain.add_argument("--model", required=True, help="digits16, cifar10-ddpm or a diffusers model folder")
    explain.add_argument("--weights")
    explain.add_argument("--recipe", required=True, help="shipped recipe name or YAML file")
    explain.set_defaults(run=_explain)

    bops = commands.add_parser("bops", help="bit-operations per image-step of a recipe, per layer and step (no sampling)")
    bops.add_argument("--model", required=True, help="digits16, cifar10-ddpm or a diffusers model folder")
    bops.add_argument("--weights")
    bops.add_argument("--recipe", help="shipped recipe name or YAML file (omit: the full-precision model)")
    bops.add_argument("--steps", type=int, default=100, help="trajectory length for the amortized count")
    bops.add_argument("--json", type=Path, required=True)
    _bops_options(bops)
    bops.set_defaults(run=_bops)

    evaluate = commands.add_parser("eval", help="sample full precision and quantized from the same noise; metrics as JSON")
    _sampling_options(evaluate, model=None, samples=256)
    evaluate.add_argument("--recipe", required=True)
    evaluate.add_argument("--base-quantizer", help="swap the base quantizer of every layer")
    evaluate.add_argument("--calibration-samples", type=int, default=CALIBRATION_SAMPLES)
    evaluate.add_argument("--json", type=Path, required=True)
    evaluate.add_argument("--out", type=Path, help="folder for grid.png, report.md and the step-error and distribution plots")
    evaluate.set_defaults(run=_eval)

    demo = commands.add_parser("demo", help="full precision vs plain vs MoDiff on the bundled digits16 model")
    _sampling_options(demo, model="digits16", samples=256)
    demo.add_argument("--recipes", nargs="+", default=["w8a4-plain", "w8a4-modiff"])
    demo.add_argument("--out", type=Path, default=Path("out/demo"))
    demo.set_defaults(run=_demo)

    plot = commands.add_parser("plot", help="figures as PNG plus the JSON of their data: distributions, step-error, fd-vs-bits")
    kinds = plot.add_subparsers(dest="kind", required=True)
    distributions = kinds.add_parser("distributions", help="layer inputs a_t vs temporal differences a_t - a_{t+1} in full precision (paper Fig. 1b)")
    _sampling_options(distributions, model="digits16", samples=64)
    distributions.add_argument("--layers", nargs="+", help="Linear/Conv layer names (default: an early conv, an attention projection, a late up-block conv)")
    distributions.add_argument("--out", type=Path, required=True, help="folder for fig1b-distributions.png and .json")
    distributions.set_defaults(run=_plot_distributions)
    step_error = kinds.add_parser("step-error", help="per-step relative ε error vs FP of plain, MoDiff w/o error compensation and MoDiff (paper Fig. 3)")
    _sampling_options(step_error, model="digits16", samples=64)
    step_error.add_argument("--recipe", default="w8a4-modiff", help="the recipe the three variants are derived from")
    step_error.add_argument("--out", type=Path, required=True, help="folder for fig3-step-error.png and .json")
    step_error.set_defaults(run=_plot_step_error)
    fd_vs_bits = kinds.add_parser("fd-vs-bits", help="FD vs activation bits per base quantizer, from benchmarks/base_quantizer_table.py")
    fd_vs_bits.add_argument("--results", type=Path, default=Path("out/base-quantizers/results.json"))
    fd_vs_bits.add_argument("--w-bits", type=int, default=8, help="weight bit-width of the rows drawn")
    fd_vs_bits.add_argument("--out", type=Path, required=True, help="folder for fd-vs-bits.png and .json")
    fd_vs_bits.set_defaults(run=_plot_fd_vs_bits)

    gate = commands.add_parser("gate", help="run the settings of a baselines YAML; exit 1 when a metric leaves its tolerance")
    gate.add_argument("--baseline", type=Path, required=True)
    gate.add_argument("--update", action="store_true", help="record the current values as the new baselines")
    gate.set_defaults(run=_gate)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        with torch.no_grad():
            return args.run(args) or 0
    except (RecipeError, FileNotFoundError, UnknownNameError, ValueError) as exc:
        print(f"modiff-quant: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
