"""Adopting layers another quantization framework already converted (e.g. Brevitas' QuantConv2d):
a recipe gives them MoDiff, starting from the quantization they carry.

An adopter plugin (entry-point group `modiff_quant.layer_adopters`) recognises its framework's
layers and says what they are: the torch layer type underneath, the recipe settings their own
quantizers stand for (recipe rules still override them), and how to remove those quantizers so
that the layer becomes a plain one that `prepare` can re-class.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from .registry import Registry


@dataclass(frozen=True)
class Adoption:
    layer_type: type[nn.Module]  # nn.Linear, nn.Conv1d or nn.Conv2d
    settings: Mapping[str, Any]  # LayerSettings values implied by the layer's own quantizers
    release: Callable[[nn.Module], None]  # removes the foreign quantizers from the module
    origin: str  # e.g. "brevitas QuantConv2d", for explain
    not_applied: tuple[str, ...] = field(default=())  # foreign quantization MoDiff layers do not do


ADOPTERS: Registry[Callable[[nn.Module], Adoption | None]] = Registry("layer adopter", "modiff_quant.layer_adopters")


def adopt(module: nn.Module) -> Adoption | None:
    """The adoption of a foreign layer by the first adopter that recognises it, else None."""
    for name in ADOPTERS.names():
        adoption = ADOPTERS.get(name)(module)
        if adoption is not None:
            return adoption
    return None
