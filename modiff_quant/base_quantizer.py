"""The plugin interface of a base quantizer, and the activation quantizers plugins build on.

A base quantizer is a PTQ method (dynamic min-max, Q-Diffusion, PTQ4DM, torchao, ...). Schemes
decide *what* an activation quantizer sees (raw inputs for `plain`, temporal differences for
`modiff`); the base quantizer decides *how* it is quantized.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar

from torch import Tensor, nn

from .quant import QuantSpec, fake_quantize_grouped, quantize_minmax
from .registry import OBSERVERS


class ActivationQuantizer(nn.Module, ABC):
    """Fake-quantizes one activation stream of one layer (a float spec passes it through)."""

    needs_calibration: ClassVar[bool] = False

    def __init__(self, spec: QuantSpec, channel_dim: int) -> None:
        super().__init__()
        self.spec = spec
        self.channel_dim = channel_dim

    def forward(self, x: Tensor) -> Tensor:
        return x if self.spec.is_float else self._quantize(x)

    @abstractmethod
    def _quantize(self, x: Tensor) -> Tensor: ...

    def observe(self, x: Tensor) -> None:
        """Calibration: record what this quantizer will see (no-op for runtime quantizers)."""

    def freeze(self) -> None:
        """Conversion: fix the parameters from what was observed (no-op for runtime quantizers)."""

    def extra_repr(self) -> str:
        return f"bits={self.spec.bits}, symmetric={self.spec.symmetric}, granularity={self.spec.granularity}"


class DynamicActivationQuantizer(ActivationQuantizer):
    """Scale and zero point recomputed from each input's min/max: nothing to calibrate."""

    def _quantize(self, x: Tensor) -> Tensor:
        return quantize_minmax(x, self.spec, channel_dim=self.channel_dim)


class ObservedActivationQuantizer(ActivationQuantizer):
    """Static scale and zero point, frozen from an observer at `convert()`."""

    needs_calibration = True

    def __init__(self, spec: QuantSpec, channel_dim: int, observer: str = "minmax", **observer_options: Any) -> None:
        super().__init__(spec, channel_dim)
        self.observer = OBSERVERS.get(observer)(spec, channel_dim=channel_dim, **observer_options) if not spec.is_float else None
        self.register_buffer("scale", None)
        self.register_buffer("zero_point", None)

    def observe(self, x: Tensor) -> None:
        if self.observer is not None and x.numel():
            self.observer.observe(x)

    def freeze(self) -> None:
        """Fix scale and zero point, then drop the observer and the statistics it held."""
        if self.observer is not None:
            self.scale, self.zero_point = self.observer.qparams()
            self.observer = None

    def _quantize(self, x: Tensor) -> Tensor:
        if self.scale is None:
            raise RuntimeError("static activation quantizer used before convert() froze its scale")
        return fake_quantize_grouped(x, self.scale, self.zero_point, self.spec, channel_dim=self.channel_dim)


class BaseQuantizer(ABC):
    """A PTQ method as a plugin: builds the weight and activation quantization of a layer.

    Subclasses take their recipe options as keyword arguments of `__init__` (unknown options are
    reported against the recipe line) and are registered with `register_base_quantizer(name)` or
    the `modiff_quant.base_quantizers` entry-point group.
    """

    @abstractmethod
    def quantize_weight(self, weight: Tensor, spec: QuantSpec) -> Tensor:
        """Return the fake-quantized weight; called once per layer by `convert()`."""

    @abstractmethod
    def activation_quantizer(self, spec: QuantSpec, channel_dim: int) -> ActivationQuantizer:
        """A fresh quantizer for one activation stream; `channel_dim` is 1 for convs, -1 for linears."""
