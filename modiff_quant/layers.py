"""Quantized Linear/Conv layers: the original module, re-classed in place by `prepare()`.

Re-classing (as torch's parametrize does) keeps the module object, its parameters, its name in
the model and `isinstance(m, nn.Conv2d)`, so code around the model keeps working.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Hashable
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .adoption import adopt
from .attention_products import AttentionOperand
from .base_quantizer import ActivationQuantizer, BaseQuantizer, SplitActivationQuantizer
from .integer_kernels import InputGroupedWeights, IntegerWeights, UnsupportedWeights, pack_weights
from .layer_parts import build_parts, needs_data, splits
from .quant import FLOAT_BITS, SKIP_BITS, Codes, QuantSpec, is_packed
from .recipe import LayerPlan
from .schemes import DELTA, RAW, Scheme
from .state_storage import LayerState, LayerStates
from .tensors import tensor_bytes
from .trajectory import Mode, Tracker

_FLOAT_WEIGHT_MODES = (Mode.CALIBRATING, Mode.OBSERVING, Mode.REFERENCE)

Execution = Literal["fake", "integer"]


def _code_bounds(spec: QuantSpec) -> tuple[int, int]:
    """Bounds of c − z known from the spec: compiled code splits the codes by them without a
    measuring pass (8-bit asymmetric codes, spanning 511 values, go in pieces)."""
    return (spec.qmin, spec.qmax) if spec.symmetric else (spec.qmin - spec.qmax, spec.qmax - spec.qmin)


class QuantizedLayer(nn.Module):
    """Behaviour shared by `QuantLinear`, `QuantConv1d` and `QuantConv2d`."""

    plan: LayerPlan
    scheme: Scheme
    base_quantizer: BaseQuantizer
    act_quantizers: nn.ModuleDict
    split_enabled: bool
    split_at: int | None
    staged_weight: Tensor | None
    _tracker: Tracker
    _slot: int

    def _setup(self, plan: LayerPlan, tracker: Tracker, layer_type: type[nn.Module]) -> None:
        self.plan = plan
        self.scheme, self.base_quantizer, quantizers = build_parts(plan.settings, layer_type, plan.activation_widths)
        self.act_quantizers = nn.ModuleDict({role: nn.ModuleList(group) for role, group in quantizers.items()})
        self.split_enabled = splits(plan.settings, layer_type)
        self.split_at = None  # input channels of the first part of a concatenated input, once detected
        self.staged_weight = None  # inside convert(): the quantized weight, before it replaces the float one
        self._tracker = tracker
        self._slot = tracker.add(self)
        self.integer: IntegerWeights | InputGroupedWeights | None = None  # set by `set_execution("integer")`
        self.source_weight_digest: str | None = None  # of the float weight a packed weight was made from

    @property
    def calibrates(self) -> bool:
        """True when the base quantizer learns from calibration data for this layer (static
        activation scales, or a reconstruction)."""
        return needs_data(
            self.act_quantizers, self.base_quantizer, split=False, quantized_weight=self.plan.quantizes_weight
        )

    @property
    def frozen(self) -> bool:
        """True when every activation quantizer that calibrates holds its frozen parameters."""
        return all(q.frozen_state() for q in self.all_quantizers() if q.needs_calibration and not q.spec.is_float)

    @property
    def needs_calibration(self) -> bool:
        """True when convert() needs calibration data: to learn from, mean inputs for a bias
        correction, or a split to detect."""
        return (
            needs_data(self.act_quantizers, self.base_quantizer, self.split_enabled, self.plan.quantizes_weight)
            or self.corrects_bias
        )

    @property
    def corrects_bias(self) -> bool:
        """True when convert() moves the quantized weight's mean error into the bias (`w_bias_correction`)."""
        return self.plan.has_weight and self.plan.settings.corrects_bias

    def forward(self, x: Tensor) -> Tensor:
        tracker = self._tracker
        mode = tracker.mode
        if mode.stateless:
            return self.apply_op(x, bias=True)
        if mode is Mode.PREPARED:
            raise RuntimeError(
                f"{self.plan.name}: the model is prepared but not converted; call modiff_quant.convert(model) "
                "(after running the sampling loop inside modiff_quant.calibrate(model) for calibrated base quantizers)"
            )
        lane = tracker.lane()
        skip, _ = tracker.phase(self._slot)
        repeat = lane.visits.get(self._slot, 0)  # a layer called again in one model call: another call site
        lane.visits[self._slot] = repeat + 1
        state = tracker.state(self._slot).at(lane.call_branch, repeat)
        if state.started and state.input_shape != x.shape:
            raise RuntimeError(
                f"{self.plan.name}: input shape changed from {list(state.input_shape)} to {list(x.shape)} "
                "within a trajectory (e.g. another prompt length); call modiff_quant.reset(model) between runs "
                "or wrap each in modiff_quant.sampling(model)"
            )
        if mode is Mode.OBSERVING:
            return self.scheme.calibrate(self, x, state, skip, observe=self in tracker.observing)
        if mode is Mode.PRIMING:
            return self.scheme.prime(self, x, state)
        return self.scheme.forward(self, x, state, skip)

    def phase(self, step: int, timestep: float | None) -> tuple[bool, int]:
        """(whether `step` is 0-bit, the index of the activation quantizers that apply: those of the
        step's activation width and of the timestep's group)."""
        groups = self.plan.settings.timestep_groups
        return self.plan.skips(step), self.plan.width_index(step) * groups.count + groups.index(timestep)

    def new_state(self) -> LayerStates:
        return LayerStates(self.plan.settings.input_cache, self.plan.settings.output_cache)

    def states(self) -> dict[tuple[Hashable, int], LayerState]:
        """The calling thread's current state, per (branch, call site); for inspection."""
        found = self._tracker.lane().states.get(self._slot)
        return {} if found is None else dict(found.sites)

    def quantizer(self, role: str) -> ActivationQuantizer:
        """The activation quantizer of `role` for the step and timestep of the current model call."""
        _, index = self._tracker.phase(self._slot)
        return self.act_quantizers[role][index]

    def apply_op(self, x: Tensor, *, bias: bool) -> Tensor:
        """A(x): the layer's operation with its weight (quantized in place by `convert`; inside
        convert, the staged quantized weight except in the float modes)."""
        b = self.bias if bias else None
        weight = (
            self.weight
            if self.staged_weight is None or self._tracker.mode in _FLOAT_WEIGHT_MODES
            else self.staged_weight
        )
        return F.linear(x, weight, b) if isinstance(self, nn.Linear) else self._conv_forward(x, weight, b)

    def quantize_input(self, role: str, x: Tensor) -> tuple[Tensor, Codes | None]:
        """Q(x) by the quantizer of `role`, and under integer execution its codes and scale."""
        quantizer = self.quantizer(role)
        if self.integer is None or quantizer.spec.is_float:  # e.g. steps a schedule leaves float
            return quantizer(x), None
        centered, scale = quantizer.codes(x)
        return (centered * scale).to(x.dtype), (centered, scale, _code_bounds(quantizer.spec))

    def apply_quantized(
        self, q: Tensor, codes: Codes | None, *, bias: bool, accumulate: Tensor | None = None
    ) -> Tensor:
        """A(q) (+ bias) (+ accumulate): on the int8 kernels when `codes` of q are given."""
        if codes is None:
            out = self.apply_op(q, bias=bias)
            return out if accumulate is None else accumulate + out
        assert self.integer is not None
        centered, scale, bounds = codes
        out = self.integer.run(centered, scale, accumulate=accumulate, bounds=bounds)
        if bias and self.bias is not None:
            spatial_dims = 0 if isinstance(self, nn.Linear) else out.dim() - 2
            out = out + self.bias.view(-1, *[1] * spatial_dims)
        return out

    def set_execution(self, mode: Execution) -> None:
        """Run quantized products in float on dequantized values (`fake`) or on int8 codes
        (`integer`); raises ValueError naming this layer when it cannot run on integers."""
        self.integer = None
        s = self.plan.settings
        if mode == "fake" or set(self.plan.activation_widths) <= {FLOAT_BITS, SKIP_BITS}:
            return  # float or always-skipped activations: nothing to run on integers
        fail = f"{self.plan.name}: integer execution needs"
        if self.weight.device.type != "cpu":
            raise ValueError(
                f"{fail} the model on the CPU (oneDNN's int8 kernels), this layer is on {self.weight.device}"
            )
        if s.input_cache != "full" and s.scheme == "modiff" and s.error_compensation:
            raise ValueError(
                f"{fail} input_cache: full (a lossy â turns the increments into non-codes), got {s.input_cache}"
            )
        role = DELTA if s.scheme == "modiff" else RAW
        if any(q.codes(torch.zeros(1, 1, 1, 1)) is None for q in self.act_quantizers[role] if not q.spec.is_float):
            raise ValueError(
                f"{fail} activation scales per tensor or per sample from a min-max or static quantizer, "
                f"got a_granularity {s.a_granularity} ({s.base_quantizer})"
            )
        if self.packed:
            raise ValueError(f"{fail} float-stored quantized weights, but {s.base_quantizer} packed this one")
        try:
            group = s.w_granularity.group_size if s.w_granularity.kind == "group" else None
            self.integer = pack_weights(self, self.weight.detach(), s.w_bits, group)
        except UnsupportedWeights as exc:
            raise ValueError(f"{fail} per-channel (or whole-input-channel group) weights of 2-8 bits: {exc}") from None

    def set_split(self, split_at: int | None) -> None:
        """Record where a concatenated input divides (None: the input is no concatenation)."""
        self.split_at = split_at
        for quantizer in self.all_quantizers():
            if isinstance(quantizer, SplitActivationQuantizer):
                quantizer.split_at = split_at

    def all_quantizers(self) -> list[ActivationQuantizer]:
        return [quantizer for group in self.act_quantizers.values() for quantizer in group]

    def weight_parts(self) -> list[Tensor]:
        """The float weight, divided along its input channels where a split layer's input is."""
        weight = self.weight.detach()
        return (
            [weight]
            if self.split_at is None
            else list(weight.split([self.split_at, weight.shape[1] - self.split_at], dim=1))
        )

    def map_weight_parts(self, fn: Callable[[Tensor], Tensor]) -> Tensor:
        """`fn` applied to each part of `weight_parts()`, joined back into a full weight."""
        return join_weight_parts([fn(part) for part in self.weight_parts()])

    @torch.no_grad()
    def freeze(self) -> None:
        """Fix the activation quantizers from what their observers saw."""
        groups, widths = self.plan.settings.timestep_groups, self.plan.activation_widths
        for role, quantizers in self.act_quantizers.items():
            for index, quantizer in enumerate(quantizers):
                try:
                    quantizer.freeze()
                except RuntimeError as exc:
                    width, group = divmod(index, groups.count)
                    parts = [f"{role} quantizer"] * (groups.count > 1 or len(widths) > 1)
                    parts += [f"a_bits {widths[width]} (its steps of the schedule)"] * (len(widths) > 1)
                    parts += [groups.describe(group)] * (groups.count > 1)
                    where = f"{', '.join(parts)}: " if parts else ""
                    raise RuntimeError(f"{self.plan.name}: {where}{exc}") from exc

    @torch.no_grad()
    def stage_weight(self) -> None:
        """Quantize the weight with the base quantizer into `staged_weight` (reconstruction may
        replace it); `commit_weight` then overwrites the float weight."""
        spec = self.plan.settings.weight_spec()
        self.staged_weight = (
            self.weight.detach()
            if spec.is_float
            else self.map_weight_parts(lambda w: self.base_quantizer.quantize_weight(w, spec))
        )

    @torch.no_grad()
    def commit_weight(self) -> None:
        """Replace the float weight by the quantized one, once (as torchao's quantize_ does: the
        float weight is only needed before, by calibration): in place, or as a new parameter
        when the base quantizer returned a packed tensor subclass."""
        staged, self.staged_weight = self.staged_weight, None
        if staged is None:
            return
        if is_packed(staged):
            # a weight packed before prepare has no float weight to digest
            self.source_weight_digest = None if self.packed else weight_digest(self.weight)
            self.weight = nn.Parameter(staged, requires_grad=False)
        else:
            self.weight.copy_(staged)

    @property
    def packed(self) -> bool:
        """True when the weight is a packed tensor subclass (e.g. torchao int4) rather than floats."""
        return is_packed(self.weight.data)

    def calibration_state(self) -> dict[str, Tensor]:
        """What calibration decided for this layer: frozen quantizer parameters, the weight and a
        corrected bias."""
        # packed weights are re-packed on load; an attention operand has none
        state = {} if self.packed or not self.plan.has_weight else {"weight": self.weight.detach()}
        if self.corrects_bias:
            state["bias"] = self.bias.detach()
        if self.split_at is not None:
            state["split_at"] = torch.tensor(self.split_at)
        for role, group in self.act_quantizers.items():
            for index, quantizer in enumerate(group):
                state.update({f"{role}.{index}.{key}": value for key, value in quantizer.frozen_state().items()})
        return state

    @torch.no_grad()
    def load_calibration_state(self, state: dict[str, Tensor]) -> None:
        """Restore `calibration_state()` instead of calibrating and converting."""
        self.set_split(int(state["split_at"]) if "split_at" in state else None)
        for role, group in self.act_quantizers.items():
            for index, quantizer in enumerate(group):
                prefix = f"{role}.{index}."
                quantizer.load_frozen_state(
                    {key.removeprefix(prefix): value for key, value in state.items() if key.startswith(prefix)}
                )
        if "weight" in state:
            self.weight.copy_(state["weight"])
        else:
            self.stage_weight()
            self.commit_weight()
        if "bias" in state:
            self.bias.copy_(state["bias"])

    def extra_repr(self) -> str:
        s = self.plan.settings
        return (
            f"{super().extra_repr()}, scheme={s.scheme}, base={s.base_quantizer}, w_bits={s.w_bits}, a_bits={s.a_bits}"
        )


def weight_digest(weight: Tensor) -> str:
    """SHA-256 of a float weight: what a packed weight is re-made from must be this weight."""
    return hashlib.sha256(tensor_bytes(weight)).hexdigest()


def join_weight_parts(parts: list[Tensor]) -> Tensor:
    """Inverse of `QuantizedLayer.weight_parts`."""
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


class QuantLinear(QuantizedLayer, nn.Linear):
    pass


class QuantConv1d(QuantizedLayer, nn.Conv1d):
    pass


class QuantConv2d(QuantizedLayer, nn.Conv2d):
    pass


class QuantAttentionOperand(QuantizedLayer, AttentionOperand):
    """An operand of an attention product, quantized (plain) or modulated (modiff) like a layer
    input whose operation A is the identity: the product then runs in float on what the scheme
    returns (the quantized operand, or its reconstruction â)."""

    weight = None
    bias = None

    def apply_op(self, x: Tensor, *, bias: bool) -> Tensor:
        return x

    def set_execution(self, mode: Execution) -> None:
        """Products run in float on the dequantized operands under either execution (oneDNN has
        no int8 batched matmul of two activations)."""
        self.integer = None

    def stage_weight(self) -> None:
        """No weight to quantize."""

    @property
    def packed(self) -> bool:
        return False


_QUANTIZED: dict[type[nn.Module], type[QuantizedLayer]] = {
    nn.Linear: QuantLinear,
    nn.Conv1d: QuantConv1d,
    nn.Conv2d: QuantConv2d,
    AttentionOperand: QuantAttentionOperand,
}


def quantize_layer(module: nn.Module, plan: LayerPlan, tracker: Tracker) -> QuantizedLayer:
    """Turn an exact nn.Linear/Conv1d/Conv2d (or an adopted foreign layer, once its own
    quantizers are removed) into its quantized class, in place."""
    layer_type = next(t for t in _QUANTIZED if t.__name__ == plan.module_type)
    if plan.adopted_from is not None:
        adoption = adopt(module)
        assert adoption is not None, f"{plan.name} was adopted when the recipe was resolved"
        adoption.release(module)
    module.__class__ = _QUANTIZED[layer_type]
    module._setup(plan, tracker, layer_type)
    return module
