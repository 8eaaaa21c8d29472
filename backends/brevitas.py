"""`brevitas`: weights and activations quantized by Brevitas quantizer injectors.

Weights go through the weight-quant proxy of a Brevitas layer built from the injector, with the
recipe's `w_bits`; activations (raw inputs, or temporal differences under `modiff`) through a
`QuantIdentity` with the recipe's `a_bits`, calibrated in Brevitas' own `calibration_mode`. The
injectors decide granularity and symmetry; when a recipe names none, they are chosen from the
recipe's (weights: per-tensor or per-channel symmetric; activations: per-tensor, signed or
shifted). Models already converted with Brevitas layers are adopted by `adopt_layer` (see there).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from functools import cache
from types import ModuleType
from typing import Any, Literal

import torch
from torch import Tensor, nn

from modiff_quant.adoption import Adoption
from modiff_quant.base_quantizer import (
    ActivationQuantizer,
    BaseQuantizer,
    DynamicActivationQuantizer,
    UnsupportedSetting,
)
from modiff_quant.imports import optional_import
from modiff_quant.quant import FLOAT_BITS, Granularity, QuantSpec
from modiff_quant.registry import Registry, did_you_mean, register_base_quantizer

Injector = Any  # a brevitas.inject.ExtendedInjector subclass

WEIGHT_INJECTORS = {"tensor": "Int8WeightPerTensorFloat", "channel": "Int8WeightPerChannelFloat"}
ACTIVATION_INJECTORS = {True: "Int8ActPerTensorFloat", False: "ShiftedUint8ActPerTensorFloat"}  # by a_symmetric


@cache
def brevitas() -> ModuleType:
    """brevitas, imported on first use: `import modiff_quant` must not need it."""
    return optional_import("brevitas", "graph.calibrate", "inject", "nn", "quant", extra="brevitas")


INJECTORS: Registry[Injector] = Registry("Brevitas injector", "modiff_quant.brevitas_injectors")
"""Injectors of your own, by name: recipes are data and never import a module to find one."""


def register_injector(name: str) -> Callable[[Injector], Injector]:
    """Class decorator: make a Brevitas injector of your own available to recipes as `weight_quant:
    <name>` / `act_quant: <name>` (installed packages: the `modiff_quant.brevitas_injectors` entry points)."""
    return INJECTORS.register(name)


def injector(reference: str | Injector) -> Injector:
    """An injector class from a registered name, a name in `brevitas.quant`, a `brevitas.<module>:Class`
    path, or (from Python) the class itself.

    A recipe or checkpoint may come from a stranger, so a reference never imports a module outside
    Brevitas: `module:Class` of another module resolves only to an injector registered with
    `register_injector` (how `save_quantized` writes adopted layers' injectors back)."""
    if not isinstance(reference, str):
        return _checked(reference, repr(reference))
    module_name, _, name = reference.rpartition(":")
    if not module_name:
        found = INJECTORS.get(name) if name in INJECTORS else getattr(brevitas().quant, name, None)
        if found is None:
            suggestion = did_you_mean(name, [*INJECTORS.names(), *dir(brevitas().quant)])
            raise ValueError(
                f"no Brevitas quantizer injector {reference!r} "
                f"(a name in brevitas.quant or one registered with register_injector){suggestion}"
            )
        return _checked(found, reference)
    registered = [
        cls
        for cls in map(INJECTORS.get, INJECTORS.names())
        if (cls.__module__, cls.__qualname__) == (module_name, name)
    ]
    if registered:
        return registered[0]
    if module_name != "brevitas" and not module_name.startswith("brevitas."):
        raise ValueError(
            f"Brevitas injector {reference!r}: a recipe may not import module {module_name!r} "
            "(recipes are data; only Brevitas' own modules are imported); "
            "register the injector in your code with modiff_quant.backends.brevitas.register_injector and name it"
        )
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"cannot import the module of Brevitas injector {reference!r}: {exc}") from None
    return _checked(getattr(module, name, None), reference)


def _checked(found: Any, reference: str) -> Injector:
    if not (isinstance(found, type) and issubclass(found, brevitas().inject.ExtendedInjector)):
        raise ValueError(f"{reference!r} is not a Brevitas quantizer injector (an ExtendedInjector subclass)")
    return found


class BrevitasActivationQuantizer(ActivationQuantizer):
    """A Brevitas `QuantIdentity` whose scale Brevitas' `calibration_mode` sets, from one of two
    inputs: `range` (default) passes it once, at `freeze()`, the running min and max of everything
    observed; `per_call` passes it every observed call, as a Brevitas workflow does. Brevitas
    averages its per-call statistics, which suits stationary ranges; a diffusion model's ranges
    change with the timestep, and the average clips the widest steps (relative error 0.2 plain and
    0.5 under MoDiff at 16 bits on the tiny test UNet), hence the default."""

    needs_calibration = True

    def __init__(self, spec: QuantSpec, channel_dim: int, act_quant: Injector, per_call: bool) -> None:
        super().__init__(spec, channel_dim)
        self.identity = brevitas().nn.QuantIdentity(
            act_quant=act_quant, bit_width=spec.bits, return_quant_tensor=False
        )
        self.per_call = per_call
        self._calibration: AbstractContextManager[None] | None = None
        self._range: Tensor | None = None  # [min, max] observed (range mode)
        self._frozen = False

    def _calibrate(self, x: Tensor) -> None:
        if self._calibration is None:
            self._calibration = brevitas().graph.calibrate.calibration_mode(self.identity)
            self._calibration.__enter__()
        self.identity(x)

    def observe(self, x: Tensor) -> None:
        if self.per_call:
            self._calibrate(x)
            return
        seen = torch.stack([x.detach().min(), x.detach().max()]).float()
        self._range = (
            seen
            if self._range is None
            else torch.stack([self._range[0].minimum(seen[0]), self._range[1].maximum(seen[1])])
        )

    @property
    def combines(self) -> bool:
        """The running range combines across processes; Brevitas' own per-call statistics do not."""
        return not self.per_call

    def statistics(self) -> Any:
        return None if self._range is None else self._range.cpu()

    def combine(self, parts: Sequence[Any], device: torch.device) -> None:
        seen = [part for part in parts if part is not None]
        ranges = torch.stack(seen) if seen else None
        self._range = None if ranges is None else torch.stack([ranges[:, 0].amin(), ranges[:, 1].amax()]).to(device)

    def freeze(self) -> None:
        if self._range is not None:
            self._calibrate(self._range)
        if self._calibration is None:
            raise RuntimeError("Brevitas activation quantizer saw no calibration data")
        self._calibration.__exit__(None, None, None)
        self._calibration, self._range, self._frozen = None, None, True
        self.identity.eval()

    def frozen_state(self) -> dict[str, Tensor]:
        return dict(self.identity.state_dict())

    def load_frozen_state(self, state: dict[str, Tensor]) -> None:
        broken = [
            key for key, value in state.items() if value.is_floating_point() and not bool(value.isfinite().all())
        ]
        if broken:
            raise ValueError(f"non-finite values in {', '.join(broken)}")
        self.identity.load_state_dict(state)  # strict: names and shapes must be Brevitas' own
        self._frozen = True
        self.identity.eval()

    def train(self, mode: bool = True) -> BrevitasActivationQuantizer:
        """Brevitas updates statistics in training mode; once frozen the scale must stay fixed."""
        super().train(mode)
        if self._frozen:
            self.identity.eval()
        return self

    def _quantize(self, x: Tensor) -> Tensor:
        if not self._frozen:
            raise RuntimeError("Brevitas activation quantizer used before convert() calibrated it")
        return self.identity(x)


@register_base_quantizer("brevitas")
class BrevitasQuantizer(BaseQuantizer):
    """Brevitas injectors as a base quantizer. `weight_quant` / `act_quant`: an injector name in
    `brevitas.quant` (e.g. `Int8WeightPerChannelFloatMSE`) or registered with `register_injector`, a
    `brevitas.<module>:Class` path, or the class;
    the bit-widths always come from the recipe. `calibration`: what Brevitas' calibration mode
    sees, `range` or `per_call` (see `BrevitasActivationQuantizer`)."""

    def __init__(
        self,
        weight_quant: str | Injector | None = None,
        act_quant: str | Injector | None = None,
        calibration: Literal["range", "per_call"] = "range",
    ) -> None:
        if calibration not in ("range", "per_call"):
            raise ValueError(f"calibration must be 'range' or 'per_call', got {calibration!r}")
        self.weight_quant = None if weight_quant is None else injector(weight_quant)
        self.act_quant = None if act_quant is None else injector(act_quant)
        self.calibration = calibration

    def adaptations(self, weight: QuantSpec, activation: QuantSpec) -> dict[str, tuple[Any, str]]:
        found: dict[str, tuple[Any, str]] = {}
        if self.weight_quant is None and not weight.is_float:
            if weight.granularity.kind not in WEIGHT_INJECTORS:
                found["w_granularity"] = (
                    Granularity("channel"),
                    "the weight injectors it chooses are per tensor or channel",
                )
            if not weight.symmetric:
                found["w_symmetric"] = (True, "the weight injectors it chooses are symmetric")
        if self.act_quant is None and not activation.is_float and activation.granularity.kind != "tensor":
            found["a_granularity"] = (
                Granularity("tensor"),
                "the activation injector it chooses has one scale per tensor",
            )
        return found

    def check_layer(self, layer: nn.Module, weight: QuantSpec, activation: QuantSpec) -> None:
        asked = {
            "w_granularity": weight.granularity,
            "w_symmetric": weight.symmetric,
            "a_granularity": activation.granularity,
        }
        for setting, (_, reason) in self.adaptations(weight, activation).items():
            option = "act_quant" if setting == "a_granularity" else "weight_quant"
            raise UnsupportedSetting(
                setting, f"{reason}, got {setting} {asked[setting]}; name an injector with {option}"
            )

    def weight_note(self, layer: nn.Module, weight: QuantSpec) -> str | None:
        if weight.is_float:
            return None
        chosen = "" if self.weight_quant is not None else " (chosen from the recipe)"
        return f"Brevitas {self._weight_injector(weight).__name__}, {weight.bits} bits{chosen}"

    def _weight_injector(self, spec: QuantSpec) -> Injector:
        """The injector named in the options, else the one for the recipe's weight granularity."""
        if self.weight_quant is not None:
            return self.weight_quant
        return injector(WEIGHT_INJECTORS[spec.granularity.kind])

    def quantize_weight(self, weight: Tensor, spec: QuantSpec) -> Tensor:
        if spec.is_float:
            return weight
        layer = _weight_holder(weight, self._weight_injector(spec), spec.bits)
        with torch.no_grad():
            layer.weight.copy_(weight)
            return layer.quant_weight().value.detach().to(weight.dtype)

    def activation_quantizer(self, spec: QuantSpec, channel_dim: int) -> ActivationQuantizer:
        if spec.is_float:  # float or 0-bit activations: nothing to calibrate
            return DynamicActivationQuantizer(spec, channel_dim)
        act_quant = self.act_quant if self.act_quant is not None else injector(ACTIVATION_INJECTORS[spec.symmetric])
        return BrevitasActivationQuantizer(spec, channel_dim, act_quant, per_call=self.calibration == "per_call")


def _weight_holder(weight: Tensor, weight_quant: Injector, bits: int) -> nn.Module:
    """A Brevitas layer of the weight's shape, whose weight-quant proxy quantizes it."""
    qnn = brevitas().nn
    out_channels, in_channels, *kernel = weight.shape
    options: dict[str, Any] = {
        "bias": False,
        "weight_quant": weight_quant,
        "weight_bit_width": bits,
        "device": weight.device,
        "dtype": weight.dtype,
    }
    if not kernel:
        return qnn.QuantLinear(in_channels, out_channels, **options)
    conv = {1: qnn.QuantConv1d, 2: qnn.QuantConv2d}[len(kernel)]
    return conv(in_channels, out_channels, tuple(kernel), **options)


_PROXIES = ("weight_quant", "bias_quant", "input_quant", "output_quant")


def adopt_layer(module: nn.Module) -> Adoption | None:
    """A Brevitas QuantLinear/QuantConv1d/QuantConv2d (e.g. from `layerwise_quantize`) as a layer
    a recipe can give MoDiff: `base_quantizer: brevitas` with the layer's own weight and input
    injectors and bit-widths (a disabled quantizer is float). Its input quantizer is recalibrated,
    on temporal differences under `modiff`. Output quantization cannot be kept and is refused; bias
    quantization (Brevitas' 32-bit Int32Bias by default) is not applied, as `explain` says."""
    if not type(module).__module__.startswith("brevitas."):
        return None
    qnn = brevitas().nn
    kinds = {qnn.QuantLinear: nn.Linear, qnn.QuantConv1d: nn.Conv1d, qnn.QuantConv2d: nn.Conv2d}
    layer_type = next((base for kind, base in kinds.items() if isinstance(module, kind)), None)
    if layer_type is None:
        return None
    if module.output_quant.is_quant_enabled:
        raise ValueError(
            f"{type(module).__name__} with output quantization cannot be adopted: "
            "a MoDiff layer quantizes its input and weight only"
        )
    options: dict[str, Any] = {}
    settings: dict[str, Any] = {"base_quantizer": "brevitas"}
    for proxy, key, option in (
        (module.weight_quant, "w_bits", "weight_quant"),
        (module.input_quant, "a_bits", "act_quant"),
    ):
        if proxy.is_quant_enabled:
            settings[key] = int(proxy.bit_width())
            options[option] = proxy.quant_injector
        else:
            settings[key] = FLOAT_BITS
    settings["base_quantizer_options"] = options
    bias = module.bias_quant
    not_applied = (f"bias_quant {bias.quant_injector.__name__}",) if bias.is_quant_enabled else ()
    return Adoption(layer_type, settings, _release, f"brevitas {type(module).__name__}", not_applied)


def _release(module: nn.Module) -> None:
    for name in _PROXIES:
        module._modules.pop(name, None)
