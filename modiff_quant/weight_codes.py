"""Quantized weights on disk as 8-bit codes into per-output-channel tables of their exact values.

A b-bit weight quantized per channel or per tensor holds at most 2^b distinct values per output
channel whatever the base quantizer made of them (min-max, AdaRound, Brevitas, ...), so storing
each value's index and a table of the values is lossless, bit for bit, without knowing how they
were computed. A W8 channel of n float32 values takes n bytes of codes plus at most 1 KiB of table
(the CIFAR-10 UNet at W8: 60 MB instead of 143 MB), a W4 channel n bytes plus 64. Finer groups
stay float. Values are compared as bit patterns, so -0.0 and 0.0 stay apart.
"""

from __future__ import annotations

import torch
from torch import Tensor

_BIT_VIEWS = {
    torch.float32: torch.int32,
    torch.float16: torch.int16,
    torch.bfloat16: torch.int16,
    torch.float64: torch.int64,
}
MAX_BITS = 8


def encode(weight: Tensor, bits: int) -> tuple[Tensor, Tensor] | None:
    """(codes: uint8 shaped like `weight`, table: [out channels, ≤ 2^bits] of `weight.dtype`), or
    None when some output channel holds more than 2^bits distinct values (e.g. group-wise scales
    finer than a channel) or the weight is no float tensor up to 8 bits."""
    if bits > MAX_BITS or weight.dtype not in _BIT_VIEWS:
        return None
    patterns = weight.detach().reshape(weight.shape[0], -1).contiguous().view(_BIT_VIEWS[weight.dtype])
    ordered, order = patterns.sort(dim=1)
    starts = torch.ones_like(ordered, dtype=torch.bool)
    starts[:, 1:] = ordered[:, 1:] != ordered[:, :-1]
    ranks = starts.cumsum(dim=1) - 1  # index of each sorted value among its channel's distinct values
    width = int(ranks[:, -1].max()) + 1  # the most distinct values of any channel
    if width > 1 << bits:
        return None
    codes = torch.empty_like(ranks).scatter_(1, order, ranks)
    table = torch.zeros(weight.shape[0], width, dtype=patterns.dtype, device=patterns.device)
    table.scatter_(1, ranks, ordered)  # each channel's distinct values, ascending
    return codes.to(torch.uint8).reshape(weight.shape), table.view(weight.dtype)


def decode(codes: Tensor, table: Tensor) -> Tensor:
    """The weight `encode` was given, bit for bit; ValueError for codes and a table `encode`
    cannot have made (they may come from a damaged or crafted file)."""
    if codes.dtype != torch.uint8 or codes.dim() == 0:
        raise ValueError(f"codes must be uint8 with a row per output channel, got {codes.dtype} {list(codes.shape)}")
    if (
        table.dtype not in _BIT_VIEWS
        or table.dim() != 2
        or table.shape[0] != codes.shape[0]
        or not 0 < table.shape[1] <= 1 << MAX_BITS
    ):
        raise ValueError(
            f"the table must be float with {codes.shape[0]} rows of 1 to {1 << MAX_BITS} values, "
            f"got {table.dtype} {list(table.shape)}"
        )
    if not bool(table.isfinite().all()):
        raise ValueError("the table holds non-finite values")
    if codes.numel() and int(codes.max()) >= table.shape[1]:
        raise ValueError(f"code {int(codes.max())} is past the {table.shape[1]} values of the table")
    codes_per_row = codes.reshape(codes.shape[0], -1).long()
    return table.gather(1, codes_per_row).reshape(codes.shape)
