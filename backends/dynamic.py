"""`dynamic`: runtime min-max quantization, the paper's LTQ (tensor) and LCQ (sample) baselines."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from modiff_quant.base_quantizer import ActivationQuantizer, BaseQuantizer, DynamicActivationQuantizer
from modiff_quant.observers import check_observer, weight_qparams
from modiff_quant.quant import QuantSpec, fake_quantize_grouped
from modiff_quant.registry import register_base_quantizer


@register_base_quantizer("dynamic")
class DynamicQuantizer(BaseQuantizer):
    """Scales computed from every tensor as it arrives: no calibration needed.

    Activations (raw inputs or, under `modiff`, temporal differences) get fresh min-max scales on
    every call at the recipe's granularity. Weights get their scales once at convert from
    `weight_observer`: `minmax`, or `mse`, which searches each scale group's clipping range for
    the least squared error (`weight_observer_options`, e.g. `{p: 2.4}`, go to the observer).
    """

    def __init__(self, weight_observer: str = "minmax", weight_observer_options: dict[str, Any] | None = None) -> None:
        self.weight_observer = weight_observer
        self.weight_observer_options = dict(weight_observer_options or {})
        check_observer(weight_observer, self.weight_observer_options)

    def weight_qparams(self, weight: Tensor, spec: QuantSpec) -> tuple[Tensor, Tensor]:
        """Scale and zero point of a weight from `weight_observer`, shaped for `stats_view`."""
        return weight_qparams(weight, spec, self.weight_observer, **self.weight_observer_options)

    def quantize_weight(self, weight: Tensor, spec: QuantSpec) -> Tensor:
        if spec.is_float:
            return weight
        scale, zero_point = self.weight_qparams(weight, spec)
        return fake_quantize_grouped(weight, scale, zero_point, spec, weight=True)

    def activation_quantizer(self, spec: QuantSpec, channel_dim: int) -> ActivationQuantizer:
        return DynamicActivationQuantizer(spec, channel_dim)
