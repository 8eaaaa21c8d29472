"""`modiff-quant search`: a per-layer, per-step activation bit allocation under a compute budget.

1. Sensitivity (cached on disk): along full-precision trajectories, each layer alone is quantized
   as the base recipe says, at each candidate `a_bits` (every other layer float), and the squared
   relative ε error it causes is recorded per step. Every call sees the full-precision trajectory
   (teacher forcing), so one pass per (layer, bits) gives the error of every step.
2. Allocation: the steps are cut into `phases` equal ranges. From every (layer, phase) at the
   widest candidate, the downgrade that loses the least error per GBop saved is taken until the
   amortized GBops fit the budget. Errors of different layers and phases are taken as additive
   (independent noise); the path of downgrades is the quality/compute frontier.
3. The allocation is written as a recipe that extends the base recipe with `steps` rules.
"""

from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from .api import convert, prepare, sampling
from .atomic_files import replace_file
from .bops import DEFAULT_CONVENTIONS, BopsConventions, MacEntry, charged_width, count_bops
from .models import sample_shape
from .oneshot import first_calibrated_layer
from .quant import FLOAT_BITS, MAX_BITS, MIN_BITS, SKIP_BITS
from .recipe import LayerPlan, Plan, Recipe, load_recipe
from .recipe.document import plan_document
from .recipe.schema import Rule
from .recipe.source import Location
from .samplers import make_scheduler, sample
from .settings import LayerSettings
from .tensors import tensor_bytes
from .version import __version__

CACHE_FORMAT = 1
MAX_CACHE_BYTES = 64 << 20  # a sensitivity table of 1,000 layers x 8 widths x 1,000 steps is ~100 MB of JSON
_SEARCH_RULE = Location("<search>", 0)


class SearchError(ValueError):
    """A search that cannot run as asked (a base recipe or a budget it cannot serve)."""


@dataclass(frozen=True)
class Sensitivity:
    """errors[layer, width, step]: squared relative ε error with that layer alone quantized."""

    layers: tuple[str, ...]
    widths: tuple[int, ...]
    errors: np.ndarray


@dataclass(frozen=True)
class Allocation:
    """a_bits per layer and phase, its amortized GBops per step and its predicted error."""

    bits: dict[str, tuple[int, ...]]
    gbops: float
    error: float


@dataclass(frozen=True)
class SearchResult:
    found: Allocation
    frontier: list[tuple[float, float]]  # (GBops, predicted error) along the downgrades
    uniform: dict[int, tuple[float, float]]  # every searched layer at one width: (GBops, error)
    phases: tuple[tuple[int, int], ...]  # [start, stop) steps of each phase


def check_widths(widths: list[int]) -> tuple[int, ...]:
    """Candidate widths, ascending and distinct, each a quantized activation width."""
    bad = [w for w in widths if not MIN_BITS <= w <= MAX_BITS]
    if bad or not widths:
        raise SearchError(f"--bits: expected widths in {MIN_BITS}-{MAX_BITS}, got {', '.join(map(str, widths))}")
    return tuple(sorted(set(widths)))


def searchable_layers(plan: Plan, model: nn.Module) -> list[LayerPlan]:
    """The layers of `model` whose activation bits the search allocates: those the base recipe
    quantizes at one width with a runtime base quantizer (attention operands keep the base
    recipe's widths); refuses a base it cannot start from."""
    if plan.blocks or any(layer.zero_bit_steps or layer.bit_steps for layer in plan.layers.values()):
        raise SearchError(
            f"recipe {plan.recipe.name} has steps rules or cached blocks; search writes its own step schedule, "
            "so start it from a recipe without them"
        )
    layers = [
        layer
        for layer in plan.layers.values()
        if layer.has_weight and layer.settings.a_bits not in (FLOAT_BITS, SKIP_BITS)
    ]
    if not layers:
        raise SearchError(f"recipe {plan.recipe.name} quantizes no activation: nothing to allocate")
    # the passes run each layer alone with float weights: those must need no calibration data
    measured = _float_weights(plan.recipe, [(layer, layer.settings.a_bits) for layer in layers], plan.recipe.name)
    calibrated = first_calibrated_layer(measured, model)
    if calibrated:
        raise SearchError(
            f"recipe {plan.recipe.name}: {calibrated} needs calibration data even with float weights; search "
            "measures with runtime activation quantizers (dynamic, torchao_int4, or weights-only "
            "reconstructions such as adaround and gptq)"
        )
    return layers


def phase_ranges(steps: int, phases: int) -> tuple[tuple[int, int], ...]:
    """`phases` consecutive [start, stop) step ranges of (nearly) equal length."""
    if not 1 <= phases <= steps:
        raise SearchError(f"--phases: expected 1 to {steps} (the steps), got {phases}")
    edges = [round(steps * k / phases) for k in range(phases + 1)]
    return tuple(zip(edges[:-1], edges[1:]))


class _Recorder(nn.Module):
    """The model, keeping each call's input, timestep and ε prediction."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.calls: list[tuple[Tensor, Tensor, Tensor]] = []

    def forward(self, x: Tensor, t: Tensor) -> Any:
        out = self.model(x, t)
        self.calls.append((x, t, out.sample))
        return out


def float_trajectory(
    model: nn.Module, sampler: str, training: dict[str, Any] | None, steps: int, samples: int, seed: int
) -> list[tuple[Tensor, Tensor, Tensor]]:
    """(model input, t, ε) of each step of full-precision sampling from seeded noise, through the
    harness's own sampling loop (so stochastic samplers and input scaling are as in `eval`)."""
    recorder = _Recorder(model)
    noise = torch.randn(samples, *sample_shape(model), generator=torch.Generator().manual_seed(seed))
    sample(recorder, noise, make_scheduler(sampler, training), steps, seed=seed, progress=False)
    return recorder.calls


def measure_sensitivity(
    model: nn.Module,
    recipe: Recipe,
    layers: list[LayerPlan],
    widths: tuple[int, ...],
    trajectory: list[tuple[Tensor, Tensor, Tensor]],
) -> Sensitivity:
    """One teacher-forced pass per (layer of `searchable_layers`, width); see the module docstring."""
    errors = np.zeros((len(layers), len(widths), len(trajectory)))
    runs = [(i, j) for i in range(len(layers)) for j in range(len(widths))]
    for i, j in tqdm(runs, desc="sensitivity (layer x width)", unit="pass"):
        quantized = convert(prepare(copy.deepcopy(model), _alone(recipe, layers[i], widths[j])))
        with sampling(quantized):
            for step, (x, t, eps) in enumerate(trajectory):
                error = (quantized(x, t).sample - eps).pow(2).sum() / eps.pow(2).sum().clamp_min(1e-30)
                errors[i, j, step] = float(error)
    return Sensitivity(tuple(layer.name for layer in layers), widths, errors)


def _alone(recipe: Recipe, layer: LayerPlan, bits: int) -> Recipe:
    """The recipe with only `layer` quantized, as one sensitivity pass runs it."""
    return _float_weights(recipe, [(layer, bits)], f"{recipe.name}@{layer.name}:a{bits}")


def _float_weights(recipe: Recipe, widths: list[tuple[LayerPlan, int]], name: str) -> Recipe:
    """The recipe with only these layers quantized: each layer's resolved settings at its width,
    float weights (the search allocates activation bits), every other layer float and untouched."""
    untouched = recipe.overriding({"scheme": "plain", "w_bits": FLOAT_BITS, "a_bits": FLOAT_BITS}, recipe.name)
    rules = []
    for layer, bits in widths:
        settings = {f.name: getattr(layer.settings, f.name) for f in fields(LayerSettings)}
        settings.update(a_bits=bits, w_bits=FLOAT_BITS)
        rules.append(
            Rule(patterns=(layer.name,), settings=settings, setting_locations={}, steps=None, location=_SEARCH_RULE)
        )
    return Recipe(
        name=name,
        description="",
        strict=True,
        defaults=untouched.defaults,
        default_locations={},
        rules=tuple(rules),
        source=recipe.source,
    )


def allocate(
    sensitivity: Sensitivity,
    plan: Plan,
    entries: list[MacEntry],
    steps: int,
    phases: int,
    budget: float,
    conventions: BopsConventions = DEFAULT_CONVENTIONS,
) -> SearchResult:
    """Greedy downgrades from the widest allocation to the narrowest; the found allocation is the
    first within the budget (GBops per step, amortized)."""
    ranges = phase_ranges(steps, phases)
    widths, layers = sensitivity.widths, sensitivity.layers
    # error[l, w, p]: the phase's share of the squared relative error per step, averaged over the
    # trajectory (so that totals compare across phase counts); step 0 runs in float under a
    # full-precision first step, but a quantized one counts it: keep every step
    error = np.stack([sensitivity.errors[:, :, start:stop].sum(axis=2) / steps for start, stop in ranges], axis=2)
    # cost[l, w, p]: GBops per step, amortized, of the layer's work in the phase at that width
    macs = np.array([_layer_macs(entries, name, conventions) for name in layers])
    w_bits = np.array([charged_width(plan.layers[name].settings.w_bits, conventions) for name in layers])
    counted = np.array([stop - start - (start == 0) for start, stop in ranges])  # step 0 is charged as it runs
    cost = (macs * w_bits)[:, None, None] * np.array(widths)[None, :, None] * counted[None, None, :] / steps / 1e9
    fixed = uniform_gbops(plan, entries, steps, widths[-1], conventions, sensitivity.layers) - cost[:, -1, :].sum()
    choice = np.full((len(layers), phases), len(widths) - 1)
    rows, columns = np.indices(choice.shape)

    def totals() -> tuple[float, float]:
        return fixed + float(cost[rows, choice, columns].sum()), float(error[rows, choice, columns].sum())

    frontier, found = [totals()], None
    while True:  # on to the narrowest allocation, so that the frontier is whole
        if found is None and frontier[-1][0] <= budget * (1 + 1e-9):  # sums of floats: a budget met exactly
            found = Allocation(
                {name: tuple(widths[k] for k in choice[i]) for i, name in enumerate(layers)}, *frontier[-1]
            )
        lower = np.maximum(choice - 1, 0)
        saved = cost[rows, choice, columns] - cost[rows, lower, columns]
        lost = error[rows, lower, columns] - error[rows, choice, columns]
        ratio = np.where(choice > 0, lost / np.maximum(saved, 1e-30), np.inf)
        if not np.isfinite(ratio).any():
            break
        layer, phase = np.unravel_index(np.argmin(ratio), ratio.shape)
        choice[layer, phase] -= 1
        frontier.append(totals())
    if found is None:
        raise _over_budget(budget, frontier[-1][0], widths[0])
    uniform = {
        width: (fixed + float(cost[:, k, :].sum()), float(error[:, k, :].sum())) for k, width in enumerate(widths)
    }
    return SearchResult(found, frontier, uniform, ranges)


def _layer_macs(entries: list[MacEntry], name: str, conventions: BopsConventions) -> int:
    """MACs charged at the layer's bits: its own, and its attention's products when charged so."""
    return sum(
        e.macs for e in entries if e.charged_as == name and (e.kind == "layer" or conventions.attention == "layer")
    )


def check_budget(
    budget: float,
    plan: Plan,
    entries: list[MacEntry],
    steps: int,
    narrowest: int,
    conventions: BopsConventions,
    searched: tuple[str, ...],
) -> None:
    """Refuse a budget below the cost of every searched layer at the narrowest width, before the
    sensitivity pass (`allocate` would find no allocation)."""
    cost = uniform_gbops(plan, entries, steps, narrowest, conventions, searched)
    if budget < cost:
        raise _over_budget(budget, cost, narrowest)


def _over_budget(budget: float, cost: float, narrowest: int) -> SearchError:
    return SearchError(
        f"budget {budget:.4g} GBops per step is below {cost:.4g}, the cost with every searched layer at "
        f"{narrowest} bits; lower --bits or raise the budget"
    )


def uniform_gbops(
    plan: Plan, entries: list[MacEntry], steps: int, bits: int, conventions: BopsConventions, searched: tuple[str, ...]
) -> float:
    """Amortized GBops per step with every `searched` layer at `bits`."""
    layers = {
        name: replace(layer, settings=layer.settings.updated({"a_bits": bits})) if name in searched else layer
        for name, layer in plan.layers.items()
    }
    uniform = Plan(plan.recipe, layers, plan.blocks, plan.unmatched, plan.unwrapped)
    return count_bops(entries, uniform, steps, conventions).gbops_per_step_amortized


def recipe_text(result: SearchResult, base: str, budget: float, description: str) -> str:
    """The found allocation as a recipe extending `base` (a shipped name, or a file, written as
    its absolute path so that the recipe reads the same from any folder): one rule per distinct
    schedule."""
    base = str(Path(base).resolve()) if Path(base).is_file() else base
    groups: dict[tuple[int, ...], list[str]] = {}
    for name, bits in result.found.bits.items():
        groups.setdefault(bits, []).append(name)
    lines = [
        f"# found by modiff-quant search: {description}",
        f"# budget {budget:.6g} GBops per image-step (amortized), found {result.found.gbops:.6g}, "
        f"predicted error {result.found.error:.4g} (Σ over layers of the mean squared relative ε error per step)",
        "version: 1",
        f"extends: {json.dumps(base)}",
        f"description: {json.dumps('search: ' + description)}",
        "rules:",
    ]
    for bits, names in groups.items():
        match = json.dumps(names)
        if len(set(bits)) == 1:
            lines += [f"  - match: {match}", f"    a_bits: {bits[0]}"]
            continue
        for (start, stop), width in zip(result.phases, bits):
            lines += [f"  - match: {match}", f"    a_bits: {width}", f"    steps: {{start: {start}, stop: {stop}}}"]
    return "\n".join(lines) + "\n"


def sensitivity_key(model: nn.Module, plan: Plan, widths: tuple[int, ...], setting: dict[str, Any]) -> str:
    """What a sensitivity table depends on: weights, the base plan, widths and the trajectories."""
    digest = hashlib.sha256(f"modiff-quant sensitivity {CACHE_FORMAT} {__version__}".encode())
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode() + tensor_bytes(tensor))
    digest.update(json.dumps([plan_document(plan), list(widths), setting], sort_keys=True, default=str).encode())
    return digest.hexdigest()


def load_cached(path: Path, layers: tuple[str, ...], widths: tuple[int, ...], steps: int) -> Sensitivity | None:
    """The cached table at `path`, or None when it is missing; a file that is not exactly such a
    table (damaged, crafted, of another search) raises SearchError naming it."""
    if not path.is_file():
        return None
    if path.stat().st_size > MAX_CACHE_BYTES:
        raise SearchError(f"{path}: larger than any sensitivity table ({MAX_CACHE_BYTES} bytes); delete it")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        errors = np.array(data["errors"], dtype=np.float64)
        valid = (
            data.get("format") == CACHE_FORMAT
            and tuple(data["layers"]) == layers
            and tuple(data["widths"]) == widths
            and errors.shape == (len(layers), len(widths), steps)
            and bool(np.isfinite(errors).all() and (errors >= 0).all())
        )
    except (ValueError, KeyError, TypeError) as exc:
        raise SearchError(f"{path}: not a sensitivity table ({exc}); delete it") from None
    if not valid:
        raise SearchError(f"{path}: a sensitivity table of another search or damaged; delete it")
    return Sensitivity(layers, widths, errors)


def save_cached(path: Path, sensitivity: Sensitivity) -> None:
    """Write the table whole or not at all: a concurrent search never reads half of it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {
        "format": CACHE_FORMAT,
        "layers": list(sensitivity.layers),
        "widths": list(sensitivity.widths),
        "errors": sensitivity.errors.tolist(),
    }
    replace_file(path, json.dumps(data).encode("utf-8"))


def budget_of(
    recipe: str, model: nn.Module, entries: list[MacEntry], steps: int, conventions: BopsConventions
) -> float:
    """The amortized GBops per step of a recipe on the model: a budget given as a recipe."""
    plan = load_recipe(recipe).resolve(model)
    return count_bops(entries, plan, steps, conventions).gbops_per_step_amortized
