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

from .recipe import LayerPlan
from .registry import BASE_QUANTIZERS, SCHEMES
from .trajectory import CachedOutput, Mode, Tracker


@dataclass
class LayerState:
    """One layer's memory of one trajectory branch: â (or the raw previous input) and ô."""

    a_hat: Tensor | None = None
    output: CachedOutput | None = None

    def remember(self, output: Tensor) -> Tensor:
        self.output = CachedOutput(output)
        return output


class QuantizedLayer(nn.Module):
    """Behaviour shared by `QuantLinear`, `QuantConv1d` and `QuantConv2d`."""

    plan: LayerPlan
    act_quantizers: nn.ModuleDict
    qweight: Tensor | None

    def _setup(self, plan: LayerPlan, tracker: Tracker) -> None:
        settings = plan.settings
        self.plan = plan
        self.scheme = SCHEMES.get(settings.scheme)()
        self.base_quantizer = BASE_QUANTIZERS.get(settings.base_quantizer)(**settings.base_quantizer_options)
        channel_dim = -1 if isinstance(self, nn.Linear) else 1
        self.act_quantizers = nn.ModuleDict(
            {role: self.base_quantizer.activation_quantizer(settings.activation_spec(), channel_dim) for role in self.scheme.activation_roles(settings)}
        )
        self.register_buffer("qweight", None)
        self._tracker = tracker
        self._states: dict[Hashable, LayerState] = {}

    def forward(self, x: Tensor) -> Tensor:
        tracker = self._tracker
        branch, step = tracker.position
        state = self._states.setdefault(branch, LayerState())
        if tracker.mode is Mode.CALIBRATING:
            return self.scheme.calibrate(self, x, state, self.plan.skips(step))
        if tracker.mode is Mode.PREPARED:
            raise RuntimeError(
                f"{self.plan.name}: the model is prepared but not converted; call modiff_quant.convert(model) "
                "(after running the sampling loop inside modiff_quant.calibrate(model) for calibrated base quantizers)"
            )
        return self.scheme.forward(self, x, state, self.plan.skips(step))

    def apply_op(self, x: Tensor, *, bias: bool) -> Tensor:
        """A(x): the layer's operation with its (quantized, once converted) weight."""
        weight = self.weight if self.qweight is None else self.qweight
        b = self.bias if bias else None
        return F.linear(x, weight, b) if isinstance(self, nn.Linear) else self._conv_forward(x, weight, b)

    @torch.no_grad()
    def convert(self) -> None:
        """Freeze the activation quantizers and quantize the weight, once."""
        for quantizer in self.act_quantizers.values():
            quantizer.freeze()
        spec = self.plan.settings.weight_spec()
        if not spec.is_float:
            self.qweight = self.base_quantizer.quantize_weight(self.weight.detach(), spec)

    def reset_state(self) -> None:
        self._states.clear()

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
    module.__class__ = _QUANTIZED[type(module)]
    module._setup(plan, tracker)
    return module
