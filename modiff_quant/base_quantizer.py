"""The plugin interface of a base quantizer, and the activation quantizers plugins build on.

A base quantizer is a PTQ method (dynamic min-max, Q-Diffusion, PTQ4DM, torchao, ...). Schemes
decide *what* an activation quantizer sees (raw inputs for `plain`, temporal differences for
`modiff`); the base quantizer decides *how* it is quantized.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from .calibration.reconstruction import Reconstruction
from .calibration.record import CalibrationRecord
from .calibration.selection import Pick, all_steps
from .quant import (
    QuantSpec,
    centered_codes,
    fake_quantize_grouped,
    minmax_qparams,
    quantize_minmax,
)
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

    def codes(self, x: Tensor) -> tuple[Tensor, Tensor] | None:
        """Integer execution: (centered codes, scale) with `forward(x) == codes * scale`, the scale
        one per tensor or per sample (so it folds out of a GEMM), or None when this quantizer
        cannot say (scales along the reduction axis, or another library's quantizer)."""
        return None

    def observe(self, x: Tensor) -> None:
        """Calibration: record what this quantizer will see (no-op for runtime quantizers)."""

    def freeze(self) -> None:
        """Conversion: fix the parameters from what was observed (no-op for runtime quantizers)."""

    @property
    def combines(self) -> bool:
        """Whether `combine` can merge what several processes observed (then each observes only its
        share of the calibration samples); a quantizer that observes must say so itself."""
        return not self.needs_calibration

    def statistics(self) -> Any:
        """What `observe` collected in this process, picklable (tensors on the CPU)."""
        return None

    def combine(self, parts: Sequence[Any], device: torch.device) -> None:
        """Hold what one process observing every process's samples would: `parts` are every
        process's `statistics()` in rank order (no-op for runtime quantizers)."""

    def frozen_state(self) -> dict[str, Tensor]:
        """The parameters `freeze()` fixed (saved by the calibration cache)."""
        return {}

    def load_frozen_state(self, state: dict[str, Tensor]) -> None:
        """Restore `frozen_state()` in place of observing and freezing; raise ValueError for a state
        this quantizer cannot have saved (a saved model or cache file may be damaged or crafted)."""
        if state:
            raise ValueError(f"{type(self).__name__} keeps no parameters, got {', '.join(state)}")

    def extra_repr(self) -> str:
        return f"bits={self.spec.bits}, symmetric={self.spec.symmetric}, granularity={self.spec.granularity}"


class DynamicActivationQuantizer(ActivationQuantizer):
    """Scale and zero point recomputed from each input's min/max: nothing to calibrate."""

    def _quantize(self, x: Tensor) -> Tensor:
        return quantize_minmax(x, self.spec, channel_dim=self.channel_dim)

    def codes(self, x: Tensor) -> tuple[Tensor, Tensor] | None:
        if not _folds(self.spec):
            return None
        view, scale, zero_point = minmax_qparams(x, self.spec, channel_dim=self.channel_dim)
        return centered_codes(view, scale, zero_point, self.spec), scale


class ObservedActivationQuantizer(ActivationQuantizer):
    """Static scale and zero point, frozen from an observer at `convert()`."""

    needs_calibration = True

    def __init__(self, spec: QuantSpec, channel_dim: int, observer: str = "minmax", **observer_options: Any) -> None:
        super().__init__(spec, channel_dim)
        self.observer = (
            OBSERVERS.get(observer)(spec, channel_dim=channel_dim, **observer_options) if not spec.is_float else None
        )
        self.register_buffer("scale", None)
        self.register_buffer("zero_point", None)

    def observe(self, x: Tensor) -> None:
        if self.observer is not None and x.numel():
            self.observer.observe(x)

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        """A converted model's state_dict holds the frozen scale and zero point, which this
        quantizer of a model only prepared has no buffers for yet: take them, checked."""
        keys = (f"{prefix}scale", f"{prefix}zero_point")
        if self.scale is None and not self.spec.is_float and all(key in state_dict for key in keys):
            error_msgs = args[-1]
            try:
                self.load_frozen_state(
                    {"scale": state_dict[keys[0]].clone(), "zero_point": state_dict[keys[1]].clone()}
                )
            except ValueError as exc:
                error_msgs.append(f"{prefix.removesuffix('.')}: {exc}")
        super()._load_from_state_dict(state_dict, prefix, *args)

    @property
    def combines(self) -> bool:
        return self.observer is None or self.observer.combines

    def statistics(self) -> Any:
        return None if self.observer is None else self.observer.statistics()

    def combine(self, parts: Sequence[Any], device: torch.device) -> None:
        if self.observer is not None:
            self.observer.combine(parts, device)

    def freeze(self) -> None:
        """Fix scale and zero point, then drop the observer and the statistics it held."""
        if self.observer is not None:
            self.scale, self.zero_point = self.observer.qparams()
            self.observer = None

    def frozen_state(self) -> dict[str, Tensor]:
        return {} if self.scale is None else {"scale": self.scale, "zero_point": self.zero_point}

    def load_frozen_state(self, state: dict[str, Tensor]) -> None:
        if self.spec.is_float:
            super().load_frozen_state(state)
            return
        self.scale, self.zero_point = _checked_qparams(state, self.spec)
        self.observer = None

    def _quantize(self, x: Tensor) -> Tensor:
        if self.scale is None:
            raise RuntimeError("static activation quantizer used before convert() froze its scale")
        return fake_quantize_grouped(x, self.scale, self.zero_point, self.spec, channel_dim=self.channel_dim)

    def codes(self, x: Tensor) -> tuple[Tensor, Tensor] | None:
        if not _folds(self.spec) or self.scale is None:
            return None
        return centered_codes(x, self.scale, self.zero_point, self.spec), self.scale


def _checked_qparams(state: dict[str, Tensor], spec: QuantSpec) -> tuple[Tensor, Tensor]:
    """A saved scale and zero point, refused unless `freeze()` could have made them: anything else
    would compute NaN or silently wrong values (integer execution assumes a symmetric zero point of 0)."""
    if state.keys() != {"scale", "zero_point"}:
        raise ValueError(f"expected scale and zero_point, got {', '.join(state) or 'nothing'}")
    scale, zero_point = state["scale"], state["zero_point"]
    if not (scale.is_floating_point() and zero_point.is_floating_point()) or scale.shape != zero_point.shape:
        raise ValueError(
            f"scale and zero_point must be float tensors of one shape, got {scale.dtype} {list(scale.shape)} and "
            f"{zero_point.dtype} {list(zero_point.shape)}"
        )
    if not bool((scale > 0).all() and scale.isfinite().all()):
        raise ValueError("scale must be finite and > 0")
    low, high = (0, 0) if spec.symmetric else (spec.qmin, spec.qmax)
    if not bool((zero_point == zero_point.round()).all() and (zero_point >= low).all() and (zero_point <= high).all()):
        raise ValueError(f"zero_point must hold integers in [{low}, {high}]")
    return scale, zero_point


def _folds(spec: QuantSpec) -> bool:
    """Whether scales of this spec factor out of a layer's GEMM (not along its input channels)."""
    return not spec.is_float and spec.granularity.kind in ("tensor", "sample")


class SplitActivationQuantizer(ActivationQuantizer):
    """Separate quantizers for the two parts of a concatenated input (Q-Diffusion's shortcut
    split): a skip connection and the upsampled path have very different ranges, so one scale
    for both wastes the levels of the narrower one. Until `split_at` is known (detected at
    `convert()`), or when the layer's input is no concatenation, `first` quantizes everything."""

    def __init__(self, first: ActivationQuantizer, second: ActivationQuantizer) -> None:
        super().__init__(first.spec, first.channel_dim)
        self.first, self.second = first, second
        self.needs_calibration = first.needs_calibration
        self.split_at: int | None = None

    def forward(self, x: Tensor) -> Tensor:
        if self.split_at is None:
            return self.first(x)
        head, tail = self._parts(x)
        return torch.cat([self.first(head), self.second(tail)], dim=self.channel_dim)

    def _quantize(self, x: Tensor) -> Tensor:
        return self.forward(x)

    def _parts(self, x: Tensor) -> tuple[Tensor, Tensor]:
        head, tail = x.split([self.split_at, x.shape[self.channel_dim] - self.split_at], dim=self.channel_dim)
        return head, tail

    def observe(self, x: Tensor) -> None:
        if self.split_at is None:
            self.first.observe(x)
        else:
            head, tail = self._parts(x)
            self.first.observe(head)
            self.second.observe(tail)

    @property
    def combines(self) -> bool:
        return self.first.combines and self.second.combines

    def statistics(self) -> Any:
        return self.first.statistics(), self.second.statistics()

    def combine(self, parts: Sequence[Any], device: torch.device) -> None:
        self.first.combine([part[0] for part in parts], device)
        self.second.combine([part[1] for part in parts], device)

    def freeze(self) -> None:
        self.first.freeze()
        if self.split_at is not None:
            self.second.freeze()

    def frozen_state(self) -> dict[str, Tensor]:
        parts = {
            "first": self.first.frozen_state(),
            "second": self.second.frozen_state() if self.split_at is not None else {},
        }
        return {f"{part}.{key}": value for part, state in parts.items() for key, value in state.items()}

    def load_frozen_state(self, state: dict[str, Tensor]) -> None:
        parts = {"first": self.first} if self.split_at is None else {"first": self.first, "second": self.second}
        unknown = [key for key in state if key.partition(".")[0] not in parts]
        if unknown:
            raise ValueError(
                f"unexpected {', '.join(unknown)}{' (the input is not split)' if self.split_at is None else ''}"
            )
        for name, part in parts.items():
            part.load_frozen_state(
                {key.removeprefix(f"{name}."): value for key, value in state.items() if key.startswith(f"{name}.")}
            )

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        if self.split_at is None and f"{prefix}second.scale" in state_dict:
            args[-1].append(
                f"{prefix.removesuffix('.')}: the saved layer quantizes the two parts of a concatenated input apart, "
                "and a state_dict does not say where they divide; load it with modiff_quant.load_quantized"
            )
            return
        super()._load_from_state_dict(state_dict, prefix, *args)

    def extra_repr(self) -> str:
        return f"split_at={self.split_at}"


class UnsupportedSetting(ValueError):
    """A base quantizer cannot do what a recipe setting asks of a layer; `setting` is the recipe
    key at fault, so the error points at its line."""

    def __init__(self, setting: str, message: str) -> None:
        super().__init__(message)
        self.setting = setting


class BaseQuantizer(ABC):
    """A PTQ method as a plugin: builds the weight and activation quantization of a layer.

    Subclasses take their recipe options as keyword arguments of `__init__` (unknown options are
    reported against the recipe line) and are registered with `register_base_quantizer(name)` or
    the `modiff_quant.base_quantizers` entry-point group.

    Calibrated methods also choose their calibration samples (`calibration_picks`) and may
    optimise their layers on them after the observers are frozen (`reconstruct`).
    """

    split_shortcuts: ClassVar[bool] = False
    """Whether convolutions fed by a concatenation get split activation quantizers when the
    recipe does not set `split`."""

    reconstructs: ClassVar[bool] = False
    """Whether `reconstruct` optimises layers, so that calibration data is needed even where no
    activation has a static scale (e.g. AdaRound with float activations)."""

    reconstructs_weights_only: ClassVar[bool] = False
    """Whether `reconstruct` touches quantized weights alone (`adaround`, `gptq`), so that a layer
    with float weights needs no calibration data (as `search`'s float-weight passes)."""

    def calibration_picks(self, record: CalibrationRecord) -> list[Pick]:
        """The recorded samples the activation observers see; every step by default."""
        return all_steps(record)

    def reconstruct(self, reconstruction: Reconstruction) -> None:  # noqa: B027 (a default that does nothing)
        """Optimise this method's layers on calibration data (e.g. AdaRound); none by default."""

    def check_layer(self, layer: nn.Module, weight: QuantSpec, activation: QuantSpec) -> None:
        """Raise `UnsupportedSetting` when this method cannot quantize `layer` as asked; called
        when a recipe is resolved, before the model changes. By default weight groups must
        divide the flattened input (methods with a fallback override this)."""
        granularity = weight.granularity
        if weight.is_float or granularity.kind != "group":
            return
        width = math.prod(layer.weight.shape[1:])
        if width % granularity.group_size:
            raise UnsupportedSetting(
                "w_granularity",
                f"{granularity} needs a flattened input size divisible by {granularity.group_size}, got {width}",
            )

    def adaptations(self, weight: QuantSpec, activation: QuantSpec) -> dict[str, tuple[Any, str]]:
        """What this method cannot serve as asked, whatever the layer: recipe setting -> (the
        value it serves instead, why). A base-quantizer swap (`Recipe.with_base_quantizer`)
        applies them to settings it inherited; none by default."""
        return {}

    def weight_note(self, layer: nn.Module, weight: QuantSpec) -> str | None:
        """How `layer`'s weight is stored when that is not plain fake quantization as asked
        (a kernel format or a fallback), shown by `explain`; None by default."""
        return None

    @abstractmethod
    def quantize_weight(self, weight: Tensor, spec: QuantSpec) -> Tensor:
        """The quantized weight, called once per layer by `convert()`: a float tensor holding the
        dequantized values, or a tensor subclass that computes with packed integers (torchao's)."""

    @abstractmethod
    def activation_quantizer(self, spec: QuantSpec, channel_dim: int) -> ActivationQuantizer:
        """A fresh quantizer for one activation stream; `channel_dim` counts from the end: -3 for
        Conv2d, -2 for Conv1d, -1 for Linear."""
