"""Uniform affine fake quantization with straight-through rounding.

Everything here is pure tensor math shared by base quantizers and observers: how a
granularity groups the elements that share one scale, how a range becomes a scale and a
zero point, and the quantize-dequantize step itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from .quoting import shown

FLOAT_BITS = 32
"""Bit-width meaning "leave this tensor unquantized" (written `float` or `32` in recipes)."""

SKIP_BITS = 0
"""Activation bit-width meaning "skip": reuse the cached output instead of computing."""

MIN_BITS, MAX_BITS = 2, 16

Codes = tuple[Tensor, Tensor, tuple[int, int]]
"""Centered integer codes of a quantized activation, their scale (per tensor or per sample) and
the bounds on the codes that the spec guarantees."""

_RANGE_LIMIT = 1e38  # ranges are clipped here so dequantized float32 values stay finite
_SCALE_FLOOR = torch.finfo(torch.float32).tiny  # below it scales lose precision (subnormals)

GranularityKind = Literal["tensor", "sample", "channel", "group"]


def count_suffix(value: object, prefix: str) -> int | None:
    """N from `<prefix>N` with N a positive integer of at most 9 ASCII digits (as in `group:32`,
    `warmup:4`), else None: int() of thousands of digits is slow or an error."""
    if not isinstance(value, str) or not value.startswith(prefix):
        return None
    digits = value[len(prefix) :]
    return int(digits) if digits.isascii() and digits.isdecimal() and len(digits) <= 9 and int(digits) > 0 else None


@dataclass(frozen=True)
class Granularity:
    """Which elements share one scale.

    For activations: `tensor` (whole batch), `sample` (one per batch item), `channel` (one per
    input channel over batch and positions), `group:N` (N consecutive channels). For weights:
    `tensor`, `channel` (one per output channel), `group:N` (N consecutive elements of the
    flattened input dimensions of each output channel, as torchao's int4 groups).
    """

    kind: GranularityKind
    group_size: int = 0

    @classmethod
    def parse(cls, text: str) -> Granularity:
        if text in ("tensor", "sample", "channel"):
            return cls(text)
        size = count_suffix(text, "group:")
        if size is not None:
            return cls("group", size)
        raise ValueError(f"unknown granularity {shown(text)}: expected tensor, sample, channel or group:N")

    def __str__(self) -> str:
        return f"group:{self.group_size}" if self.kind == "group" else self.kind


@dataclass(frozen=True)
class QuantSpec:
    """Bit-width, symmetry and granularity of one quantized tensor."""

    bits: int
    symmetric: bool
    granularity: Granularity

    def __post_init__(self) -> None:
        if self.bits != FLOAT_BITS and not MIN_BITS <= self.bits <= MAX_BITS:
            raise ValueError(f"bits must be {MIN_BITS}-{MAX_BITS} or {FLOAT_BITS} (float), got {self.bits}")

    @property
    def is_float(self) -> bool:
        return self.bits == FLOAT_BITS

    @property
    def qmin(self) -> int:
        return -(2 ** (self.bits - 1)) if self.symmetric else 0

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1 if self.symmetric else 2**self.bits - 1


def is_packed(tensor: Tensor) -> bool:
    """True for a tensor subclass that holds quantized integers (e.g. torchao's int4 tensors)
    rather than float values; a Parameter's `.data` or a plain tensor is not packed."""
    return type(tensor) not in (Tensor, torch.nn.Parameter)


def round_ste(x: Tensor) -> Tensor:
    """Round to nearest with a straight-through gradient, so quantizers stay trainable."""
    return x + (torch.round(x) - x).detach()


def stats_view(
    x: Tensor, granularity: Granularity, *, channel_dim: int = 1, weight: bool = False
) -> tuple[Tensor, tuple[int, ...]]:
    """A view of `x` and the dims over which one scale is shared (reduce with keepdim=True).

    Reducing keeps every non-shared dim, so a statistic's shape broadcasts against the view and,
    except for `sample`, does not depend on batch or spatial size (static scales stay valid).
    """
    kind, ndim = granularity.kind, x.dim()
    if kind == "tensor":
        return x, tuple(range(ndim))
    if kind == "sample":
        if weight:
            raise ValueError("granularity 'sample' applies to activations only")
        return x, tuple(range(1, ndim))
    if weight:
        flat = x.flatten(1)
        if kind == "channel":
            return flat, (1,)
        return _split(flat, 1, granularity.group_size, "flattened input size"), (2,)
    dim = channel_dim % ndim
    if kind == "channel":
        return x, tuple(d for d in range(ndim) if d != dim)
    grouped = _split(x, dim, granularity.group_size, "channel count")
    return grouped, tuple(d for d in range(ndim + 1) if d != dim)


def _split(x: Tensor, dim: int, group_size: int, what: str) -> Tensor:
    if x.shape[dim] % group_size:
        raise ValueError(f"group:{group_size} needs a {what} divisible by {group_size}, got {x.shape[dim]}")
    return x.unflatten(dim, (-1, group_size))


def qparams(lo: Tensor, hi: Tensor, spec: QuantSpec) -> tuple[Tensor, Tensor]:
    """Scale and zero point covering [lo, hi].

    Asymmetric ranges are widened to include 0 so that zero is exact. Ranges are clipped to
    ±1e38 and scales floored at the smallest normal float, so an all-zero range quantizes to
    exact zeros and no finite input produces NaN or Inf.
    """
    lo = lo.detach().float().clamp(-_RANGE_LIMIT, 0.0 if not spec.symmetric else _RANGE_LIMIT)
    hi = hi.detach().float().clamp(0.0 if not spec.symmetric else -_RANGE_LIMIT, _RANGE_LIMIT)
    if spec.symmetric:
        scale = (torch.maximum(lo.abs(), hi.abs()) / spec.qmax).clamp_min(_SCALE_FLOOR)
        return scale, torch.zeros_like(scale)
    scale = (hi / (spec.qmax - spec.qmin) - lo / (spec.qmax - spec.qmin)).clamp_min(_SCALE_FLOOR)
    return scale, (spec.qmin - torch.round(lo / scale)).clamp(spec.qmin, spec.qmax)


def centered_codes(x: Tensor, scale: Tensor, zero_point: Tensor, spec: QuantSpec) -> Tensor:
    """clamp(round(x/s) + z, qmin, qmax) - z: integer values (as floats) that times s give the
    quantized x; what integer execution feeds its int8 kernels."""
    return torch.clamp(round_ste(x / scale) + zero_point, spec.qmin, spec.qmax) - zero_point


def fake_quantize(x: Tensor, scale: Tensor, zero_point: Tensor, spec: QuantSpec) -> Tensor:
    """Quantize-dequantize: clamp(round(x/s) + z, qmin, qmax), mapped back as (q - z) * s."""
    return (centered_codes(x, scale, zero_point, spec) * scale).to(x.dtype)


def minmax_qparams(
    x: Tensor, spec: QuantSpec, *, channel_dim: int = 1, weight: bool = False
) -> tuple[Tensor, Tensor, Tensor]:
    """The grouped view of `x`, and the scale and zero point of its own min/max per group."""
    view, dims = stats_view(x, spec.granularity, channel_dim=channel_dim, weight=weight)
    scale, zero_point = qparams(view.amin(dims, keepdim=True), view.amax(dims, keepdim=True), spec)
    return view, scale, zero_point


def quantize_minmax(x: Tensor, spec: QuantSpec, *, channel_dim: int = 1, weight: bool = False) -> Tensor:
    """Fake-quantize `x` with scales from its own min/max at the spec's granularity."""
    if spec.is_float or x.numel() == 0:
        return x
    view, scale, zero_point = minmax_qparams(x, spec, channel_dim=channel_dim, weight=weight)
    return fake_quantize(view, scale, zero_point, spec).reshape(x.shape)


def fake_quantize_grouped(
    x: Tensor, scale: Tensor, zero_point: Tensor, spec: QuantSpec, *, channel_dim: int = 1, weight: bool = False
) -> Tensor:
    """`fake_quantize` with parameters shaped like a keepdim statistic of `stats_view(x)`."""
    view, _ = stats_view(x, spec.granularity, channel_dim=channel_dim, weight=weight)
    return fake_quantize(view, scale, zero_point, spec).reshape(x.shape)
