"""`static`: scales calibrated by an observer (min-max, moving average or L_p search), then frozen."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from modiff_quant.base_quantizer import ActivationQuantizer, BaseQuantizer, ObservedActivationQuantizer
from modiff_quant.observers import check_observer, weight_qparams
from modiff_quant.quant import Granularity, QuantSpec, fake_quantize_grouped
from modiff_quant.registry import register_base_quantizer


@register_base_quantizer("static")
class StaticQuantizer(BaseQuantizer):
    """Static uniform quantization whose parameters come from `calibrate()` + `convert()`.

    `observer` names a registered observer (`minmax`, `ema_minmax`, `mse`, or a plugin's) used for
    both weights and activations; `observer_options` are passed to it (e.g. `{p: 2.4}` for `mse`).
    Under `modiff` the activation observers calibrate on temporal differences.
    """

    def __init__(self, observer: str = "minmax", observer_options: dict[str, Any] | None = None) -> None:
        self.observer = observer
        self.observer_options = dict(observer_options or {})
        check_observer(observer, self.observer_options)

    def weight_qparams(self, weight: Tensor, spec: QuantSpec) -> tuple[Tensor, Tensor]:
        """Scale and zero point of a weight from this quantizer's observer, shaped for `stats_view`."""
        return weight_qparams(weight, spec, self.observer, **self.observer_options)

    def quantize_weight(self, weight: Tensor, spec: QuantSpec) -> Tensor:
        if spec.is_float:
            return weight
        scale, zero_point = self.weight_qparams(weight, spec)
        return fake_quantize_grouped(weight, scale, zero_point, spec, weight=True)

    def adaptations(self, weight: QuantSpec, activation: QuantSpec) -> dict[str, tuple[Any, str]]:
        if activation.is_float or activation.granularity.kind != "sample":
            return {}
        return {"a_granularity": (Granularity("tensor"), "a calibrated scale is fixed, it cannot follow each sample")}

    def activation_quantizer(self, spec: QuantSpec, channel_dim: int) -> ActivationQuantizer:
        return ObservedActivationQuantizer(spec, channel_dim, self.observer, **self.observer_options)
