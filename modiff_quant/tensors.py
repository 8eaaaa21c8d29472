"""Tensors inside the nested arguments and outputs of model calls: walking, mapping, hashing;
and where a model computes.

Vocabulary shared by the tracker (finite outputs, in-place guards), the calibration record
(copies and fingerprints of recorded calls) and the layers (weight digests).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn


def iter_tensors(value: Any) -> Iterable[Tensor]:
    """Every tensor in nested tuples, lists and dict values, depth first."""
    if isinstance(value, Tensor):
        yield value
    elif isinstance(value, (tuple, list)):
        for item in value:
            yield from iter_tensors(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from iter_tensors(item)


def map_tensors(value: Any, fn: Callable[[Tensor], Tensor]) -> Any:
    """`value` with `fn` applied to every tensor in nested tuples, lists and dicts."""
    if isinstance(value, Tensor):
        return fn(value)
    if isinstance(value, (tuple, list)):
        return type(value)(map_tensors(v, fn) for v in value)
    if isinstance(value, dict):
        return {k: map_tensors(v, fn) for k, v in value.items()}
    return value


def all_finite(value: Any) -> bool:
    """True when no floating-point tensor in `value` holds NaN or ±inf."""
    return all(bool(torch.isfinite(t).all()) for t in iter_tensors(value) if t.is_floating_point())


def tensor_bytes(tensor: Tensor) -> bytes:
    """Shape, dtype and raw contents: equal bytes mean an identical tensor."""
    flat = tensor.detach().cpu().contiguous().reshape(-1)
    return repr((tuple(tensor.shape), str(tensor.dtype))).encode() + flat.view(torch.uint8).numpy().tobytes()


def device_of(model: nn.Module) -> torch.device:
    """Where the model computes (its first parameter's or buffer's device; the CPU without any)."""
    tensor = next(itertools.chain(model.parameters(), model.buffers()), None)
    return tensor.device if tensor is not None else torch.device("cpu")
