"""`dynamic`: runtime min-max quantization, the paper's LTQ (tensor) and LCQ (sample) baselines."""

from __future__ import annotations

from torch import Tensor

from modiff_quant.base_quantizer import ActivationQuantizer, BaseQuantizer, DynamicActivationQuantizer
from modiff_quant.quant import QuantSpec, quantize_minmax
from modiff_quant.registry import register_base_quantizer


@register_base_quantizer("dynamic")
class DynamicQuantizer(BaseQuantizer):
    """Min-max scales computed from every tensor as it arrives: no calibration needed.

    Weights get min-max scales once at convert; activations (raw inputs or, under `modiff`,
    temporal differences) get fresh scales on every call at the recipe's granularity.
    """

    def quantize_weight(self, weight: Tensor, spec: QuantSpec) -> Tensor:
        return quantize_minmax(weight, spec, weight=True)

    def activation_quantizer(self, spec: QuantSpec, channel_dim: int) -> ActivationQuantizer:
        return DynamicActivationQuantizer(spec, channel_dim)
