"""The paper's figures for any model the harness runs, each written as a PNG next to the JSON of
the data it draws (so that its numbers can be quoted):

- layer inputs a_t vs temporal differences a_t − a_{t+1} in full precision (Fig. 1b): the
  difference is what MoDiff quantizes, and its narrow range is the method's premise;
- per-step relative ε error vs full precision of plain PTQ, MoDiff without error compensation
  and MoDiff (Fig. 3): what each part of MoDiff contributes, all from the same noise;
- FD vs activation bits per base quantizer, from `benchmarks/base_quantizer_table.py`;
- the quality/compute frontier of `modiff-quant search` (predicted error vs GBops).

The data comes from `figure_data`. matplotlib is imported only when a figure is drawn (on the
Agg canvas, no pyplot state), so `import modiff_quant` stays light.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from . import distributed
from .evaluate import Harness
from .figure_data import FdTable, LayerDistribution, Spread, load_fd_table, record_distributions, step_errors
from .recipe import Recipe
from .samplers import make_scheduler
from .search import SearchResult

if TYPE_CHECKING:
    from matplotlib.figure import Figure

DISTRIBUTIONS, STEP_ERROR, FD_VS_BITS = "fig1b-distributions.png", "fig3-step-error.png", "fd-vs-bits.png"
EVAL_DISTRIBUTION_SAMPLES = 16
"""`eval --out` records layer inputs in an extra full-precision run of this many samples: enough
for a histogram, a fraction of the evaluation's cost."""
QUOTED_METRICS = ("fd", "psnr_vs_fp", "eps_rel_error")
SCHEME_STYLES = {"modiff": ("-", "o", "MoDiff"), "plain": ("--", "s", "plain")}
"""Scheme -> line style, marker and legend label in FD vs bits (other schemes: dotted, by name)."""
STEP_ERROR_COLORS = {"plain": "tab:red", "MoDiff w/o error compensation": "tab:orange", "MoDiff": "tab:blue"}


# Files: PNG + JSON


def write_distributions(
    harness: Harness, out: Path, layers: list[str] | None = None, samples: int | None = None, name: str = DISTRIBUTIONS
) -> Path:
    """Fig. 1b for `layers` (default: `default_layers`) over the first `samples` trajectories."""
    distributions = record_distributions(harness, layers, samples)
    histograms = [layer.histogram() for layer in distributions]
    title = f"{_setting(harness, samples)}, full precision: layer inputs vs temporal differences"
    data = {
        "title": title,
        "layers": [
            {
                "name": layer.name,
                "std_ratio": layer.std_ratio,
                "input": _moments(layer.raw),
                "difference": _moments(layer.diff),
                "histogram": {
                    "edges": edges.tolist(),
                    "input_density": raw.tolist(),
                    "difference_density": diff.tolist(),
                },
            }
            for layer, (edges, raw, diff) in zip(distributions, histograms)
        ],
    }
    return _save(_draw_distributions(distributions, histograms, title), out / name, data)


def write_step_error(harness: Harness, recipe: str | Path | Recipe, out: Path, name: str = STEP_ERROR) -> Path:
    """Fig. 3 for the variants of `recipe`."""
    errors = step_errors(harness, recipe)
    defaults = errors.recipe.defaults
    bits = f"W{defaults.w_bits}A{defaults.a_bits}"
    title = f"{_setting(harness)}\n{errors.recipe.name} variants ({bits}, {defaults.base_quantizer}) vs full precision"
    metrics = {label: {key: values[key] for key in QUOTED_METRICS} for label, values in errors.metrics.items()}
    return _save_step_error(harness, title, errors.curves, metrics, out / name)


def write_fd_vs_bits(results: Path, out: Path, w_bits: int = 8, name: str = FD_VS_BITS) -> Path:
    """FD vs activation bits at `w_bits`, one line per base quantizer and scheme."""
    table = load_fd_table(results, w_bits)
    steps = table.settings.get("steps", "?")
    samples = table.settings.get("samples", "?")
    # the benchmark's harness: digits16 with DDIM
    title = f"digits16, ddim {steps} steps, {samples} samples: FD vs activation bits at W{w_bits}"
    data = {"title": title, "results": str(results), "w_bits": w_bits, "fp_fd": table.fp_fd, "fd": table.fd}
    return _save(_draw_fd_vs_bits(table, title), out / name, data)


def write_eval_figures(harness: Harness, label: str, step_errors: list[float], out: Path) -> dict[str, str]:
    """What `eval --out` adds to its report: the evaluated model's per-step ε error (from the
    evaluation's own runs: `step_relative_errors`) and the default layers' distributions. Returns
    caption -> file name."""
    name = Path(label).stem
    curves = {name: step_errors}
    step_error = _save_step_error(
        harness, f"{_setting(harness)}\n{name} vs full precision", curves, {}, out / "step-error.png"
    )
    distributions = write_distributions(harness, out, samples=EVAL_DISTRIBUTION_SAMPLES, name="distributions.png")
    return {
        "per-step relative error of ε vs full precision": step_error.name,
        "layer inputs vs temporal differences (full precision)": distributions.name,
    }


def write_frontier(result: SearchResult, budget: float, title: str, path: Path) -> Path:
    """The search's downgrade path with the budget, the found allocation and uniform widths."""
    data = {
        "title": title,
        "budget_gbops": budget,
        "frontier": [{"gbops": g, "error": e} for g, e in result.frontier],
        "uniform": {str(w): {"gbops": g, "error": e} for w, (g, e) in result.uniform.items()},
        "found": {"gbops": result.found.gbops, "error": result.found.error},
    }
    return _save(_draw_frontier(result, budget, title), path, data)


def _setting(harness: Harness, samples: int | None = None) -> str:
    return f"{harness.model_name}, {harness.sampler} {harness.steps} steps, {len(harness.noise[:samples])} samples"


def _moments(spread: Spread) -> dict[str, float]:
    return {"count": spread.count, "mean": spread.mean, "std": spread.std, "absmax": spread.absmax}


def _save_step_error(
    harness: Harness, title: str, curves: dict[str, list[float]], metrics: dict[str, dict[str, Any]], path: Path
) -> Path:
    scheduler = make_scheduler(harness.sampler, harness.training)
    scheduler.set_timesteps(harness.steps)
    timesteps = scheduler.timesteps.tolist()
    means = {label: float(np.mean(curve)) for label, curve in curves.items()}
    data = {"title": title, "timesteps": timesteps, "mean": means, "metrics": metrics, "curves": curves}
    return _save(_draw_step_error(curves, timesteps, title), path, data)


def _save(figure: Figure, path: Path, data: dict[str, Any]) -> Path:
    """The PNG and its JSON; in a torch.distributed job, where every process drew the same
    figure, rank 0 alone writes them."""
    if not distributed.is_main():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    path.with_suffix(".json").write_text(json.dumps(data, indent=1), encoding="utf-8")
    return path


# Drawing


def _figure(width: float, height: float) -> Figure:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=130, layout="constrained")


def _draw_distributions(
    distributions: list[LayerDistribution], histograms: list[tuple[np.ndarray, np.ndarray, np.ndarray]], title: str
) -> Figure:
    """One panel per layer, both densities on shared bins; log density (a_t's tails span decades)."""
    figure = _figure(4.6 * len(distributions), 4.0)
    panels = figure.subplots(1, len(distributions), squeeze=False)[0]
    for ax, layer, (edges, raw, diff) in zip(panels, distributions, histograms):
        ax.stairs(raw, edges, fill=True, alpha=0.45, color="tab:red", label=f"input $a_t$ (std {layer.raw.std:.3g})")
        ax.stairs(
            diff,
            edges,
            fill=True,
            alpha=0.45,
            color="tab:blue",
            label=f"difference $a_t - a_{{t+1}}$ (std {layer.diff.std:.3g})",
        )
        ax.set_yscale("log")
        ax.set_title(f"{layer.name}\nstd ratio {layer.std_ratio:.3f}", fontsize=9)
        ax.set_xlabel("value (layer-input units)")
        ax.set_ylabel("probability density (per unit, log scale)")
        ax.legend(fontsize=8, loc="upper right")
    figure.suptitle(title, fontsize=10)
    return figure


def _draw_step_error(curves: dict[str, list[float]], timesteps: list[int], title: str) -> Figure:
    """One line per model; log error axis (the models differ by decades)."""
    from matplotlib.ticker import MaxNLocator

    figure = _figure(7.0, 4.2)
    ax = figure.subplots()
    for label, curve in curves.items():
        ax.plot(
            range(len(curve)), curve, color=STEP_ERROR_COLORS.get(label), label=f"{label} (mean {np.mean(curve):.3f})"
        )
    ax.set_yscale("log")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel(f"sampling step (0: t = {timesteps[0]}, noisiest; {len(timesteps) - 1}: t = {timesteps[-1]})")
    ax.set_ylabel(r"$\|\epsilon - \epsilon_{FP}\| \,/\, \|\epsilon_{FP}\|$ (ratio, log scale)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=10)
    return figure


def _draw_fd_vs_bits(table: FdTable, title: str) -> Figure:
    """A colour per base quantizer, a line style per scheme, the full-precision FD as the floor;
    log FD axis (plain quantization collapses by decades)."""
    from matplotlib.lines import Line2D

    figure = _figure(7.0, 4.6)
    ax = figure.subplots()
    colors = {base: f"C{index}" for index, base in enumerate(table.fd)}
    all_schemes = {scheme for by_scheme in table.fd.values() for scheme in by_scheme}
    schemes = sorted(all_schemes, key=lambda scheme: scheme != "modiff")  # modiff first
    styles = {scheme: SCHEME_STYLES.get(scheme, (":", "^", scheme)) for scheme in schemes}
    for base, by_scheme in table.fd.items():
        for scheme, points in by_scheme.items():
            ax.plot(
                list(points),
                list(points.values()),
                linestyle=styles[scheme][0],
                marker=styles[scheme][1],
                color=colors[base],
            )
    ax.axhline(table.fp_fd, color="black", linestyle=":", linewidth=1)
    ax.set_yscale("log")
    ax.set_xticks(sorted({a for by_scheme in table.fd.values() for points in by_scheme.values() for a in points}))
    ax.set_xlabel("activation bits")
    ax.set_ylabel("FD to held-out digits (classifier features, log scale)")
    ax.grid(True, which="both", alpha=0.3)
    handles = [Line2D([], [], color=color, linewidth=3, label=base) for base, color in colors.items()]
    handles += [
        Line2D([], [], color="gray", linestyle=style, marker=marker, label=label)
        for style, marker, label in styles.values()
    ]
    handles.append(Line2D([], [], color="black", linestyle=":", label=f"full precision (FD {table.fp_fd:.1f})"))
    ax.legend(handles=handles, fontsize=8, loc="upper right")
    ax.set_title(title, fontsize=10)
    return figure


def _draw_frontier(result: SearchResult, budget: float, title: str) -> Figure:
    figure = _figure(6.4, 4.2)
    ax = figure.subplots()
    gbops, errors = zip(*result.frontier)
    ax.plot(gbops, errors, color="tab:blue", label="per-layer, per-phase allocations (greedy path)")
    for width, (cost, error) in result.uniform.items():
        ax.scatter([cost], [error], color="tab:gray", marker="s", zorder=3)
        ax.annotate(f"A{width}", (cost, error), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.scatter([result.found.gbops], [result.found.error], color="tab:red", zorder=4, label="found")
    ax.axvline(budget, color="black", linestyle=":", linewidth=1, label=f"budget {budget:.3g} GBops")
    ax.set_yscale("log")
    ax.set_xlabel("GBops per image-step (amortized)")
    ax.set_ylabel("predicted error: Σ layers of mean squared relative ε error (log)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=10)
    return figure
