"""`static`: scales calibrated by an observer (min-max, moving average or L_p search), then frozen."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from modiff_quant.base_quantizer import ActivationQuantizer, BaseQuantizer, ObservedActivationQuantizer
from modiff_quant.quant import QuantSpec, fake_quantize_grouped
from modiff_quant.registry import OBSERVERS, register_base_quantizer


@register_base_quantizer("static")
class StaticQuantizer(BaseQuantizer):
    """Static uniform quantization whose parameters come from `calibrate()` + `convert()`.

    `observer` names a registered observer (`minmax`, `ema_minmax`, `mse`, or a plugin's) used for
    both weights and activations; `observer_options` are passed to it (e.g. `{p: 2.4}` for `mse`).
    Under `modiff` the activation observers calibrate on temporal differences.
    """

    def __init__(self, observer: str = "minmax", observer_options: dict[str, Any] | None = None) -> None:
        OBSERVERS.get(observer)  # fail at prepare time, not at convert time
        self.observer = observer
        self.observer_options = dict(observer_options or {})

    def quantize_weight(self, weight: Tensor, spec: QuantSpec) -> Tensor:
        if spec.is_float:
            return weight
        observer = OBSERVERS.get(self.observer)(spec, channel_dim=0, weight=True, **self.observer_options)
        observer.observe(weight)
        scale, zero_point = observer.qparams()
        return fake_quantize_grouped(weight, scale, zero_point, spec, weight=True)

    def activation_quantizer(self, spec: QuantSpec, channel_dim: int) -> ActivationQuantizer:
        return ObservedActivationQuantizer(spec, channel_dim, self.observer, **self.observer_options)
