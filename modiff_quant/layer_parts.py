"""Building the quantization parts of one layer from its recipe settings.

Shared by recipe resolution (which builds them once to validate, so that `prepare` never fails
half-way) and by `prepare` (which keeps them).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING

from torch import nn

from .base_quantizer import ActivationQuantizer, BaseQuantizer, SplitActivationQuantizer
from .registry import BASE_QUANTIZERS, SCHEMES

if TYPE_CHECKING:
    from .recipe.settings import LayerSettings
    from .schemes import Scheme

CHANNEL_DIMS: dict[type[nn.Module], int] = {nn.Linear: -1, nn.Conv1d: -2, nn.Conv2d: -3}
"""The layer types the core wraps, and their input channel dim counted from the end (so that
unbatched inputs work too)."""


SPLIT_TYPES: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d)
"""Layers whose concatenated inputs can be split (Q-Diffusion splits convolutions only)."""


def build_parts(settings: LayerSettings, layer_type: type[nn.Module]) -> tuple[Scheme, BaseQuantizer, dict[str, list[ActivationQuantizer]]]:
    """The scheme, base quantizer and activation quantizers of one layer: per role, one per
    timestep group (a split pair where the layer splits concatenated inputs)."""
    scheme = SCHEMES.get(settings.scheme)()
    base_quantizer = BASE_QUANTIZERS.get(settings.base_quantizer)(**settings.base_quantizer_options)
    spec, dim, groups = settings.activation_spec(), CHANNEL_DIMS[layer_type], settings.timestep_groups.count
    split = splits(settings, layer_type) and not spec.is_float

    def make() -> ActivationQuantizer:
        first = base_quantizer.activation_quantizer(spec, dim)
        return SplitActivationQuantizer(first, base_quantizer.activation_quantizer(spec, dim)) if split else first

    return scheme, base_quantizer, {role: [make() for _ in range(groups)] for role in scheme.activation_roles(settings)}


def splits(settings: LayerSettings, layer_type: type[nn.Module]) -> bool:
    """Whether the layer gets split quantizers for a concatenated input (if it has one)."""
    preferred = BASE_QUANTIZERS.get(settings.base_quantizer).split_shortcuts if settings.split is None else settings.split
    return preferred and issubclass(layer_type, SPLIT_TYPES)


def needs_calibration(quantizers: Mapping[str, Iterable[ActivationQuantizer]]) -> bool:
    """True when some activation quantizer (any role, any timestep group) has static scales."""
    return any(q.needs_calibration for group in quantizers.values() for q in group)
