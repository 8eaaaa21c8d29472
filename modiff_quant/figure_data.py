"""The data behind the paper's figures, for any model the harness runs: layer inputs and their
temporal differences (Fig. 1b), per-step ε error of plain / MoDiff without error compensation /
MoDiff (Fig. 3), and FD per base quantizer and activation bits (from
`benchmarks/base_quantizer_table.py`). `plots` draws them."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from .evaluate import Harness, step_relative_errors
from .layer_parts import CHANNEL_DIMS
from .recipe import Recipe, load_recipe
from .registry import did_you_mean
from .samplers import make_scheduler, sample

PREFERRED_LAYERS = ("down_blocks.0.resnets.0.conv1", "mid_block.attentions.0.to_q", "up_blocks.2.resnets.1.conv2")
"""An early convolution, an attention projection and a late up-block convolution of diffusers'
UNet2DModel (digits16, cifar10-ddpm)."""
KEPT_VALUES = 200_000
"""Values per layer and kind kept for the histogram; the moments use every value."""
HISTOGRAM_BINS = 201
VARIANTS: dict[str, dict[str, Any]] = {
    "plain": {"scheme": "plain"},
    "MoDiff w/o error compensation": {"scheme": "modiff", "error_compensation": False},
    "MoDiff": {"scheme": "modiff", "error_compensation": True},
}
"""Fig. 3's models: label -> the settings every layer gets; the rest stays as the recipe has it."""
FD_ROW_KEYS = ("base", "scheme", "w_bits", "a_bits", "fd")

# Fig. 1b: layer inputs and temporal differences


@dataclass(frozen=True)
class Spread:
    """Exact moments of every value seen, and a uniform random subset of the values to draw."""

    count: int
    mean: float
    std: float
    absmax: float
    values: np.ndarray = field(repr=False)


@dataclass(frozen=True)
class LayerDistribution:
    """One layer's inputs a_t (every step) and differences a_t − a_{t+1} (every later step)."""

    name: str
    raw: Spread
    diff: Spread

    @property
    def std_ratio(self) -> float:
        return self.diff.std / self.raw.std

    def histogram(self, bins: int = HISTOGRAM_BINS) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Bin edges shared by both kinds, and the density of a_t and of a_t − a_{t+1} per bin."""
        edges = np.histogram_bin_edges(np.concatenate([self.raw.values, self.diff.values]), bins)
        return (
            edges,
            np.histogram(self.raw.values, edges, density=True)[0],
            np.histogram(self.diff.values, edges, density=True)[0],
        )


def default_layers(model: nn.Module) -> list[str]:
    """PREFERRED_LAYERS where the model has them, else the layers at a quarter, half and three
    quarters of the network (other architectures)."""
    names = _layer_names(model)
    preferred = [name for name in PREFERRED_LAYERS if name in names]
    if preferred:
        return preferred
    quartiles = {names[len(names) * k // 4] for k in (1, 2, 3)}  # a set: in a small model two may coincide
    return sorted(quartiles, key=names.index)


def _layer_names(model: nn.Module) -> list[str]:
    return [name for name, module in model.named_modules() if isinstance(module, tuple(CHANNEL_DIMS))]


def _check_layers(model: nn.Module, layers: list[str]) -> list[str]:
    names = _layer_names(model)
    for layer in layers:
        if layer not in names:
            suggestion = did_you_mean(layer, names)
            raise ValueError(
                f"{layer!r} is not a Linear/Conv layer of the model{suggestion} (`modiff-quant explain` lists them)"
            )
    return layers


class _Accumulator:
    """Running moments of everything added, plus `keep` random values of each addition."""

    def __init__(self, keep: int, generator: torch.Generator) -> None:
        self.keep, self.generator = keep, generator
        self.count, self.total, self.squares, self.absmax = 0, 0.0, 0.0, 0.0
        self.kept: list[Tensor] = []

    def add(self, x: Tensor) -> None:
        flat = x.detach().flatten().double()
        self.count += flat.numel()
        self.total += float(flat.sum())
        self.squares += float(flat.square().sum())
        self.absmax = max(self.absmax, float(flat.abs().max()))
        self.kept.append(
            flat[torch.randint(flat.numel(), (min(self.keep, flat.numel()),), generator=self.generator)].float()
        )

    def spread(self) -> Spread:
        mean = self.total / self.count
        return Spread(
            self.count,
            mean,
            math.sqrt(max(self.squares / self.count - mean * mean, 0.0)),
            self.absmax,
            torch.cat(self.kept).numpy(),
        )


class _Recorder:
    """Forward pre-hooks on the chosen layers. A layer called several times per model call (tied
    weights) is differenced per call site, never between its sites."""

    def __init__(self, model: nn.Module, layers: list[str], keep_per_call: int, seed: int) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.raw = {name: _Accumulator(keep_per_call, generator) for name in layers}
        self.diff = {name: _Accumulator(keep_per_call, generator) for name in layers}
        self.previous: dict[tuple[str, int], Tensor] = {}
        self.sites: dict[str, int] = {}
        modules = dict(model.named_modules())
        self.handles = [model.register_forward_pre_hook(lambda *_: self.sites.clear())]
        self.handles += [modules[name].register_forward_pre_hook(self._hook(name)) for name in layers]

    def _hook(self, name: str) -> Callable[[nn.Module, tuple[Tensor, ...]], None]:
        def hook(_: nn.Module, args: tuple[Tensor, ...]) -> None:
            site = self.sites.get(name, 0)
            self.sites[name] = site + 1
            x, previous = args[0], self.previous.get((name, site))
            self.raw[name].add(x)
            if previous is not None:
                self.diff[name].add(x - previous)
            self.previous[(name, site)] = x.detach().clone()

        return hook

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()

    def distributions(self) -> list[LayerDistribution]:
        return [LayerDistribution(name, self.raw[name].spread(), self.diff[name].spread()) for name in self.raw]


def record_distributions(
    harness: Harness, layers: list[str] | None = None, samples: int | None = None
) -> list[LayerDistribution]:
    """Inputs and temporal differences of `layers` (default: `default_layers`) while the harness's
    full-precision model samples its first `samples` noises (default: all), batch by batch."""
    if harness.steps < 2:
        raise ValueError(f"temporal differences need at least 2 sampling steps, got {harness.steps}")
    names = default_layers(harness.model) if layers is None else _check_layers(harness.model, layers)
    batches = harness.noise[:samples].split(harness.batch_size)
    recorder = _Recorder(harness.model, names, math.ceil(KEPT_VALUES / (len(batches) * harness.steps)), harness.seed)
    try:
        for index, batch in enumerate(batches):
            recorder.previous.clear()  # each batch is a new trajectory
            sample(
                harness.model,
                batch,
                make_scheduler(harness.sampler, harness.training),
                harness.steps,
                seed=harness.seed + index,
                desc="recording layer inputs",
            )
    finally:
        recorder.remove()
    return recorder.distributions()


# Fig. 3: per-step error of plain, MoDiff without error compensation and MoDiff


@dataclass(frozen=True)
class StepErrors:
    """One curve per VARIANTS entry: ‖ε − ε_FP‖/‖ε_FP‖ at each sampling step, and its metrics."""

    recipe: Recipe  # the variants' origin
    curves: dict[str, list[float]]
    metrics: dict[str, dict[str, Any]]


def ablation_recipes(recipe: str | Path | Recipe) -> dict[str, Recipe]:
    """The recipe once per VARIANTS entry, its settings on every layer (no rule keeps a layer out
    of the ablation)."""
    loaded = recipe if isinstance(recipe, Recipe) else load_recipe(recipe)
    return {label: loaded.overriding(settings, f"{loaded.name} ({label})") for label, settings in VARIANTS.items()}


def step_errors(harness: Harness, recipe: str | Path | Recipe) -> StepErrors:
    """Quantize, sample and compare each variant of `recipe` with the harness's FP reference."""
    loaded = recipe if isinstance(recipe, Recipe) else load_recipe(recipe)
    variants = ablation_recipes(loaded)
    for variant in variants.values():  # every variant's error before the first one samples
        harness.check(variant)
    curves, metrics = {}, {}
    for label, variant in variants.items():
        metrics[label], run = harness.evaluate(variant)
        curves[label] = step_relative_errors(harness.reference.epsilons, run.epsilons)
    return StepErrors(loaded, curves, metrics)


# FD vs activation bits


@dataclass(frozen=True)
class FdTable:
    """FD per base quantizer, scheme and activation bits at one weight bit-width."""

    w_bits: int
    fp_fd: float
    fd: dict[str, dict[str, dict[int, float]]]  # base -> scheme -> a_bits (ascending) -> FD
    settings: dict[str, Any]  # of the benchmark run (steps, samples)


def load_fd_table(path: Path, w_bits: int = 8) -> FdTable:
    """The rows of a base_quantizer_table.py results.json at `w_bits`; a clear error when the
    file, a row key, the rows at `w_bits` or the full-precision FD are missing."""
    if not path.is_file():
        raise FileNotFoundError(
            f"results file {str(path)!r} not found "
            f"(write it with `python benchmarks/base_quantizer_table.py --out {path.parent}`)"
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise ValueError(f"{path}: not a results JSON file ({exc})") from None
    if (
        not isinstance(data, dict)
        or not isinstance(data.get("rows", []), list)
        or not isinstance(data.get("fp", {}), dict)
    ):
        raise ValueError(
            f"{path}: not a results file of base_quantizer_table.py (expected an object with 'rows' and 'fp')"
        )
    fd: dict[str, dict[str, dict[int, float]]] = {}
    for index, row in enumerate(data.get("rows", [])):
        if not isinstance(row, dict):
            raise ValueError(f"{path}: row {index} is not an object (rows need {', '.join(FD_ROW_KEYS)})")
        missing = [key for key in FD_ROW_KEYS if key not in row]
        if missing:
            raise ValueError(f"{path}: row {index} lacks {', '.join(missing)} (rows need {', '.join(FD_ROW_KEYS)})")
        if row["w_bits"] == w_bits and row["fd"] is not None:
            fd.setdefault(row["base"], {}).setdefault(row["scheme"], {})[row["a_bits"]] = row["fd"]
    if not fd:
        raise ValueError(f"{path}: no rows with w_bits {w_bits} and an FD (rows need {', '.join(FD_ROW_KEYS)})")
    fp_fd = data.get("fp", {}).get("fd")
    if fp_fd is None:
        raise ValueError(f"{path}: no full-precision FD (expected 'fp': {{'fd': ...}})")
    by_ascending_bits = {
        base: {scheme: dict(sorted(points.items())) for scheme, points in schemes.items()}
        for base, schemes in fd.items()
    }
    return FdTable(w_bits, fp_fd, by_ascending_bits, data.get("settings", {}))
