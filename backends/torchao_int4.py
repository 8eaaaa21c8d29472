"""`torchao_int4`: group-wise int4 weights and affine activations through torchao's own primitives.

Weights become torchao tensors (4 bits; 2-8 bits for layers a recipe keeps wider, such as W8
first and last layers). A Linear whose input splits into groups of 32, 64 or 128 with
asymmetric 4-bit weights is packed for torchao's int4 kernel: on CPU `Int4OpaqueTensor` (the path
of `PrototypeInt4WeightOnlyConfig`; the stable `Int4WeightOnlyConfig` has no CPU path in torchao
0.18), on CUDA for bfloat16 models `Int4Tensor`. Every other layer (Conv2d, symmetric weights,
other group sizes or bit-widths) is an `IntxUnpackedToInt8Tensor` over groups of the flattened
input and computes with its dequantized values, as torchao's Intx path does. Activations (raw
inputs or MoDiff's temporal differences) go through `choose_qparams_affine` / `quantize_affine`
/ `dequantize_affine` on every call.
"""

from __future__ import annotations

import math
from functools import cache
from types import ModuleType
from typing import Any, Literal

import torch
from torch import Tensor, nn

from modiff_quant.base_quantizer import (
    ActivationQuantizer,
    BaseQuantizer,
    UnsupportedSetting,
)
from modiff_quant.imports import optional_import
from modiff_quant.quant import Granularity, QuantSpec
from modiff_quant.registry import register_base_quantizer

PACKED_GROUP_SIZES = (32, 64, 128)
"""Group sizes torchao's int4 kernels take."""

MIN_WEIGHT_BITS, MAX_WEIGHT_BITS = 2, 8


@cache
def torchao() -> ModuleType:
    """torchao, imported on first use: `import modiff_quant` must not need it."""
    return optional_import("torchao", "quantization", "prototype.quantization.int4", extra="torchao")


def _has_int4_kernel(weight: Tensor) -> bool:
    """torchao 0.18's int4 Linear kernels: CPU (float32 or bfloat16), CUDA (bfloat16 only)."""
    return weight.device.type == "cpu" or (weight.device.type == "cuda" and weight.dtype == torch.bfloat16)


def _mapping(symmetric: bool) -> object:
    mapping = torchao().quantization.quant_primitives.MappingType
    return mapping.SYMMETRIC if symmetric else mapping.ASYMMETRIC


def _block_size(x: Tensor, spec: QuantSpec, channel_dim: int) -> tuple[int, ...]:
    """torchao's block size (elements sharing one scale) for an activation granularity."""
    shape, dim = list(x.shape), channel_dim % x.dim()
    kind = spec.granularity.kind
    if kind == "sample":
        shape[0] = 1
    elif kind in ("channel", "group"):
        shape[dim] = 1 if kind == "channel" else spec.granularity.group_size
    return tuple(shape)


class TorchaoActivationQuantizer(ActivationQuantizer):
    """Dynamic affine quantization by torchao's primitives: scale and zero point from each input."""

    def _quantize(self, x: Tensor) -> Tensor:
        if x.numel() == 0:
            return x
        primitives = torchao().quantization.quant_primitives
        block = _block_size(x, self.spec, self.channel_dim)
        codes_dtype = torch.int32
        scale, zero_point = primitives.choose_qparams_affine(
            x,
            _mapping(self.spec.symmetric),
            block,
            codes_dtype,
            self.spec.qmin,
            self.spec.qmax,
            eps=torch.finfo(torch.float32).tiny,
        )
        codes = primitives.quantize_affine(x, block, scale, zero_point, codes_dtype, self.spec.qmin, self.spec.qmax)
        return primitives.dequantize_affine(
            codes, block, scale, zero_point, codes_dtype, self.spec.qmin, self.spec.qmax, output_dtype=x.dtype
        )


@register_base_quantizer("torchao_int4")
class TorchaoInt4Quantizer(BaseQuantizer):
    """int4 (or 2-8 bit) weights in groups of `w_granularity: group:N` (or one group per output channel with
    `channel`), as torchao tensors; activations quantized dynamically by torchao.

    `fallback` decides what a layer whose flattened input width is not a multiple of N gets:
    `channel` (one int4 group per output channel) or `float` (weights left unquantized). `explain`
    lists every layer's storage, fallbacks included.
    """

    def __init__(self, fallback: Literal["channel", "float"] = "channel") -> None:
        if fallback not in ("channel", "float"):
            raise ValueError(f"fallback must be 'channel' or 'float', got {fallback!r}")
        self.fallback = fallback

    def adaptations(self, weight: QuantSpec, activation: QuantSpec) -> dict[str, tuple[Any, str]]:
        if weight.is_float or weight.granularity.kind in ("group", "channel"):
            return {}
        return {"w_granularity": (Granularity("channel"), "torchao's int4 layouts scale per channel or group")}

    def check_layer(self, layer: nn.Module, weight: QuantSpec, activation: QuantSpec) -> None:
        if weight.is_float:
            return
        if not MIN_WEIGHT_BITS <= weight.bits <= MAX_WEIGHT_BITS:
            raise UnsupportedSetting(
                "w_bits",
                f"quantizes weights to {MIN_WEIGHT_BITS}-{MAX_WEIGHT_BITS} bits (torchao's intN dtypes) or float, "
                f"got w_bits {weight.bits}",
            )
        if weight.granularity.kind not in ("group", "channel"):
            raise UnsupportedSetting(
                "w_granularity", f"takes w_granularity group:N or channel, got {weight.granularity}"
            )
        storage, _, group = self._storage(layer.weight, weight)
        if storage != "float" and group == 1:
            # torchao 0.18's choose_qparams_affine has no dimension to reduce when a block is a single
            # element; it then reduces over the whole weight and fails reshaping the one scale it got
            width = math.prod(layer.weight.shape[1:])
            if width > 1:
                remedy = "use group:N with N >= 2"
            else:  # any group is a single element
                remedy = "keep its weight float (w_bits: float, or fallback: float with group:N, N >= 2)"
            raise UnsupportedSetting(
                "w_granularity",
                "torchao cannot quantize groups of one weight element, "
                f"which {weight.granularity} gives this layer (flattened input {width}); {remedy}",
            )

    def weight_note(self, layer: nn.Module, weight: QuantSpec) -> str | None:
        if weight.is_float:
            return None
        return self._storage(layer.weight, weight)[1]

    def _storage(self, weight: Tensor, spec: QuantSpec) -> tuple[Literal["packed", "intx", "float"], str, int]:
        """(format, description, group size) of a weight under this quantizer."""
        width = math.prod(weight.shape[1:])
        group = spec.granularity.group_size if spec.granularity.kind == "group" else width
        fallback = width % group != 0
        if fallback and self.fallback == "float":
            return (
                "float",
                f"float: flattened input {width} is not a multiple of group {group} (fallback: float)",
                width,
            )
        note = ""
        if fallback:
            group = width
            note = f" (fallback: channel; flattened input {width} is not a multiple of {spec.granularity.group_size})"
        if (
            spec.bits == 4
            and weight.dim() == 2
            and not spec.symmetric
            and group in PACKED_GROUP_SIZES
            and _has_int4_kernel(weight)
        ):
            if weight.device.type == "cpu":
                kernel = "Int4OpaqueTensor (CPU int4 kernel)"
            else:
                kernel = "Int4Tensor (CUDA int4 kernel)"
            return "packed", f"{kernel}, group {group}{note}", group
        symmetry = "symmetric" if spec.symmetric else "asymmetric"
        description = f"IntxUnpackedToInt8Tensor int{spec.bits} {symmetry}, group {group}, dequantized{note}"
        return "intx", description, group

    def quantize_weight(self, weight: Tensor, spec: QuantSpec) -> Tensor:
        if spec.is_float:
            return weight
        storage, _, group = self._storage(weight, spec)
        if storage == "float":
            return weight
        ao = torchao()
        if storage == "packed":
            if weight.device.type == "cpu":
                return ao.prototype.quantization.int4.Int4OpaqueTensor.from_hp(weight, [1, group])
            return ao.quantization.Int4Tensor.from_hp(weight, [1, group])
        flat = ao.quantization.IntxUnpackedToInt8Tensor.from_hp(
            weight.flatten(1), (1, group), getattr(torch, f"int{spec.bits}"), mapping_type=_mapping(spec.symmetric)
        )
        return flat.dequantize().reshape(weight.shape).to(weight.dtype)

    def activation_quantizer(self, spec: QuantSpec, channel_dim: int) -> ActivationQuantizer:
        return TorchaoActivationQuantizer(spec, channel_dim)
