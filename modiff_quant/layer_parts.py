"""Building the quantization parts of one layer from its recipe settings.

Shared by recipe resolution (which builds them once to validate, so that `prepare` never fails
half-way), by `prepare` (which keeps them), and by the loads of saved calibration states (a
checkpoint, the calibration cache), which try a state on standalone parts before any layer
takes it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from .attention_products import AttentionOperand
from .base_quantizer import ActivationQuantizer, BaseQuantizer, SplitActivationQuantizer
from .quoting import excerpt
from .registry import BASE_QUANTIZERS, SCHEMES

if TYPE_CHECKING:
    from .schemes import Scheme
    from .settings import LayerSettings

CHANNEL_DIMS: dict[type[nn.Module], int] = {nn.Linear: -1, nn.Conv1d: -2, nn.Conv2d: -3}
"""The layer types the core wraps, and their input channel dim counted from the end (so that
unbatched inputs work too)."""

LAYER_TYPES: dict[type[nn.Module], int] = {**CHANNEL_DIMS, AttentionOperand: -1}
"""Every type a layer plan names, with its channel dim: the weight layers and the operands of
attention products (which have no weight)."""

PARAMETER_KEYS = ("weight", "bias")
"""The layer's own parameters in its calibration state; a saved model keeps them in its
state_dict instead."""


def layer_type_named(module_type: str) -> type[nn.Module]:
    """The layer type a plan's `module_type` names."""
    return next(kind for kind in LAYER_TYPES if kind.__name__ == module_type)


SPLIT_TYPES: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d)
"""Layers whose concatenated inputs can be split (Q-Diffusion splits convolutions only)."""


def build_parts(
    settings: LayerSettings, layer_type: type[nn.Module], widths: Sequence[int] | None = None
) -> tuple[Scheme, BaseQuantizer, dict[str, list[ActivationQuantizer]]]:
    """The scheme, base quantizer and activation quantizers of one layer: per role, one per
    activation width (`LayerPlan.activation_widths`, default `a_bits` alone) and timestep group,
    at index `width * groups + group` (a split pair where the layer splits concatenated inputs)."""
    scheme = SCHEMES.get(settings.scheme)()
    base_quantizer = BASE_QUANTIZERS.get(settings.base_quantizer)(**settings.base_quantizer_options)
    dim, groups = LAYER_TYPES[layer_type], settings.timestep_groups.count

    def make(bits: int) -> ActivationQuantizer:
        spec = settings.activation_spec(bits)
        first = base_quantizer.activation_quantizer(spec, dim)
        if not splits(settings, layer_type) or spec.is_float:
            return first
        return SplitActivationQuantizer(first, base_quantizer.activation_quantizer(spec, dim))

    return (
        scheme,
        base_quantizer,
        {
            role: [make(bits) for bits in widths or (settings.a_bits,) for _ in range(groups)]
            for role in scheme.activation_roles(settings)
        },
    )


def splits(settings: LayerSettings, layer_type: type[nn.Module]) -> bool:
    """Whether the layer gets split quantizers for a concatenated input (if it has one)."""
    preferred = (
        BASE_QUANTIZERS.get(settings.base_quantizer).split_shortcuts if settings.split is None else settings.split
    )
    return preferred and issubclass(layer_type, SPLIT_TYPES)


def needs_calibration(quantizers: Mapping[str, Iterable[ActivationQuantizer]]) -> bool:
    """True when some activation quantizer (any role, any timestep group) has static scales."""
    return any(q.needs_calibration for group in quantizers.values() for q in group)


def needs_data(
    quantizers: Mapping[str, Iterable[ActivationQuantizer]],
    base_quantizer: BaseQuantizer,
    split: bool,
    quantized_weight: bool,
) -> bool:
    """True when convert() needs calibration data for a layer: static scales or a reconstruction
    to learn (a weights-only one only for a quantized weight), or a concatenated input to find
    (`split`)."""
    learns = base_quantizer.reconstructs and (quantized_weight or not base_quantizer.reconstructs_weights_only)
    return needs_calibration(quantizers) or learns or split


@torch.no_grad()
def check_calibration_state(
    settings: LayerSettings,
    module_type: str,
    module: nn.Module,
    state: Mapping[str, Tensor],
    prefix: str = "",
    activation_widths: Sequence[int] | None = None,
) -> None:
    """Raise ValueError unless `state` (a layer's `calibration_state()` without its weight, as saved
    under `prefix`) fits a layer of these settings: load it into standalone quantizers built from
    them, as `QuantizedLayer.load_calibration_state` will, and require each to restore it exactly
    (no tensor ignored or converted) and to quantize a probe input of the layer's width to finite values."""
    layer_type = layer_type_named(module_type)
    width = input_width(module)
    split_at = state.get("split_at")
    if split_at is not None and not (
        splits(settings, layer_type)
        and split_at.dtype == torch.int64
        and split_at.dim() == 0
        and 0 < int(split_at) < width
    ):
        value = f" {excerpt(split_at.item())}" if split_at.dim() == 0 else ""
        raise ValueError(
            f"tensor '{prefix}split_at' must be one int64 in 1..{width - 1} of a layer that splits its input, got "
            f"{split_at.dtype} {list(split_at.shape)}{value}"
        )
    weight = getattr(module, "weight", None)
    dtype = weight.dtype if weight is not None and weight.is_floating_point() else torch.float32
    probe = torch.linspace(-1.0, 1.0, width, dtype=dtype).reshape(1, width, *[1] * (-LAYER_TYPES[layer_type] - 1))
    taken = {"split_at", *PARAMETER_KEYS}
    for role, group in build_parts(settings, layer_type, activation_widths)[2].items():
        for index, quantizer in enumerate(group):
            start = f"{role}.{index}."
            part = {key.removeprefix(start): value for key, value in state.items() if key.startswith(start)}
            taken.update(start + key for key in part)
            try:
                if isinstance(quantizer, SplitActivationQuantizer):
                    quantizer.split_at = None if split_at is None else int(split_at)
                quantizer.load_frozen_state(part)
                _same_state(quantizer.frozen_state(), part)
                output = quantizer.eval()(probe)
                if output.shape != probe.shape or not bool(output.isfinite().all()):
                    raise ValueError("it quantizes a probe input to non-finite values")
            except Exception as exc:  # noqa: BLE001 - whatever a quantizer (a plugin's too) raises, the state does not fit
                raise ValueError(
                    f"tensors '{prefix}{start}*' (its {role} quantizer {index}) cannot be used: {excerpt(str(exc))}"
                ) from None
    unexpected = sorted(state.keys() - taken)
    if unexpected:
        raise ValueError(f"tensor '{prefix}{excerpt(unexpected[0])}' belongs to no quantizer of this layer")


def input_width(module: nn.Module) -> int:
    """Input channels of a weight layer; an operand's width is known only when it runs (2 probes
    one scale per tensor or sample, which is all an operand may have)."""
    if isinstance(module, AttentionOperand):
        return 2
    return module.in_features if isinstance(module, nn.Linear) else module.in_channels


def _same_state(restored: Mapping[str, Tensor], saved: Mapping[str, Tensor]) -> None:
    if restored.keys() != saved.keys():
        raise ValueError(
            f"it keeps {', '.join(sorted(restored)) or 'nothing'}, but {', '.join(sorted(saved)) or 'nothing'} were "
            "saved"
        )
    for key, value in saved.items():
        if (
            restored[key].dtype != value.dtype
            or restored[key].shape != value.shape
            or not torch.equal(restored[key], value)
        ):
            raise ValueError(f"{key} is not restored as saved ({value.dtype} {list(value.shape)})")
