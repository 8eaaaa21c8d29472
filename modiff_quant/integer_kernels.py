"""Integer execution of Linear / Conv1d / Conv2d layers on CPU: int8 weights times integer
activation codes, accumulated in int32 by oneDNN's u8×s8 kernels.

Fake quantization runs each layer in float on dequantized values; since the layer is linear, the
same result (to float32 rounding) comes from running it on the integer codes and scaling the
output, which oneDNN does 5-10× faster than a float convolution on CPUs with VNNI or AMX, and
about 1.6× faster on AVX2 alone.

The kernels take uint8 activations with a zero point, so centered codes (c − z) are shifted into
[0, U]. U is 255 on CPUs with VNNI or AMX. Without them oneDNN multiplies with 16-bit pairwise
sums (vpmaddubsw) that saturate above 127·128·2, so U is 127 there: 4-bit codes fit either way.
Codes spanning more than U values (8-bit codes minus a per-sample zero point) are split into
pieces that each fit, and the outputs summed (exact by linearity).

The kernels take symmetric weights only (weight zero point 0). Asymmetric weights s·(c + o) run as
s·c on the kernels plus s·o times the sum of the input over each output's receptive field: a
channel sum and a window sum, computed in float and exact. Few operations, but float ones beside
int8 kernels: eager W8A4 MoDiff sampling took about 10 % longer with them (docs/results.md).

Everything here traces under torch.compile without a host sync when the caller gives static
code bounds: the zero point, the pieces and the sign are Python ints known from the bounds, and
scales stay tensors (applied after the product, where inductor fuses them with the accumulation).
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

_OPS = ("qconv_prepack", "qconv2d_pointwise", "qlinear_prepack", "qlinear_pointwise")
_CODE_LIMIT = 255  # |centered| bound: 8-bit codes minus an 8-bit zero point
_PROBE_WIDTH = 64
_POST_OPS = (1.0, 0, torch.float32, "none", [], "")  # output scale, zero point, dtype; no fused op
_ONE = torch.ones(())


class UnsupportedWeights(ValueError):
    """A layer or its weight cannot run on the integer kernels; the message says why."""


class _ConvParams(NamedTuple):
    stride: list[int]
    padding: list[int]
    dilation: list[int]
    groups: int


_POINTWISE = _ConvParams([1, 1], [0, 0], [1, 1], 1)  # a Linear as a 1×1 convolution


def _probe(code: int) -> list[float]:
    """Outputs of a linear and a 1×1 convolution on uint8 inputs `code` (zero point 1) against
    weights of -128 (the worst case for a saturating 16-bit pairwise sum) and of 127 (odd, so a
    kernel that halves the weights shows)."""
    codes = torch.full((1, _PROBE_WIDTH), code, dtype=torch.uint8)
    weight = torch.tensor([[-128], [127]], dtype=torch.int8).expand(2, _PROBE_WIDTH).contiguous()
    ones, zeros = torch.ones(2), torch.zeros(2, dtype=torch.int64)
    linear = torch.ops.onednn.qlinear_pointwise(
        codes, 1.0, 1, torch.ops.onednn.qlinear_prepack(weight, None), ones, zeros, None, *_POST_OPS
    )
    image = codes.view(1, _PROBE_WIDTH, 1, 1)
    packed = torch.ops.onednn.qconv_prepack(
        weight.view(2, _PROBE_WIDTH, 1, 1), ones, 1.0, 1, *_POINTWISE, list(image.shape)
    )
    conv = torch.ops.onednn.qconv2d_pointwise(image, 1.0, 1, packed, ones, zeros, None, *_POINTWISE, *_POST_OPS)
    return [*linear.flatten().tolist(), *conv.flatten().tolist()]


@functools.cache
def code_range() -> int | None:
    """U: the largest uint8 input the kernels multiply exactly here (255 or 127), None if neither."""
    if not all(hasattr(torch.ops.onednn, name) for name in _OPS):
        return None
    for limit in (255, 127):
        exact = [_PROBE_WIDTH * (limit - 1) * w for w in (-128, 127)] * 2
        if _probe(limit) == exact:
            return limit
    return None


def unavailable_reason() -> str | None:
    """Why integer execution cannot run here, or None when it can."""
    if not all(hasattr(torch.ops.onednn, name) for name in _OPS):
        return (
            "integer execution needs the oneDNN int8 ops (torch.ops.onednn.qconv2d_pointwise, qlinear_pointwise), "
            "which this torch build lacks"
        )
    if code_range() is None:
        return (
            "oneDNN int8 kernels are not exact on this CPU even for 7-bit inputs; "
            "integer execution needs AVX2, VNNI or AMX"
        )
    return None


class IntegerWeights:
    """The int8 weights of one layer, prepacked for the oneDNN kernels, and `run` on activation codes."""

    def __init__(
        self, codes: Tensor, scales: Tensor, offsets: Tensor, conv: _ConvParams | None, unit_height: bool
    ) -> None:
        linear = conv is None
        self._codes = codes.view(*codes.shape, 1, 1) if linear else codes  # int8, as the conv kernel takes them
        self._scales = scales
        self._offsets = None if not offsets.any() else scales * offsets  # s·o per output channel; None: symmetric
        self._window = torch.ones(1 if linear else conv.groups, 1, *self._codes.shape[2:])  # sums a receptive field
        self._zero_points = torch.zeros(scales.numel(), dtype=torch.int64)
        self._conv = _POINTWISE if conv is None else conv  # as the 2-d kernel takes them
        self._unit_height = unit_height  # Conv1d, run as a Conv2d over [B, C, 1, L]
        self._limit = code_range() or 0  # U; from_layer has checked that the kernels exist
        self._linear = torch.ops.onednn.qlinear_prepack(codes, None) if linear else None
        self._any_shape = self._pack(None)
        self._packed: dict[tuple[int, ...], Tensor] = {}  # see `_packed_weights`

    @classmethod
    def from_layer(cls, layer: nn.Module, weight: Tensor, bits: int) -> IntegerWeights:
        """Pack `weight` (the layer's fake-quantized float weight) for integer execution.

        `weight` must lie on a per-output-channel lattice of `bits` (2-8) bits: w = s·(c + o) with
        integer c in [-2^(b-1), 2^(b-1) - 1], o = 0 for symmetric weights, else the channel's
        offset (the zero point of asymmetric weights, corrected at run time from the input's window
        sums). The lattice is recovered and checked to within 1e-6 of each channel's largest |w|,
        else UnsupportedWeights is raised (e.g. group-wise weight scales). `layer` supplies
        stride/padding/dilation/groups.
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
        codes, scales, offsets = _lattice(weight, bits)
        conv, unit_height = None, isinstance(layer, nn.Conv1d)
        if not isinstance(layer, nn.Linear):
            stride, padding, dilation = list(layer.stride), _padding(layer), list(layer.dilation)
            if unit_height:
                codes = codes.unsqueeze(2)
                stride, padding, dilation = [1, *stride], [0, *padding], [1, *dilation]
            conv = _ConvParams(stride, padding, dilation, layer.groups)
        return cls(codes, scales, offsets, conv, unit_height)

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
        zero points). Eager calls measure the codes (one min/max pass and a host sync) when no
        bounds are given or when the bounds span more than one kernel call takes, which often
        saves a piece; compiled calls use the bounds as given. The output keeps the memory
        format of `centered`, as F.conv2d does. Inference only: no gradient.
        """
        if bounds is None or (bounds[1] - bounds[0] > self._limit and not torch.compiler.is_compiling()):
            bounds = _measure(centered)
        low, high = bounds
        if low < -_CODE_LIMIT or high > _CODE_LIMIT:
            raise ValueError(f"integer execution takes centered codes within ±{_CODE_LIMIT}, got [{low}, {high}]")
        out: Tensor | None = None
        for piece, piece_low, piece_high in _pieces(centered, low, high, self._limit):
            part = self._kernel(piece, piece_low, piece_high)
            out = part if out is None else out.add_(part)
        assert out is not None
        if self._offsets is not None:
            out = self._add_zero_point_correction(out, centered)
        return _scaled(out, scale, accumulate)

    def _add_zero_point_correction(self, out: Tensor, centered: Tensor) -> Tensor:
        """Add what the weight offsets contribute, in place: s·o times the sum of the input over
        each output's receptive field (each group's channel sum, then a window sum; exact in
        float32 while 255·fan-in < 2^24), broadcast over the group's output channels."""
        x, offsets = centered.float(), self._offsets
        if self._linear is not None:
            return out.addcmul_(x.sum(-1, keepdim=True), offsets)
        groups = self._conv.groups
        image = x.unsqueeze(2) if self._unit_height else x
        sums = F.conv2d(image.unflatten(1, (groups, -1)).sum(2), self._window, None, *self._conv)
        sums = sums.squeeze(2) if self._unit_height else sums  # [B, groups, *spatial]
        spatial = [1] * (out.dim() - 2)
        out.unflatten(1, (groups, -1)).addcmul_(sums.unsqueeze(2), offsets.view(groups, -1, *spatial))
        return out

    def _packed_weights(self, shape: tuple[int, ...]) -> Tensor:
        """The convolution weights packed for an input shape.

        oneDNN picks the weight blocking per input shape; with VNNI or AMX a convolution call
        whose packing does not match reorders the weights on every call (0.3 ms for 256×256×3×3).
        Eager calls therefore pack per shape on first use. Compiled code takes the packing made
        for any shape: a packing made while tracing would be a side effect that recompiles.
        Packings are for a nonzero input zero point, which `_encode` always uses.
        """
        if torch.compiler.is_compiling():
            return self._any_shape
        if shape not in self._packed:
            self._packed[shape] = self._pack(list(shape))
        return self._packed[shape]

    def _pack(self, shape: list[int] | None) -> Tensor:
        return torch.ops.onednn.qconv_prepack(self._codes, self._scales, 1.0, 128, *self._conv, shape)

    def _kernel(self, centered: Tensor, low: int, high: int) -> Tensor:
        """The layer on `centered` (values in [low, high], spanning at most U), unscaled."""
        codes, zero_point, sign = _encode(centered, low, high, self._limit)
        if self._linear is not None:
            if not torch.compiler.is_compiling():
                return torch.ops.onednn.qlinear_pointwise(
                    codes, float(sign), zero_point, self._linear, self._scales, self._zero_points, None, *_POST_OPS
                )
            # inductor lowers qlinear only for weights frozen into the graph; a 1×1 convolution has no such limit
            rows = codes.reshape(-1, codes.shape[-1], 1, 1)
            return self._convolve(rows, zero_point, sign).reshape(*codes.shape[:-1], -1)
        if self._unit_height:
            return self._convolve(codes.unsqueeze(2), zero_point, sign).squeeze(2)
        return self._convolve(codes, zero_point, sign)

    def _convolve(self, codes: Tensor, zero_point: int, sign: int) -> Tensor:
        packed = self._packed_weights(tuple(codes.shape))
        return torch.ops.onednn.qconv2d_pointwise(
            codes, float(sign), zero_point, packed, self._scales, self._zero_points, None, *self._conv, *_POST_OPS
        )


class InputGroupedWeights:
    """A layer whose weight scales also vary along its input (w_granularity group:N of whole input
    channels, e.g. a 3×3 convolution at group:9): the kernels scale per output channel only, so
    the layer runs as one grouped convolution with an output channel per (input group, output
    channel), summed over the input groups. Its intermediate output is (input groups)× the
    layer's: cheap on narrow layers (a single-channel `conv_out`), not on wide ones."""

    def __init__(self, kernel: IntegerWeights, groups: int, linear: bool) -> None:
        self._kernel, self._groups, self._linear = kernel, groups, linear

    @classmethod
    def from_layer(cls, layer: nn.Module, weight: Tensor, bits: int, group_size: int) -> InputGroupedWeights:
        """Pack `weight`, whose scales are per output channel and group of `group_size` elements of
        the flattened input; raises UnsupportedWeights unless the groups are whole input channels
        of an ungrouped layer."""
        per_channel = math.prod(weight.shape[2:])
        if group_size % per_channel or getattr(layer, "groups", 1) != 1:
            raise UnsupportedWeights(
                f"weight groups of {group_size} elements run on the kernels only as whole input channels "
                f"({per_channel} elements each) of an ungrouped layer"
            )
        groups = weight.shape[1] // (group_size // per_channel)
        stacked = weight.unflatten(1, (groups, -1)).transpose(0, 1).flatten(0, 1)  # [groups·out, in/groups, ...]
        linear = isinstance(layer, nn.Linear)
        if linear:
            stacked = stacked[..., None, None]
            carrier = nn.Conv2d(weight.shape[1], stacked.shape[0], 1, groups=groups, device="meta")
        elif isinstance(layer, nn.Conv1d | nn.Conv2d):
            carrier = type(layer)(
                weight.shape[1],
                stacked.shape[0],
                layer.kernel_size,
                layer.stride,
                layer.padding,
                layer.dilation,
                groups,
                padding_mode=layer.padding_mode,
                device="meta",
            )
        else:
            carrier = layer  # refused by from_layer, naming the type
        return cls(IntegerWeights.from_layer(carrier, stacked, bits), groups, linear)

    def run(
        self,
        centered: Tensor,
        scale: Tensor,
        accumulate: Tensor | None = None,
        *,
        bounds: tuple[int, int] | None = None,
    ) -> Tensor:
        """As `IntegerWeights.run`."""
        x = centered.reshape(-1, centered.shape[-1], 1, 1) if self._linear else centered
        out = self._kernel.run(x, _ONE, bounds=bounds).unflatten(1, (self._groups, -1)).sum(1)
        if self._linear:
            out = out.reshape(*centered.shape[:-1], -1)
        return _scaled(out, scale, accumulate)


def _scaled(out: Tensor, scale: Tensor, accumulate: Tensor | None) -> Tensor:
    """out·scale (+ accumulate), in `out`'s memory where eager code can."""
    if scale.numel() == 1:
        scale = scale.reshape(())
    if accumulate is None:
        return out.mul_(scale)
    if torch.compiler.is_compiling():  # dynamo refuses out= on a channels-last tensor; inductor fuses anyway
        return torch.addcmul(accumulate, out, scale)
    return torch.addcmul(accumulate, out, scale, out=out)


def pack_weights(
    layer: nn.Module, weight: Tensor, bits: int, input_group: int | None = None
) -> IntegerWeights | InputGroupedWeights:
    """`IntegerWeights.from_layer`, or `InputGroupedWeights.from_layer` when `input_group`
    (elements of the flattened input per weight scale, i.e. group:N) is given."""
    if input_group is None:
        return IntegerWeights.from_layer(layer, weight, bits)
    return InputGroupedWeights.from_layer(layer, weight, bits, input_group)


def _lattice(weight: Tensor, bits: int) -> tuple[Tensor, Tensor, Tensor]:
    """int8 codes c, float32 per-output-channel scales s and offsets o with s·(c + o) = weight.

    Symmetric channels get o = 0 (no correction at run time): their scale is amax/n where n is
    the largest |code|, n = qmax or qmax + 1 for min-max and clipped scales, smaller for
    per-tensor scales or rounding that stopped short of the range, so those candidates are tried
    first and then every other n. Channels left over are tried as affine (asymmetric) lattices:
    scale span/n for n from 2^b − 1 down, codes counted from the channel's minimum and shifted
    into int8, the minimum carried by the offset.
    """
    qmax = 2 ** (bits - 1) - 1
    found = _Lattice(weight.detach().reshape(weight.shape[0], -1).double(), qmax)
    amax, low = found.rows.abs().amax(1), found.rows.amin(1)
    pending = (amax != 0).nonzero().squeeze(1)  # all-zero rows keep scale 1, codes 0
    for n in (qmax, qmax + 1, *range(qmax - 1, 0, -1)):
        pending = found.fit(pending, amax[pending] / n, torch.zeros_like(amax[pending]))
    for n in range(2 * qmax + 1, 0, -1):
        scale = (found.rows[pending].amax(1) - low[pending]) / n
        pending = found.fit(pending, scale, low[pending] / scale + qmax + 1)
    if pending.numel():
        raise UnsupportedWeights(
            f"weight is not on a per-channel {bits}-bit lattice (w = s·(c + o) with integer c in "
            f"[{-qmax - 1}, {qmax}]) in {pending.numel()} of {found.rows.shape[0]} output channels, e.g. channel "
            f"{pending[0].item()}"
        )
    return found.codes.to(torch.int8).reshape(weight.shape), found.scales.float(), found.offsets.float()


class _Lattice:
    """Per-channel lattices s·(c + o) found so far for the rows of a weight."""

    def __init__(self, rows: Tensor, qmax: int) -> None:
        self.rows, self.qmax = rows, qmax
        self.scales, self.offsets = (
            torch.ones(rows.shape[0], dtype=rows.dtype),
            torch.zeros(rows.shape[0], dtype=rows.dtype),
        )
        self.codes = torch.zeros_like(rows)

    def fit(self, pending: Tensor, scale: Tensor, offset: Tensor) -> Tensor:
        """Record the rows of `pending` that lie on s·(c + o) with integer c in [-qmax - 1, qmax]
        (to 1e-6 of the row's largest |w|); return those that do not."""
        if pending.numel() == 0:
            return pending
        rows = self.rows[pending]
        codes = torch.round(rows / scale[:, None] - offset[:, None])
        error = ((codes + offset[:, None]) * scale[:, None] - rows).abs().amax(1)
        fits = (error <= 1e-6 * rows.abs().amax(1)) & (codes.amin(1) >= -self.qmax - 1) & (codes.amax(1) <= self.qmax)
        kept = pending[fits]
        self.scales[kept], self.offsets[kept], self.codes[kept] = scale[fits], offset[fits], codes[fits]
        return pending[~fits]


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


def _pieces(centered: Tensor, low: int, high: int, limit: int) -> list[tuple[Tensor, int, int]]:
    """(piece, its low, its high) summing to `centered` (values in [low, high]), each spanning at
    most `limit`: with d = centered − low, the pieces are low + clamp(d, 0, U) and
    clamp(d − i·U, 0, U) for i ≥ 1."""
    if high - low <= limit:
        return [(centered, low, high)]
    pieces = [(centered.clamp(low, low + limit), low, low + limit)]
    for start in range(low + limit, high, limit):
        top = min(limit, high - start)
        pieces.append(((centered - start).clamp(0, top), 0, top))
    return pieces


def _encode(centered: Tensor, low: int, high: int, limit: int) -> tuple[Tensor, int, int]:
    """uint8 codes u within [0, limit] (in the memory format of `centered`), zero point z and
    sign σ with σ·(u − z) = centered, for values in [low, high] spanning at most `limit`.

    z is never 0, so one weight packing (with the compensation term a nonzero z needs) serves
    every call: a call with z = 0 repacks the weights, and in this torch a packing made for
    z = 0 also strips the compensation from later packings of the same shape in any layer.
    Values that cannot shift up into [1, limit] (e.g. [0, 255]) are sent negated, as z − c.
    Integer narrowing wraps modulo 256, so narrowing and then shifting in uint8 is exact;
    narrowing through int8 (when the values fit) is the cheapest cast from float.
    """
    if low >= -128 and high <= 127:
        codes = centered.to(torch.int8, copy=True).view(torch.uint8)
    else:
        codes = centered.to(torch.int16).to(torch.uint8)
    zero_point = max(1, -low)
    if high + zero_point <= limit:
        return codes.add_(zero_point), zero_point, 1
    zero_point = max(1, high)
    codes.bitwise_not_()  # 255 − c; adding z + 1 wraps it to z − c
    return (codes if zero_point == 255 else codes.add_(zero_point + 1)), zero_point, -1
