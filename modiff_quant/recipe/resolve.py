"""Matching a recipe against a model: which settings each layer gets, which blocks are cached.

A rule that matches Linear/Conv layers sets layer settings; a rule that matches other modules
(e.g. a UNet up block) is a block rule, whose only setting is 0-bit skipping on a step
schedule. Everything a layer cannot support is reported here, before the model is changed.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path

from torch import nn

from ..adoption import Adoption, adopt
from ..attention_products import AttentionOperand, attention_operands
from ..base_quantizer import UnsupportedSetting
from ..layer_parts import CHANNEL_DIMS, build_parts, input_width, layer_type_named, needs_calibration, splits
from ..quant import FLOAT_BITS, SKIP_BITS, is_packed
from ..registry import nearest
from ..settings import LayerSettings, StepSchedule
from .schema import Recipe, Rule
from .source import Location, RecipeError


@dataclass(frozen=True)
class LayerPlan:
    """The resolved settings of one Linear/Conv layer and the recipe lines they came from."""

    name: str
    module_type: str
    settings: LayerSettings
    zero_bit_steps: tuple[StepSchedule, ...]
    rules: tuple[Location, ...]
    weight_note: str | None = None  # the base quantizer's note on how the weight is stored (explain)
    adopted_from: str | None = None  # the foreign quantized layer this one was (see modiff_quant.adoption)
    bit_steps: tuple[tuple[StepSchedule, int], ...] = ()  # (steps, a_bits) of `steps` rules, in rule order

    def a_bits_at(self, step: int) -> int:
        """The activation bits of `step`: 0 where a 0-bit rule contains it (a skip is never undone),
        else those of the last `steps` rule containing it, else the layer's `a_bits`."""
        if any(schedule.contains(step) for schedule in self.zero_bit_steps):
            return SKIP_BITS
        return next(
            (bits for schedule, bits in reversed(self.bit_steps) if schedule.contains(step)), self.settings.a_bits
        )

    def skips(self, step: int) -> bool:
        """True when this step is 0-bit for the layer (its cached output is reused)."""
        return self.a_bits_at(step) == SKIP_BITS

    @property
    def activation_widths(self) -> tuple[int, ...]:
        """The activation bit-widths the layer computes at: its `a_bits`, then each other width a
        step schedule sets. Each width gets its own activation quantizers (and calibrated scales)."""
        return tuple(dict.fromkeys((self.settings.a_bits, *(bits for _, bits in self.bit_steps))))

    def width_index(self, step: int) -> int:
        """Index in `activation_widths` of the quantizers that run at `step` (0 on skipped steps)."""
        bits = self.a_bits_at(step)
        return 0 if bits == SKIP_BITS else self.activation_widths.index(bits)

    def describe_steps(self) -> str:
        """The layer's steps rules, e.g. `0..9: 6, 90..99: 0` ('-' without any; `all: 0` when it
        always skips)."""
        if self.settings.a_bits == SKIP_BITS and not self.bit_steps:
            return "all: 0"
        scheduled = [*((steps, SKIP_BITS) for steps in self.zero_bit_steps), *self.bit_steps]
        return ", ".join(f"{steps}: {_format_bits(bits)}" for steps, bits in scheduled) or "-"

    @property
    def has_weight(self) -> bool:
        """False for the operand of an attention product (quantized activations only)."""
        return self.module_type != AttentionOperand.__name__

    @property
    def quantizes_weight(self) -> bool:
        """A weight, quantized (what a weights-only reconstruction needs data for)."""
        return self.has_weight and self.settings.w_bits != FLOAT_BITS

    @property
    def has_skips(self) -> bool:
        return self.settings.a_bits == SKIP_BITS or bool(self.zero_bit_steps)

    @property
    def leaves_float(self) -> bool:
        """True when the layer computes exactly as before (plain, float weights and activations,
        never skipped, not adopted): `prepare` then leaves the module untouched."""
        s = self.settings
        return (
            s.scheme == "plain"
            and s.w_bits == s.a_bits == FLOAT_BITS
            and not self.zero_bit_steps
            and not self.bit_steps
            and self.adopted_from is None
        )


@dataclass(frozen=True)
class BlockPlan:
    """A module whose whole output is reused on the steps of `schedule` (with `skip_threshold`:
    only while its input changed by less than that, relative to its last computed call)."""

    name: str
    module_type: str
    schedule: StepSchedule
    rule: Location
    skip_threshold: float | None = None

    def always_skips(self, step: int) -> bool:
        """True when the block is skipped at `step` whatever its input (no threshold)."""
        return self.skip_threshold is None and self.schedule.contains(step)


@dataclass(frozen=True)
class Plan:
    recipe: Recipe
    layers: Mapping[str, LayerPlan]
    blocks: Mapping[str, BlockPlan]
    unmatched: tuple[Rule, ...]
    unwrapped: tuple[str, ...]  # subclasses of Linear/Conv that no rule named: left float

    def explain(self) -> str:
        return _explain(self)


def resolve(recipe: Recipe, model: nn.Module) -> Plan:
    modules = [(name, module) for name, module in model.named_modules() if name]
    layers = {name: module for name, module in modules if type(module) in CHANNEL_DIMS}
    subclassed = {
        name: module for name, module in modules if isinstance(module, tuple(CHANNEL_DIMS)) and name not in layers
    }
    adopted = {name: adoption for name, module in subclassed.items() if (adoption := adopt(module)) is not None}
    layers.update({name: subclassed[name] for name in adopted})
    # operands of attention products: matched like layers, quantized only where a rule names them
    present = dict(modules)
    operands = {name: present.get(name) or AttentionOperand() for name in attention_operands(model)}
    modules += [(name, module) for name, module in operands.items() if name not in present]
    layers.update(operands)
    # e.g. nn.MultiheadAttention's out_proj: its owner uses the weight directly, so wrapping is impossible
    unwrapped = [name for name in subclassed if name not in adopted]
    values: dict[str, dict[str, object]] = {
        name: dict(adopted[name].settings) if name in adopted else {} for name in layers
    }
    sources: dict[str, dict[str, Location]] = {name: dict(recipe.default_locations) for name in layers}
    hits: dict[str, list[Location]] = {name: [] for name in layers}
    zero_steps: dict[str, list[StepSchedule]] = {name: [] for name in layers}
    bit_steps: dict[str, list[tuple[StepSchedule, int]]] = {name: [] for name in layers}
    bit_step_rules: dict[str, dict[int, Location]] = {name: {} for name in layers}  # width -> first rule setting it
    blocks: dict[str, BlockPlan] = {}
    unmatched: list[Rule] = []
    for rule in recipe.rules:
        matched = [(name, module) for name, module in modules if rule.matches(name, module)]
        named_unwrapped = [name for name, _ in matched if name in unwrapped]
        if named_unwrapped:
            raise RecipeError(
                rule.location,
                f"rule '{rule.describe()}' matches {_some(named_unwrapped)}, subclasses of Linear/Conv that cannot be "
                "wrapped "
                "(their owners may use the weight directly); only exact nn.Linear/Conv1d/Conv2d are quantized",
            )
        matched_layers = [name for name, _ in matched if name in layers]
        matched_blocks = [(name, module) for name, module in matched if name not in layers]
        if not matched:
            unmatched.append(rule)
        elif matched_layers and matched_blocks:
            raise RecipeError(
                rule.location,
                f"rule '{rule.describe()}' matches both layers ({_some(matched_layers)}) and blocks "
                f"({_some([n for n, _ in matched_blocks])}); narrow the pattern to one kind",
            )
        elif matched_blocks:
            if rule.settings != {"a_bits": SKIP_BITS}:
                raise RecipeError(
                    rule.location,
                    f"rule '{rule.describe()}' matches blocks ({_some([n for n, _ in matched_blocks])}), which only "
                    "take a_bits: 0 with steps; match their Linear/Conv layers by name to quantize them",
                )
            for name, module in matched_blocks:
                blocks[name] = BlockPlan(
                    name, type(module).__name__, rule.steps or StepSchedule(), rule.location, rule.skip_threshold
                )
        elif rule.skip_threshold is not None:
            raise RecipeError(
                rule.location,
                f"rule '{rule.describe()}' sets skip_threshold, which applies to blocks, but matches layers "
                f"({_some(matched_layers)})",
            )
        elif "w_bits" in rule.settings and all(name in operands for name in matched_layers):
            raise RecipeError(
                rule.setting_locations["w_bits"],
                f"rule '{rule.describe()}' sets w_bits, but matches attention operands only "
                f"({_some(matched_layers)}), which have no weight",
            )
        else:
            for name in matched_layers:
                hits[name].append(rule.location)
                if rule.steps is not None and rule.settings["a_bits"] == SKIP_BITS:
                    zero_steps[name].append(rule.steps)
                elif rule.steps is not None:
                    bit_steps[name].append((rule.steps, rule.settings["a_bits"]))
                    bit_step_rules[name].setdefault(rule.settings["a_bits"], rule.location)
                else:
                    values[name].update(rule.settings)
                    sources[name].update(rule.setting_locations)
    _report_unmatched(recipe, unmatched, modules)
    plans = {}
    for name, module in layers.items():
        if name in operands and not hits[name]:
            continue
        settings = recipe.defaults.updated(values[name] | ({"w_bits": FLOAT_BITS} if name in operands else {}))
        adoption = adopted.get(name)
        layer_type = adoption.layer_type if adoption else type(module)
        plan = LayerPlan(
            name,
            layer_type.__name__,
            settings,
            tuple(zero_steps[name]),
            tuple(hits[name]),
            None,
            _describe_adoption(adoption),
            tuple(bit_steps[name]),
        )
        note = _check_layer(plan, module, layer_type, sources[name], bit_step_rules[name])
        plans[name] = replace(plan, weight_note=note)
    return Plan(recipe, plans, blocks, tuple(unmatched), tuple(unwrapped))


def _some(names: list[str], limit: int = 3) -> str:
    shown = ", ".join(names[:limit])
    return f"{shown}, ... {len(names)} in all" if len(names) > limit else shown


def _report_unmatched(recipe: Recipe, unmatched: list[Rule], modules: list[tuple[str, nn.Module]]) -> None:
    for rule in unmatched:
        message = f"rule '{rule.describe()}' matches no module of the model{_suggest(rule, modules)}"
        if recipe.strict:
            raise RecipeError(rule.location, f"{message} (strict: true)")
        warnings.warn(f"{rule.location}: {message}", UserWarning, stacklevel=4)


def _suggest(rule: Rule, modules: list[tuple[str, nn.Module]], limit: int = 3) -> str:
    """Nearest module or class names to each of the first `limit` patterns, those the message shows
    (for a regex, to its literal prefix: the split is one linear scan, whatever the pattern)."""
    suggestions: list[str] = []
    for pattern in rule.patterns[:limit]:
        text = (
            re.split(r"(?<!\\)[\[\](){}*+?|^$]|\\[dDwWsSb]", pattern.removeprefix("re:"))[0]
            .replace("\\.", ".")
            .rstrip(".")
        )
        depth = text.count(".") + 1
        candidates = {".".join(name.split(".")[:depth]) for name, _ in modules} | {
            type(m).__name__ for _, m in modules
        }
        suggestions += nearest(text, sorted(candidates)) if text else []
    return f"; nearest names: {', '.join(dict.fromkeys(suggestions))}" if suggestions else ""


def _describe_adoption(adoption: Adoption | None) -> str | None:
    if adoption is None:
        return None
    return adoption.origin + (f" (not applied: {', '.join(adoption.not_applied)})" if adoption.not_applied else "")


def _check_layer(
    plan: LayerPlan,
    module: nn.Module,
    layer_type: type[nn.Module],
    sources: Mapping[str, Location],
    width_rules: Mapping[int, Location],
) -> str | None:
    """Reject what the layer cannot do; return the base quantizer's note on its weight.

    `width_rules`: the `steps` rule that set each scheduled activation width, blamed for what
    the base quantizer refuses at that width."""
    name, settings = plan.name, plan.settings

    def fail(key: str, message: str, where: Location | None = None) -> None:
        raise RecipeError(where or sources.get(key), f"layer '{name}' ({type(module).__name__}): {message}")

    if isinstance(module, AttentionOperand):
        _check_operand(plan, fail)
    weight = getattr(module, "weight", None)
    packed_note = None
    if weight is not None and is_packed(weight.data):  # e.g. a torchao tensor subclass from quantize_
        if settings.w_bits != FLOAT_BITS:
            fail("w_bits", f"its weight is already quantized ({type(weight).__name__}); set w_bits: float for it")
        packed_note = f"{type(weight).__name__} (quantized before prepare)"
    if settings.corrects_bias and weight is not None and module.bias is None:
        fail("w_bias_correction", "it has no bias to take the weight error's mean; set w_bias_correction: false")
    group = settings.a_granularity
    if group.kind == "group" and weight is not None and input_width(module) % group.group_size:
        fail(
            "a_granularity",
            f"{group} needs an input channel count divisible by {group.group_size}, got {input_width(module)}",
        )
    if settings.first_step.kind != "fp" and settings.a_bits == SKIP_BITS:
        fail("first_step", f"first_step {settings.first_step} quantizes the first input, but a_bits is 0 (skip)")
    if settings.first_step.kind == "warmup" and not settings.error_compensation:
        fail("first_step", "warm-up refines the reconstructed input, which needs error_compensation: true")
    try:
        _, base_quantizer, quantizers = build_parts(settings, layer_type, plan.activation_widths)
    except (TypeError, ValueError) as exc:
        fail("base_quantizer", str(exc))
    for bits in plan.activation_widths:
        try:
            base_quantizer.check_layer(module, settings.weight_spec(), settings.activation_spec(bits))
        except UnsupportedSetting as exc:
            rule = width_rules.get(bits) if bits != settings.a_bits else None
            scheduled = f" (a_bits {_format_bits(bits)} on the steps of this rule)" if rule else ""
            fail(exc.setting, f"base quantizer '{settings.base_quantizer}'{scheduled}: {exc}", rule)
    calibrated = needs_calibration(quantizers)
    if settings.timestep_groups.count > 1 and not calibrated:
        fail(
            "timestep_groups",
            f"base quantizer '{settings.base_quantizer}' computes scales per call; timestep groups apply to "
            "calibrated scales only",
        )
    if settings.first_step.kind == "warmup" and calibrated:
        fail(
            "first_step",
            f"warm-up with the calibrated base quantizer '{settings.base_quantizer}' would be a no-op: its static "
            "delta scale is sized for temporal differences, so the warm-up residual rounds to zero; use first_step: "
            "quantized or a dynamic base quantizer",
        )
    return packed_note or (None if weight is None else base_quantizer.weight_note(module, settings.weight_spec()))


def _check_operand(plan: LayerPlan, fail: Callable[..., None]) -> None:
    """An operand has no weight and runs every step: its product needs both operands, and its
    size per sample is known only when it runs."""
    settings = plan.settings
    if plan.has_skips:
        fail(
            "a_bits",
            "an attention operand cannot be 0-bit (its product is recomputed from both operands each step); cache "
            "the attention block instead",
            plan.rules[-1] if plan.zero_bit_steps else None,
        )
    if settings.a_granularity.kind in ("channel", "group"):
        fail(
            "a_granularity", f"an attention operand takes a_granularity tensor or sample, got {settings.a_granularity}"
        )


def _format_base(name: str, options: Mapping[str, object]) -> str:
    """`name{option: value}`; classes (e.g. Brevitas injectors) by their name."""
    shown = ", ".join(f"{key}: {getattr(value, '__name__', value)}" for key, value in options.items())
    return f"{name}{{{shown}}}" if shown else name


def _format_bits(bits: int) -> str:
    return "float" if bits == FLOAT_BITS else str(bits)


def _explain(plan: Plan) -> str:
    recipe = plan.recipe
    header = (
        "layer",
        "type",
        "scheme",
        "base",
        "W",
        "A",
        "a_gran",
        "t-groups",
        "split",
        "first",
        "EC",
        "A by step",
        "rules",
    )
    rows = []
    for layer in plan.layers.values():
        s = layer.settings
        modiff = s.scheme == "modiff"
        rows.append(
            (
                layer.name,
                layer.module_type,
                s.scheme,
                _format_base(s.base_quantizer, s.base_quantizer_options),
                _format_bits(s.w_bits) + ("+bc" if s.corrects_bias else "") if layer.has_weight else "-",
                _format_bits(s.a_bits) + ("" if s.a_symmetric else "u"),
                str(s.a_granularity),
                str(s.timestep_groups.count),
                "on" if splits(s, layer_type_named(layer.module_type)) else "-",
                str(s.first_step) if modiff else "-",
                ("on" if s.error_compensation else "off") if modiff else "-",
                layer.describe_steps(),
                ", ".join(f"{Path(loc.file).name}:{loc.line}" for loc in layer.rules) or "defaults",
            )
        )
    strict = " strict" if recipe.strict else ""
    lines = [f"recipe {recipe.name} ({recipe.source}){strict}: {recipe.description}".rstrip(": ")]
    lines += _table(header, rows)
    operands = sum(not layer.has_weight for layer in plan.layers.values())
    counted = f"{len(plan.layers) - operands} layers" + (
        f" and {operands} attention operands (W -: no weight)" if operands else ""
    )
    lines.append(
        f"{counted}; W bits: '+bc' = bias correction; A bits: 'u' = asymmetric; A by step: steps rules (0-bit "
        "steps are skipped whatever later rules say, otherwise the last rule containing a step sets its bits); "
        "split: separate quantizers where the input is a concatenation (found at convert); rules: recipe file:line "
        "of each rule that applied"
    )
    if recipe.adapted:
        lines += ["", "adapted to the swapped-in base quantizer (settings inherited from shipped recipes)"]
        lines += [f"  {note}" for note in recipe.adapted]
    adopted = [(layer.name, layer.adopted_from) for layer in plan.layers.values() if layer.adopted_from]
    if adopted:
        lines += ["", "adopted layers (their own quantizers set the starting settings; recipe rules override them)"]
        lines += _table(("layer", "was"), adopted)
    notes = [(layer.name, layer.weight_note) for layer in plan.layers.values() if layer.weight_note]
    if notes:
        lines += ["", "weight storage (as the base quantizer keeps it)"]
        lines += _table(("layer", "weight"), notes)
    if plan.blocks:
        lines += ["", "cached blocks (0-bit: output reused without calling the block)"]
        rows = [
            (
                b.name,
                b.module_type,
                str(b.schedule),
                "-" if b.skip_threshold is None else f"change < {b.skip_threshold:g}",
                str(b.rule),
            )
            for b in plan.blocks.values()
        ]
        lines += _table(("block", "type", "0-bit steps", "skip when", "rule"), rows)
    if plan.unwrapped:
        lines.append(f"left float (subclasses of Linear/Conv, not wrappable): {', '.join(plan.unwrapped)}")
    for rule in plan.unmatched:
        lines.append(f"warning: {rule.location}: rule '{rule.describe()}' matches nothing")
    return "\n".join(lines)


def _table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> list[str]:
    widths = [max(len(r[i]) for r in (header, *rows)) for i in range(len(header))]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return [
        fmt.format(*header).rstrip(),
        fmt.format(*("-" * w for w in widths)).rstrip(),
        *(fmt.format(*r).rstrip() for r in rows),
    ]
