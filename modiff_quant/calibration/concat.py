"""Finding convolutions whose input is a channel concatenation (UNet up blocks: the upsampled
path and a skip connection), by watching one forward pass: no model-specific names needed."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

_CONCATS = {torch.cat, torch.concat, torch.concatenate}
_CONVS = (nn.Conv1d, nn.Conv2d)


class _ConcatWatch(TorchFunctionMode):
    """Remembers every tensor produced by concatenating along dim 1 (the conv channel dim)."""

    def __init__(self) -> None:
        super().__init__()
        self.first_part: dict[tuple[int, tuple[int, ...], tuple[int, ...]], int] = {}
        self._keep: list[Tensor] = []  # outputs stay alive so their storage is not reused

    def __torch_function__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None
    ) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func in _CONCATS and isinstance(out, Tensor) and out.dim() >= 3:
            tensors = args[0]
            dim = kwargs.get("dim", args[1] if len(args) > 1 else 0)
            if len(tensors) >= 2 and dim % out.dim() == 1:
                self.first_part[_key(out)] = tensors[0].shape[1]
                self._keep.append(out)
        return out


def _key(tensor: Tensor) -> tuple[int, tuple[int, ...], tuple[int, ...]]:
    return tensor.data_ptr(), tuple(tensor.shape), tuple(tensor.stride())


def detect_concat_inputs(
    model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any] | None = None
) -> dict[str, int]:
    """{conv name: channels of the first part} for every Conv1d/Conv2d whose input, in one forward
    pass of `model(*args, **kwargs)`, is exactly the output of a channel concatenation."""
    found: dict[str, int] = {}
    watch = _ConcatWatch()

    def check(name: str) -> Any:
        def hook(module: nn.Module, inputs: tuple[Any, ...]) -> None:
            if inputs and isinstance(inputs[0], Tensor) and _key(inputs[0]) in watch.first_part:
                found[name] = watch.first_part[_key(inputs[0])]

        return hook

    handles = [m.register_forward_pre_hook(check(name)) for name, m in model.named_modules() if isinstance(m, _CONVS)]
    try:
        with torch.no_grad(), watch:
            model(*args, **(kwargs or {}))
    finally:
        for handle in handles:
            handle.remove()
    return found
