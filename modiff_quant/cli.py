"""`modiff-quant` command line: list, explain, bops, eval, demo, gate, plot, search.

A user's mistake (an option value, a path, a recipe, a checkpoint or model file) is one line
`modiff-quant: error: ...` naming it, exit code 2, before any sampling or calibration starts;
any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager, redirect_stderr, redirect_stdout
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import torch

from . import distributed
from .bops import BopsConventions, count_bops, count_model_macs
from .evaluate import (
    CALIBRATION_SAMPLES,
    COMPILE_MODES,
    FLOAT_DTYPES,
    POSITIVE,
    SEEDS,
    Harness,
    checked_device,
    integer_error,
    step_relative_errors,
)
from .features import FEATURE_DIM
from .gate import format_checks, run_gate
from .models import BUILTIN_MODELS, BUNDLED_MODELS, load_model, training_schedule
from .plots import (
    write_distributions,
    write_eval_figures,
    write_fd_vs_bits,
    write_frontier,
    write_step_error,
)
from .recipe import Recipe, RecipeError, load_recipe, shipped_recipes
from .registry import BASE_QUANTIZERS, OBSERVERS, SCHEMES, UnknownNameError
from .report import save_grid, write_report
from .samplers import SAMPLERS, check_steps
from .search import (
    SearchError,
    allocate,
    budget_of,
    check_budget,
    check_widths,
    float_trajectory,
    load_cached,
    measure_sensitivity,
    phase_ranges,
    recipe_text,
    save_cached,
    searchable_layers,
    sensitivity_key,
)
from .serialization import LoadError
from .version import __version__

FLOAT_BITS = range(1, 65)
BOPS_STEPS = range(1, 10_001)  # longer than any training schedule; the count's work grows with it
SHARDED_COMMANDS = ("eval", "demo", "gate", "plot")
"""Commands whose sampling torchrun shards over its processes (modiff_quant.distributed)."""
USER_ERRORS = (RecipeError, LoadError, SearchError, FileNotFoundError, UnknownNameError, ValueError)
"""What a user's input may raise (besides an OSError naming a file); see `main`."""


class UsageError(Exception):
    """A command line refused before any work: a bad option value or an unwritable output path."""


class _Parser(argparse.ArgumentParser):
    """argparse's own error is a usage block and `modiff-quant eval: error: ...`; ours is the one
    line every other user error gets (sub-command parsers inherit this class)."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see '{self.prog} --help')")


@dataclass(frozen=True)
class Integer:
    """An argparse type: an integer in `allowed` (a dataclass, so that tests can read the range)."""

    allowed: range

    def __call__(self, text: str) -> int:
        try:
            value: Any = int(text)
        except ValueError:
            value = text
        if error := integer_error(value, self.allowed):
            raise argparse.ArgumentTypeError(error)
        return value


@dataclass(frozen=True)
class OutputPath:
    """An argparse type: a path the command will write, as a folder or a file, checked when the
    command line is read rather than after the run that produces its contents."""

    folder: bool

    def __call__(self, text: str) -> Path:
        path = Path(text)
        try:
            problem = _unwritable(path, folder=self.folder)
        except OSError as exc:  # a name too long, a loop of links, ...
            problem = exc.strerror or str(exc)
        if problem:
            raise argparse.ArgumentTypeError(f"{text!r} {problem}")
        return path


def _unwritable(path: Path, *, folder: bool) -> str | None:
    """Why `path` cannot be written as a folder (or a file): None when it can, as far as can be
    told without writing."""
    if path.exists() and path.is_dir() != folder:
        return "is a file, not a folder" if folder else "is a folder, not a file"
    if path.is_file() and not os.access(path, os.W_OK):
        return "is not writable"
    parent = path if folder else path.parent
    existing = next((p for p in (parent, *parent.parents) if p.exists()), None)
    if existing is None or not existing.is_dir():
        return f"cannot be created: {existing or parent} is not a folder"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"cannot be written: no write permission in {existing}"
    return None


def _list(args: argparse.Namespace) -> None:
    """What names the other commands take: shipped recipes, registered plugins, models, samplers."""
    recipes = {name: load_recipe(name).description for name in shipped_recipes()}
    width = max(map(len, recipes))
    print("recipes (shipped; `explain --recipe NAME` shows one layer by layer, or give a YAML file):")
    print("\n".join(f"  {name:<{width}}  {description}" for name, description in recipes.items()))
    print(f"base quantizers (--base-quantizer, or base_quantizer: in a recipe): {', '.join(BASE_QUANTIZERS.names())}")
    print(f"schemes: {', '.join(SCHEMES.names())}")
    print(f"observers (of the static base quantizers): {', '.join(OBSERVERS.names())}")
    print(
        f"models: {', '.join(BUNDLED_MODELS)} (bundled, trained), {', '.join(BUILTIN_MODELS)} (built-in architecture: "
        "random weights unless --weights), or a diffusers model folder"
    )
    print(f"samplers: {', '.join(SAMPLERS)}")


def _recipe(args: argparse.Namespace) -> Recipe:
    """The recipe of the command line, with `--base-quantizer` swapped in."""
    recipe = load_recipe(args.recipe)
    return recipe.with_base_quantizer(args.base_quantizer) if args.base_quantizer else recipe


def _explain(args: argparse.Namespace) -> None:
    print(_recipe(args).explain(load_model(args.model, weights=args.weights)))


def _conventions(args: argparse.Namespace) -> BopsConventions:
    return BopsConventions(attention=args.bops_attention, float_bits=args.bops_float_bits)


def _bops(args: argparse.Namespace) -> None:
    if args.base_quantizer and not args.recipe:
        raise UsageError("argument --base-quantizer: swaps the base quantizer of a --recipe, and none is given")
    model = load_model(args.model, weights=args.weights)
    plan = _recipe(args).resolve(model) if args.recipe else None
    entries = count_model_macs(model)
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
    if args.json:
        _write_json(args.json, result)
    layer_count = sum(e.kind == "layer" for e in entries)
    print(
        f"{args.model}, {args.recipe or 'full precision'}: {gmacs['layer']:.3f} GMACs in {layer_count} layers "
        f"+ {gmacs['attention']:.3f} in attention matmuls per image-step"
    )
    print(
        f"GBops per image-step: {bops.gbops_per_step:.1f} nominal, "
        f"{bops.gbops_per_step_amortized:.1f} amortized over {args.steps} steps "
        f"(attention: {args.bops_attention}, float as {args.bops_float_bits}-bit)"
    )


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1, allow_nan=False), encoding="utf-8")


def _warn_of_small_fd_samples(args: argparse.Namespace) -> None:
    """FD's bias grows as the sample count nears the feature width: 32 samples report about 7x the FD of 256."""
    if args.model == "digits16" and args.samples < 2 * FEATURE_DIM:
        print(
            f"modiff-quant: warning: FD from {args.samples} samples of {FEATURE_DIM}-dimensional features is mostly "
            f"sample-size bias; compare FDs only at equal --samples, and use at least {2 * FEATURE_DIM}",
            file=sys.stderr,
        )


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
        device=args.device,
        dtype=args.dtype,
        compile_mode=args.compile,
    )


def _eval(args: argparse.Namespace) -> None:
    recipe = _recipe(args)  # the file and the swap, checked before the model loads
    harness = _harness(args)
    checked = harness.check(recipe, calibration_samples=args.calibration_samples)  # against the model, before sampling
    _warn_of_small_fd_samples(args)
    metrics, run = harness.evaluate(checked, calibration_samples=args.calibration_samples)
    settings: dict[str, Any] = {}
    for key, value in vars(args).items():
        if key not in ("run", "json", "out", "command"):  # outputs and dispatch are no settings
            settings[key] = str(value) if isinstance(value, Path) else value
    settings["kernels"] = _kernels()
    settings["processes"] = distributed.world_size()
    finite = {key: _json_number(value) for key, value in metrics.items()}
    if args.json and distributed.is_main():
        _write_json(args.json, {"settings": settings, **finite})
    step_errors = step_relative_errors(harness.reference.epsilons, run.epsilons) if args.out else []  # every process
    if args.out and distributed.is_main():
        save_grid(args.out / "grid.png", {"full precision": harness.reference.images, args.recipe: run.images})
        figures = write_eval_figures(harness, args.recipe, step_errors, args.out)
        write_report(
            args.out / "report.md",
            f"modiff-quant eval: {args.recipe} on {args.model}",
            settings,
            [{"recipe": args.recipe, **metrics}],
            "grid.png",
            figures,
        )
    print(json.dumps(finite, indent=1))


def _json_number(value: Any) -> Any:
    """`value`, or None for a float JSON cannot hold (NaN, infinity)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _demo(args: argparse.Namespace) -> None:
    harness = _harness(args)
    recipes = {recipe: harness.check(recipe) for recipe in args.recipes}  # every recipe before the first sampling
    _warn_of_small_fd_samples(args)
    rows = [{"recipe": "full precision", **harness.evaluate(None)[0]}]
    images = {"full precision": harness.reference.images}
    for recipe, checked in recipes.items():
        metrics, run = harness.evaluate(checked)
        rows.append({"recipe": recipe, **metrics})
        images[recipe] = run.images
    columns = ("fd", "fd_to_fp", "psnr_vs_fp", "gbops_per_step", "wall_seconds")
    print(
        f"{args.model}, {args.sampler} {args.steps} steps, {args.samples} samples, seed {args.seed} "
        "(FD: lower is better, to held-out real digits)"
    )
    print(f"computed with {_kernels()}")
    print(f"{'recipe':<16}" + "".join(f"{c:>16}" for c in columns))
    for row in rows:
        cells = [f"{row[c]:>16.2f}" if row[c] is not None else f"{'-':>16}" for c in columns]  # '-': no value
        print(f"{row['recipe']:<16}" + "".join(cells))
    if not distributed.is_main():
        return
    save_grid(args.out / "grid.png", images)
    settings = {
        **{k: getattr(args, k) for k in ("model", "sampler", "steps", "samples", "seed")},
        "kernels": _kernels(),
    }
    write_report(
        args.out / "report.md", "modiff-quant demo: full precision vs plain vs MoDiff", settings, rows, "grid.png"
    )
    print(f"wrote {args.out / 'grid.png'} and {args.out / 'report.md'}")


def _kernels() -> str:
    """What the numbers depend on besides the settings: on one machine a run repeats bit for bit,
    but another CPU's kernels (AVX2 vs AVX-512, torch version) round differently, and 4-bit
    rounding turns that into visibly different quantized metrics."""
    capability = torch.backends.cpu.get_cpu_capability()
    return f"torch {torch.__version__}, {capability} CPU kernels, {torch.get_num_threads()} threads"


def _plot_distributions(args: argparse.Namespace) -> None:
    print(f"wrote {write_distributions(_harness(args), args.out, args.layers)}")


def _plot_step_error(args: argparse.Namespace) -> None:
    print(f"wrote {write_step_error(_harness(args), args.recipe, args.out)}")


def _plot_fd_vs_bits(args: argparse.Namespace) -> None:
    print(f"wrote {write_fd_vs_bits(args.results, args.out, args.w_bits)}")


def _gate(args: argparse.Namespace) -> int:
    if args.update and (problem := _unwritable(args.baseline, folder=False)):
        raise UsageError(f"argument --baseline: {str(args.baseline)!r} {problem} (--update rewrites it)")
    execution = {"device": args.device, "dtype": args.dtype, "compile_mode": args.compile}
    checks, recorded = run_gate(args.baseline, update=args.update, execution=execution)
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


def _search(args: argparse.Namespace) -> None:
    """Everything is checked (recipe, widths, phases, budget) before the sensitivity pass."""
    if args.budget_gbops is not None and not (math.isfinite(args.budget_gbops) and args.budget_gbops > 0):
        raise UsageError(f"argument --budget-gbops: expected a positive number, got {args.budget_gbops}")
    model = load_model(args.model, weights=args.weights)
    plan = load_recipe(args.recipe).resolve(model)
    widths, layers = check_widths(args.bits), searchable_layers(plan, model)
    names = tuple(layer.name for layer in layers)
    training = training_schedule(args.model)
    check_steps(args.sampler, training, args.steps)
    phase_ranges(args.steps, args.phases)
    entries, conventions = count_model_macs(model), _conventions(args)
    budget = (
        args.budget_gbops
        if args.budget_gbops is not None
        else budget_of(args.budget_recipe, model, entries, args.steps, conventions)
    )
    check_budget(budget, plan, entries, args.steps, widths[0], conventions, names)
    setting = {"sampler": args.sampler, "steps": args.steps, "samples": args.samples, "seed": args.seed}
    cache = (
        args.cache_dir / f"sensitivity-{sensitivity_key(model, plan, widths, setting)[:32]}.json"
        if args.cache_dir
        else None
    )
    sensitivity = load_cached(cache, names, widths, args.steps) if cache else None
    if sensitivity is None:
        trajectory = float_trajectory(model, args.sampler, training, args.steps, args.samples, args.seed)
        sensitivity = measure_sensitivity(model, plan.recipe, layers, widths, trajectory)
        if cache:
            save_cached(cache, sensitivity)
    else:
        print(f"sensitivity: reused {cache}")
    result = allocate(sensitivity, plan, entries, args.steps, args.phases, budget, conventions)
    description = (
        f"{args.model}, {args.recipe}, widths {'/'.join(map(str, widths))}, {args.phases} phases of "
        f"{args.sampler} {args.steps} steps, {args.samples} samples"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(recipe_text(result, args.recipe, budget, description), encoding="utf-8")
    found = count_bops(entries, load_recipe(args.out).resolve(model), args.steps, conventions)
    print(
        f"wrote {args.out}: {found.gbops_per_step_amortized:.4g} GBops per image-step amortized "
        f"(budget {budget:.4g}); predicted error {result.found.error:.4g}, uniform "
        f"{', '.join(f'A{w} {e:.3g}' for w, (_, e) in result.uniform.items())} (Σ over layers of the mean "
        "squared relative ε error per step)"
    )
    if args.plot:
        print(f"wrote {write_frontier(result, budget, description, args.plot)}")


def _weights_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--weights", help="checkpoint for cifar10-ddpm (safetensors, torch state dict or diffusers folder)"
    )


def _base_quantizer_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--base-quantizer",
        metavar="{" + ",".join(BASE_QUANTIZERS.names()) + "}",  # checked by the registry, which suggests a spelling
        help="swap the base quantizer of every layer (settings it cannot serve are adapted; 'explain' lists them)",
    )


def _sampling_options(parser: argparse.ArgumentParser, *, model: str | None, samples: int) -> None:
    parser.add_argument(
        "--model", default=model, required=model is None, help="digits16, cifar10-ddpm or a diffusers model folder"
    )
    _weights_option(parser)
    parser.add_argument("--sampler", default="ddim", choices=SAMPLERS, help="sampling loop (default ddim)")
    parser.add_argument(
        "--steps", type=Integer(POSITIVE), default=100, help="sampling steps (at most the model's training timesteps)"
    )
    parser.add_argument(
        "--samples", type=Integer(POSITIVE), default=samples, help=f"images to sample per run (default {samples})"
    )
    parser.add_argument("--seed", type=Integer(SEEDS), default=0, help=f"0 to {SEEDS.stop - 1}")
    parser.add_argument(
        "--batch-size", type=Integer(POSITIVE), default=256, help="images sampled at once (memory vs speed)"
    )
    parser.add_argument(
        "--calibration-cache",
        type=OutputPath(folder=True),
        help="folder where calibrations are saved and reused by later runs",
    )
    _execution_options(parser)
    _bops_options(parser)


def _execution_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="cpu", help="torch device to sample on, e.g. cpu, cuda, cuda:1")
    parser.add_argument(
        "--dtype", default="float32", choices=list(FLOAT_DTYPES), help="float type of the model's float parts"
    )
    parser.add_argument(
        "--compile",
        nargs="?",
        const="default",
        choices=COMPILE_MODES,
        help="sample through torch.compile (optionally with this mode)",
    )


def _bops_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--bops-attention",
        default="operands",
        choices=("operands", "layer", "float", "exclude"),
        help="charge attention products (QKᵀ, softmax·V) at the widths of the operands they run on (default: "
        "float unless the recipe quantizes them), at their projection's W×A (the paper), float×float, or not at all",
    )
    parser.add_argument(
        "--bops-float-bits",
        type=Integer(FLOAT_BITS),
        default=32,
        help="bit-width a float operand is charged at, 1 to 64 (the paper: 32)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="modiff-quant", description="MoDiff quantization for diffusion models")
    parser.add_argument(
        "--version", action="version", version=f"modiff-quant {__version__}, torch {torch.__version__}"
    )
    commands = parser.add_subparsers(dest="command", required=True)

    listing = commands.add_parser("list", help="shipped recipes, base quantizers, schemes, observers, models")
    listing.set_defaults(run=_list)

    explain = commands.add_parser("explain", help="per-layer table of what a recipe does to a model")
    explain.add_argument("--model", required=True, help="digits16, cifar10-ddpm or a diffusers model folder")
    _weights_option(explain)
    explain.add_argument("--recipe", required=True, help="shipped recipe name or YAML file")
    _base_quantizer_option(explain)
    explain.set_defaults(run=_explain)

    bops = commands.add_parser(
        "bops", help="bit-operations per image-step of a recipe, per layer and step (no sampling)"
    )
    bops.add_argument("--model", required=True, help="digits16, cifar10-ddpm or a diffusers model folder")
    _weights_option(bops)
    bops.add_argument("--recipe", help="shipped recipe name or YAML file (omit: the full-precision model)")
    _base_quantizer_option(bops)
    bops.add_argument(
        "--steps",
        type=Integer(BOPS_STEPS),
        default=100,
        help=f"trajectory length for the amortized count, 1 to {BOPS_STEPS.stop - 1}",
    )
    bops.add_argument(
        "--json", type=OutputPath(folder=False), help="also write the full count (per step and layer) here"
    )
    _bops_options(bops)
    bops.set_defaults(run=_bops)

    evaluate = commands.add_parser(
        "eval", help="sample full precision and quantized from the same noise; metrics as JSON"
    )
    _sampling_options(evaluate, model=None, samples=256)
    evaluate.add_argument("--recipe", required=True, help="shipped recipe name or YAML file (see 'modiff-quant list')")
    _base_quantizer_option(evaluate)
    evaluate.add_argument(
        "--calibration-samples",
        type=Integer(POSITIVE),
        default=CALIBRATION_SAMPLES,
        help=f"trajectories calibrated base quantizers observe (default {CALIBRATION_SAMPLES})",
    )
    evaluate.add_argument(
        "--json", type=OutputPath(folder=False), help="also write the metrics with every setting here"
    )
    evaluate.add_argument(
        "--out",
        type=OutputPath(folder=True),
        help="folder for grid.png, report.md and the step-error and distribution plots",
    )
    evaluate.set_defaults(run=_eval)

    demo = commands.add_parser("demo", help="full precision vs plain vs MoDiff on the bundled digits16 model")
    _sampling_options(demo, model="digits16", samples=256)
    demo.add_argument(
        "--recipes", nargs="+", default=["w8a4-plain", "w8a4-modiff"], help="recipes compared with full precision"
    )
    demo.add_argument(
        "--out", type=OutputPath(folder=True), default="out/demo", help="folder for grid.png and report.md"
    )
    demo.set_defaults(run=_demo)

    plot = commands.add_parser(
        "plot", help="figures as PNG plus the JSON of their data: distributions, step-error, fd-vs-bits"
    )
    kinds = plot.add_subparsers(dest="kind", required=True)
    distributions = kinds.add_parser(
        "distributions",
        help="layer inputs a_t vs temporal differences a_t - a_{t+1} in full precision (paper Fig. 1b)",
    )
    _sampling_options(distributions, model="digits16", samples=64)
    distributions.add_argument(
        "--layers",
        nargs="+",
        help="Linear/Conv layer names (default: an early conv, an attention projection, a late up-block conv)",
    )
    distributions.add_argument(
        "--out", type=OutputPath(folder=True), required=True, help="folder for fig1b-distributions.png and .json"
    )
    distributions.set_defaults(run=_plot_distributions)
    step_error = kinds.add_parser(
        "step-error",
        help="per-step relative ε error vs FP of plain, MoDiff w/o error compensation and MoDiff (paper Fig. 3)",
    )
    _sampling_options(step_error, model="digits16", samples=64)
    step_error.add_argument("--recipe", default="w8a4-modiff", help="the recipe the three variants are derived from")
    step_error.add_argument(
        "--out", type=OutputPath(folder=True), required=True, help="folder for fig3-step-error.png and .json"
    )
    step_error.set_defaults(run=_plot_step_error)
    fd_vs_bits = kinds.add_parser(
        "fd-vs-bits", help="FD vs activation bits per base quantizer, from benchmarks/base_quantizer_table.py"
    )
    fd_vs_bits.add_argument(
        "--results",
        type=Path,
        default=Path("out/base-quantizers/results.json"),
        help="results.json of benchmarks/base_quantizer_table.py",
    )
    fd_vs_bits.add_argument("--w-bits", type=Integer(POSITIVE), default=8, help="weight bit-width of the rows drawn")
    fd_vs_bits.add_argument(
        "--out", type=OutputPath(folder=True), required=True, help="folder for fd-vs-bits.png and .json"
    )
    fd_vs_bits.set_defaults(run=_plot_fd_vs_bits)

    search = commands.add_parser(
        "search", help="per-layer, per-step activation bits under a GBops budget, written as a recipe"
    )
    search.add_argument("--model", required=True, help="digits16, cifar10-ddpm or a diffusers model folder")
    _weights_option(search)
    search.add_argument(
        "--recipe", default="w8a8-modiff", help="base recipe whose layers get searched a_bits (default w8a8-modiff)"
    )
    budget = search.add_mutually_exclusive_group(required=True)
    budget.add_argument(
        "--budget-gbops", type=float, help="GBops per image-step, amortized over the trajectory (as 'bops' counts)"
    )
    budget.add_argument("--budget-recipe", help="a recipe whose amortized GBops are the budget, e.g. w8a3-modiff")
    search.add_argument(
        "--bits", type=int, nargs="+", default=[2, 3, 4, 6, 8], help="candidate activation widths (default 2 3 4 6 8)"
    )
    search.add_argument(
        "--phases", type=Integer(POSITIVE), default=10, help="equal step ranges that may differ in bits (default 10)"
    )
    search.add_argument("--sampler", default="ddim", choices=SAMPLERS, help="sampling loop (default ddim)")
    search.add_argument("--steps", type=Integer(POSITIVE), default=100, help="sampling steps (default 100)")
    search.add_argument(
        "--samples", type=Integer(POSITIVE), default=8, help="trajectories the sensitivity pass follows (default 8)"
    )
    search.add_argument("--seed", type=Integer(SEEDS), default=0, help=f"0 to {SEEDS.stop - 1}")
    search.add_argument("--out", type=OutputPath(folder=False), required=True, help="the recipe YAML to write")
    search.add_argument("--plot", type=OutputPath(folder=False), help="frontier PNG (and its JSON) to write")
    search.add_argument(
        "--cache-dir", type=OutputPath(folder=True), help="folder where sensitivity tables are kept and reused"
    )
    _bops_options(search)
    search.set_defaults(run=_search)

    gate = commands.add_parser(
        "gate", help="run the settings of a baselines YAML; exit 1 when a metric leaves its tolerance"
    )
    gate.add_argument(
        "--baseline", type=Path, required=True, help="baselines YAML: settings, recorded values, tolerances"
    )
    gate.add_argument("--update", action="store_true", help="record the current values as the new baselines")
    _execution_options(gate)
    gate.set_defaults(run=_gate)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run a command: 0 done, 1 a failed quality gate, 2 a user error (one line on stderr), 3 another
    process of a torchrun job failed or did not answer (one line on stderr)."""
    try:
        args = build_parser().parse_args(argv)
        with torch.no_grad(), _sharded(args.command, getattr(args, "device", "cpu")):
            return args.run(args) or 0
    except (UsageError, *USER_ERRORS) as exc:
        return _report(exc)
    except distributed.ProcessGroupError as exc:
        _report(exc)
        return 3
    except OSError as exc:
        if exc.filename is None:  # not about a path the user gave: a bug or the system's problem
            raise
        return _report(exc)


@contextmanager
def _sharded(command: str, device: str) -> Iterator[None]:
    """Under torchrun, the process group around a command that shards its sampling, with rank 0
    alone printing and warning (and writing: see the commands; an error is reported by every
    rank); a command that does not shard is refused."""
    if not distributed.launched():
        yield
        return
    if command not in SHARDED_COMMANDS:
        raise UsageError(f"{command} runs in one process; under torchrun run {', '.join(SHARDED_COMMANDS)}")
    distributed.join(checked_device(device))
    try:
        if distributed.is_main():
            yield
        else:
            with open(os.devnull, "w", encoding="utf-8") as quiet, redirect_stdout(quiet), redirect_stderr(quiet):
                yield
    finally:
        distributed.leave()


def _report(exc: BaseException) -> int:
    message = " ".join(line.strip() for line in str(exc).splitlines())
    print(f"modiff-quant: error: {message}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
