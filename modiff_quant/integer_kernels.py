"""Integer execution of Linear / Conv1d / Conv2d layers on CPU: int8 weights times integer
activation codes, accumulated in int32 by oneDNN's u8×s8 kernels.

Fake quantization runs each layer in float on dequantized values; since the layer is linear, the
same result (to float32 rounding) comes from running it on the integer codes and scaling the
output, which oneDNN does 5-10× faster than a float convolution on CPUs with VNNI or AMX.

The kernels take uint8 activations with a zero point, so centered codes (c − z) are shifted into
[0, 255]; codes spanning more than 256 values (8-bit codes minus a per-sample zero point) are
split into two pieces that each fit, and the two outputs summed (exact by linearity).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
from torch import Tensor, nn

_OPS = ("qconv_prepack", "qconv2d_pointwise", "qlinear_prepack", "qlinear_pointwise")
_CODE_LIMIT = 255  # |centered| bound: 8-bit codes minus an 8-bit zero point


class UnsupportedWeights(ValueError):
    """A layer or its weight cannot run on the integer kernels; the message says why."""


class _ConvParams(NamedTuple):
    stride: list[int]
    padding: list[int]
    dilation: list[int]
    groups: int


@functools.cache
def unavailable_reason() -> str | None:
    """Why integer execution cannot run here, or None when it can.

    Besides checking that the oneDNN int8 ops exist (x86 builds only), runs worst-case uint8
    codes (255, zero point 128) against weights 127 through both kernels: CPUs without VNNI/AMX
    take a path that saturates 16-bit sums of 255·127 products or halves the weights, which would
    silently break exactness.
    """
    if not all(hasattr(torch.ops.onednn, name) for name in _OPS):
        return (
            "integer execution needs the oneDNN int8 ops (torch.ops.onednn.qconv2d_pointwise, qlinear_pointwise), "
            "which this torch build lacks"
        )
    codes = torch.full((1, 64), 255, dtype=torch.uint8)
    weight = torch.full((1, 64), 127, dtype=torch.int8)
    ones, zeros = torch.ones(1), torch.zeros(1, dtype=torch.int64)
    expected = 64 * 127 * 127
    linear = torch.ops.onednn.qlinear_pointwise(
        codes,
        1.0,
        128,
        torch.ops.onednn.qlinear_prepack(weight, None),
        ones,
        zeros,
        None,
        1.0,
        0,
        torch.float32,
        "none",
        [],
        "",
    )
    packed = torch.ops.onednn.qconv_prepack(
        weight.view(1, 64, 1, 1), ones, 1.0, 128, [1, 1], [0, 0], [1, 1], 1, [1, 64, 1, 1]
    )
    conv = torch.ops.onednn.qconv2d_pointwise(
        codes.view(1, 64, 1, 1),
        1.0,
        128,
        packed,
        ones,
        zeros,
        None,
        [1, 1],
        [0, 0],
        [1, 1],
        1,
        1.0,
        0,
        torch.float32,
        "none",
        [],
        "",
    )
    if linear.item() != expected or conv.item() != expected:
        got = f"{linear.item():.0f} / {conv.item():.0f}"
        return (
            f"oneDNN int8 kernels are not exact on this CPU (probe gave {got}, expected {expected}); "
            "integer execution needs VNNI or AMX"
        )
    return None


class IntegerWeights:
    """The int8 weights of one layer, prepacked for the oneDNN kernels, and `run` on activation codes."""

    def __init__(self, codes: Tensor, scales: Tensor, conv: _ConvParams | None, unit_height: bool) -> None:
        self._codes = codes  # int8, shaped as the kernel takes them (Conv1d with a unit height)
        self._packed: dict[tuple[int, ...], Tensor] = {}  # see `_packed_weights`
        self._scales = scales
        self._zero_points = torch.zeros(scales.numel(), dtype=torch.int64)
        self._conv = conv  # as the 2-d kernel takes them; None for Linear
        self._unit_height = unit_height  # Conv1d, run as a Conv2d over [B, C, 1, L]

    @classmethod
    def from_layer(cls, layer: nn.Module, weight: Tensor, bits: int) -> IntegerWeights:
        """Pack `weight` (the layer's fake-quantized float weight) for integer execution.

        `weight` must lie on a symmetric lattice of `bits` (2-8) bits per output channel: w = s·c
        with integer c in [-2^(b-1), 2^(b-1) - 1]. The lattice is recovered and checked to within
        1e-6 of each channel's largest |w|, else UnsupportedWeights is raised (e.g. group-wise or
        asymmetric weight scales). `layer` supplies stride/padding/dilation/groups.
        """
        reason = unavailable_reason()
        if reason is not None:
            raise RuntimeError(reason)
        if not 2 <= bits <= 8:
            raise UnsupportedWeights(f"integer kernels take 2-8 bit weights, got {bits} bits")
        if not isinstance(layer, nn.Linear | nn.Conv1d | nn.Conv2d):
            raise UnsupportedWeights(
                f"integer kernels run Linear, Conv1d and Conv2d layers, not {type(layer).__name__}"
            )
        if not isinstance(layer, nn.Linear) and layer.padding_mode != "zeros":
            raise UnsupportedWeights(
                f"integer kernels pad with zeros only, this convolution has padding_mode={layer.padding_mode!r}"
            )
        codes, scales = _lattice(weight, bits)
        conv, unit_height = None, isinstance(layer, nn.Conv1d)
        if not isinstance(layer, nn.Linear):
            stride, padding, dilation = list(layer.stride), _padding(layer), list(layer.dilation)
            if unit_height:
                codes = codes.unsqueeze(2)
                stride, padding, dilation = [1, *stride], [0, *padding], [1, *dilation]
            conv = _ConvParams(stride, padding, dilation, layer.groups)
        return cls(codes, scales, conv, unit_height)

    def run(
        self,
        centered: Tensor,
        scale: Tensor,
        accumulate: Tensor | None = None,
        *,
        bounds: tuple[int, int] | None = None,
    ) -> Tensor:
        """The layer without bias on centered·scale, plus `accumulate` if given, in float32.

        `centered` holds the integer values c − z of the activation codes (a float tensor with
        integral values, or an integer tensor), within [-255, 255]; `scale` is one scale (any
        shape with one element) or one per sample, shaped [B, 1, ..., 1]. `bounds` are inclusive
        bounds on `centered` the caller guarantees (e.g. its quantizer's code range minus the
        zero points); without them one min/max pass over `centered` measures them. The output
        keeps the memory format of `centered`, as F.conv2d does. Inference only: no gradient.
        """
        low, high = bounds if bounds is not None else _measure(centered)
        if low < -_CODE_LIMIT or high > _CODE_LIMIT:
            raise ValueError(f"integer execution takes centered codes within ±{_CODE_LIMIT}, got [{low}, {high}]")
        per_tensor = scale.numel() == 1
        x_scale = float(scale) if per_tensor else 1.0
        if high - low <= _CODE_LIMIT:
            out = self._kernel(centered, low, high, x_scale)
        else:  # split c = clamp(c, -128, 127) + rest, where rest lies in [-127, 128]
            first = centered.clamp(-128, 127)
            out = self._kernel(first, -128, 127, x_scale)
            out.add_(self._kernel(centered - first, -127, 128, x_scale))
        if accumulate is not None and not per_tensor:
            return torch.addcmul(accumulate, out, scale, out=out)
        if not per_tensor:
            out.mul_(scale)
        return out if accumulate is None else out.add_(accumulate)

    def _packed_weights(self, shape: tuple[int, ...]) -> Tensor:
        """The weights packed for a convolution input shape (one packing for Linear), on first use.

        oneDNN picks the weight blocking per input shape; a convolution call whose packing does
        not match repacks the weights on every call (0.3 ms for 256×256×3×3). Packings are for a
        nonzero input zero point, which `_encode` always uses.
        """
        if shape not in self._packed:
            if self._conv is None:
                self._packed[shape] = torch.ops.onednn.qlinear_prepack(self._codes, None)
            else:
                self._packed[shape] = torch.ops.onednn.qconv_prepack(
                    self._codes, self._scales, 1.0, 128, *self._conv, list(shape)
                )
        return self._packed[shape]

    def _kernel(self, centered: Tensor, low: int, high: int, x_scale: float) -> Tensor:
        """centered·x_scale (values in [low, high], spanning at most 256) through the layer."""
        codes, zero_point, sign = _encode(centered, low, high)
        x_scale *= sign
        if self._conv is None:
            return torch.ops.onednn.qlinear_pointwise(
                codes,
                x_scale,
                zero_point,
                self._packed_weights(()),
                self._scales,
                self._zero_points,
                None,
                1.0,
                0,
                torch.float32,
                "none",
                [],
                "",
            )
        if self._unit_height:
            codes = codes.unsqueeze(2)
        packed = self._packed_weights(tuple(codes.shape))
        out = torch.ops.onednn.qconv2d_pointwise(
            codes,
            x_scale,
            zero_point,
            packed,
            self._scales,
            self._zero_points,
            None,
            *self._conv,
            1.0,
            0,
            torch.float32,
            "none",
            [],
            "",
        )
        return out.squeeze(2) if self._unit_height else out


def _lattice(weight: Tensor, bits: int) -> tuple[Tensor, Tensor]:
    """int8 codes and float32 per-output-channel scales with codes·scale = weight.

    Each channel's scale is amax/n where n is the largest |code| of that channel: n = qmax or
    qmax + 1 for min-max and clipped scales, smaller for per-tensor scales or rounding that
    stopped short of the range, so those candidates are tried first and then every other n.
    """
    qmax = 2 ** (bits - 1) - 1
    rows = weight.detach().reshape(weight.shape[0], -1).double()
    amax = rows.abs().amax(1)
    scales = torch.ones_like(amax)  # all-zero rows keep scale 1
    pending = (amax != 0).nonzero().squeeze(1)
    for n in (qmax, qmax + 1, *range(qmax - 1, 0, -1)):
        if pending.numel() == 0:
            break
        scale = amax[pending] / n
        codes = torch.round(rows[pending] / scale[:, None])
        error = (codes * scale[:, None] - rows[pending]).abs().amax(1)
        fits = (error <= 1e-6 * amax[pending]) & (codes.amin(1) >= -qmax - 1) & (codes.amax(1) <= qmax)
        scales[pending[fits]] = scale[fits]
        pending = pending[~fits]
    if pending.numel():
        raise UnsupportedWeights(
            f"weight is not on a symmetric per-channel {bits}-bit lattice (w = s·c with integer |c| <= {qmax + 1}) "
            f"in {pending.numel()} of {rows.shape[0]} output channels, e.g. channel {pending[0].item()}"
        )
    codes = torch.round(rows / scales[:, None]).to(torch.int8).reshape(weight.shape)
    return codes, scales.float()


def _padding(layer: nn.Conv1d | nn.Conv2d) -> list[int]:
    """Explicit symmetric padding; 'same' with an odd total pad pads one side more, which the kernel cannot."""
    if layer.padding == "valid":
        return [0] * len(layer.kernel_size)
    if layer.padding == "same":
        totals = [d * (k - 1) for d, k in zip(layer.dilation, layer.kernel_size, strict=True)]
        if any(total % 2 for total in totals):
            raise UnsupportedWeights(
                "padding='same' with an even kernel extent pads asymmetrically, which the integer kernels cannot"
            )
        return [total // 2 for total in totals]
    return list(layer.padding)


def _measure(centered: Tensor) -> tuple[int, int]:
    """min and max of `centered` in one pass over a flat view (aminmax over a channels-last tensor is slow)."""
    if centered.numel() == 0:
        return 0, 0
    if (
        centered.dim() == 4
        and not centered.is_contiguous()
        and centered.is_contiguous(memory_format=torch.channels_last)
    ):
        centered = centered.permute(0, 2, 3, 1)
    low, high = torch.aminmax(centered.reshape(-1))
    return int(low), int(high)


def _encode(centered: Tensor, low: int, high: int) -> tuple[Tensor, int, int]:
    """uint8 codes u (in the memory format of `centered`), zero point z and sign σ with
    σ·(u − z) = centered, for values in [low, high] spanning at most 256.

    z is never 0, so one weight packing (with the compensation term a nonzero z needs) serves
    every call: a call with z = 0 repacks the weights, and in this torch a packing made for
    z = 0 also strips the compensation from later packings of the same shape in any layer.
    Codes in [0, 255] are therefore sent negated, as 255 − c with z = 255. Integer narrowing
    wraps modulo 256, so narrowing and then shifting in uint8 is exact; narrowing through int8
    (when the values fit) is the cheapest cast from float.
    """
    if low >= -128 and high <= 127:
        return centered.to(torch.int8, copy=True).view(torch.uint8).add_(128), 128, 1
    codes = centered.to(torch.int16).to(torch.uint8)
    if high < 255:
        zero_point = max(1, -low)
        return codes.add_(zero_point), zero_point, 1
    return codes.bitwise_not_(), 255, -1
