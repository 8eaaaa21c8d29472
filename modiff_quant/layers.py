"""Quantized Linear/Conv layers: the original module, re-classed in place by `prepare()`.

Re-classing (as torch's parametrize does) keeps the module object, its parameters, its name in
the model and `isinstance(m, nn.Conv2d)`, so code around the model keeps working.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base_quantizer import ActivationQuantizer, BaseQuantizer
from .layer_parts import build_parts
from .recipe import LayerPlan
from .schemes import Scheme
from .trajectory import CachedOutput, Mode, Position, Tracker


@dataclass
class LayerState:
    """One layer's memory of one trajectory branch and call site: â (or the raw previous input) and ô."""

    a_hat: Tensor | None = None
    output: CachedOutput | None = None

    @property
    def nbytes(self) -> int:
        return (0 if self.a_hat is None else self.a_hat.nbytes) + (0 if self.output is None else self.output.nbytes)

    def remember(self, output: Tensor) -> Tensor:
        """Keep ô for the next step (detached: the cache must not chain autograd graphs over steps)."""
        self.output = CachedOutput(output.detach())
        return output


class QuantizedLayer(nn.Module):
    """Behaviour shared by `QuantLinear`, `QuantConv1d` and `QuantConv2d`."""

    plan: LayerPlan
    scheme: Scheme
    base_quantizer: BaseQuantizer
    act_quantizers: nn.ModuleDict
    _tracker: Tracker
    _states: dict[tuple[Hashable, int], LayerState]

    def _setup(self, plan: LayerPlan, tracker: Tracker, layer_type: type[nn.Module]) -> None:
        self.plan = plan
        self.scheme, self.base_quantizer, quantizers = build_parts(plan.settings, layer_type)
        self.act_quantizers = nn.ModuleDict({role: nn.ModuleList(group) for role, group in quantizers.items()})
        self._tracker = tracker
        self._states = {}
        self._last_position: Position | None = None
        self._repeat = 0

    def forward(self, x: Tensor) -> Tensor:
        tracker = self._tracker
        step = tracker.position[1]
        state = self._state_for(tracker.position)
        if state.a_hat is not None and state.a_hat.shape != x.shape:
            raise RuntimeError(
                f"{self.plan.name}: input shape changed from {list(state.a_hat.shape)} to {list(x.shape)} within a trajectory "
                "(e.g. another prompt length); call modiff_quant.reset(model) between runs or wrap each in modiff_quant.sampling(model)"
            )
        if tracker.mode is Mode.CALIBRATING:
            return self.scheme.calibrate(self, x, state, self.plan.skips(step))
        if tracker.mode is Mode.PREPARED:
            raise RuntimeError(
                f"{self.plan.name}: the model is prepared but not converted; call modiff_quant.convert(model) "
                "(after running the sampling loop inside modiff_quant.calibrate(model) for calibrated base quantizers)"
            )
        return self.scheme.forward(self, x, state, self.plan.skips(step))

    def _state_for(self, position: Position) -> LayerState:
        """The state of this call: one per CFG branch, and one per call site when a shared layer
        runs more than once per model call, so that differences are always taken between steps."""
        self._repeat = self._repeat + 1 if position == self._last_position else 0
        self._last_position = position
        return self._states.setdefault((position[0], self._repeat), LayerState())

    def quantizer(self, role: str) -> ActivationQuantizer:
        """The activation quantizer of `role` for the timestep group of the current model call."""
        return self.act_quantizers[role][self.plan.settings.timestep_groups.index(self._tracker.timestep)]

    def apply_op(self, x: Tensor, *, bias: bool) -> Tensor:
        """A(x): the layer's operation with its weight (quantized in place by `convert`)."""
        b = self.bias if bias else None
        return F.linear(x, self.weight, b) if isinstance(self, nn.Linear) else self._conv_forward(x, self.weight, b)

    @torch.no_grad()
    def convert(self) -> None:
        """Freeze the activation quantizers and quantize the weight in place, once (as torchao's
        quantize_ does: the float weight is only needed before, by calibration)."""
        groups = self.plan.settings.timestep_groups
        for role, quantizers in self.act_quantizers.items():
            for group, quantizer in enumerate(quantizers):
                try:
                    quantizer.freeze()
                except RuntimeError as exc:
                    raise RuntimeError(f"{role} quantizer, {groups.describe(group)}: {exc}" if groups.count > 1 else str(exc)) from exc
        spec = self.plan.settings.weight_spec()
        if not spec.is_float:
            self.weight.copy_(self.base_quantizer.quantize_weight(self.weight.detach(), spec))

    def reset_state(self) -> None:
        self._states.clear()
        self._last_position = None

    def cache_bytes(self) -> int:
        return sum(state.nbytes for state in self._states.values())

    def extra_repr(self) -> str:
        s = self.plan.settings
        return f"{super().extra_repr()}, scheme={s.scheme}, base={s.base_quantizer}, w_bits={s.w_bits}, a_bits={s.a_bits}"


class QuantLinear(QuantizedLayer, nn.Linear):
    pass


class QuantConv1d(QuantizedLayer, nn.Conv1d):
    pass


class QuantConv2d(QuantizedLayer, nn.Conv2d):
    pass


_QUANTIZED: dict[type[nn.Module], type[QuantizedLayer]] = {nn.Linear: QuantLinear, nn.Conv1d: QuantConv1d, nn.Conv2d: QuantConv2d}


def quantize_layer(module: nn.Module, plan: LayerPlan, tracker: Tracker) -> QuantizedLayer:
    """Turn an exact nn.Linear/Conv1d/Conv2d into its quantized class, in place."""
    layer_type = type(module)
    module.__class__ = _QUANTIZED[layer_type]
    module._setup(plan, tracker, layer_type)
    return module
