"""How a layer keeps its trajectory state (â and ô) between steps: as computed, or smaller;
per CFG branch and call site.

The state of every modulated layer lives for a whole trajectory, so it dominates memory
(44.6 MB per image on the CIFAR-10 UNet in float32). `float16`/`bfloat16` round it to half precision;
`int8`/`int16` keep integer codes and one float scale per sample (symmetric, absmax, chosen at
each store, so nothing is clipped).
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass
from typing import Literal, get_args

import torch
from torch import Tensor

from .trajectory import CachedOutput

StateFormat = Literal["full", "float16", "bfloat16", "int8", "int16"]
STATE_FORMATS: tuple[str, ...] = get_args(StateFormat)

_FLOATS = {"float16": torch.float16, "bfloat16": torch.bfloat16}
_INTEGERS = {"int8": torch.int8, "int16": torch.int16}
_SCALE_FLOOR = torch.finfo(torch.float32).tiny


@dataclass(frozen=True)
class Stored:
    """A tensor kept in a state format; `unpack()` gives it back in its original dtype."""

    data: Tensor
    scale: Tensor | None
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return self.data.nbytes + (0 if self.scale is None else self.scale.nbytes)

    @property
    def lossless(self) -> bool:
        return self.scale is None and self.data.dtype == self.dtype

    def unpack(self) -> Tensor:
        if self.scale is not None:
            return (self.data.to(self.scale.dtype) * self.scale).to(self.dtype)
        return self.data.to(self.dtype)


def store(x: Tensor, fmt: StateFormat) -> Stored:
    """`x` (detached) in format `fmt`; `full` keeps the tensor itself, without a copy."""
    x = x.detach()
    if fmt in _INTEGERS:
        qmax = torch.iinfo(_INTEGERS[fmt]).max
        scale = x.float().abs().amax(dim=tuple(range(1, x.dim())), keepdim=True).clamp_min(_SCALE_FLOOR) / qmax
        return Stored(torch.round(x / scale).to(_INTEGERS[fmt]), scale, x.dtype)
    return Stored(x.to(_FLOATS[fmt]) if fmt in _FLOATS else x, None, x.dtype)


class LayerState:
    """One layer's memory of one trajectory branch and call site: â (or the raw previous input)
    and ô, each kept in the state format its recipe asks for (see `state_storage`)."""

    def __init__(self, input_format: StateFormat = "full", output_format: StateFormat = "full") -> None:
        self.input_format, self.output_format = input_format, output_format
        self._a_hat: Stored | None = None
        self._output: CachedOutput | Stored | None = None  # a lossy copy needs no in-place guard

    @property
    def started(self) -> bool:
        return self._a_hat is not None

    @property
    def input_shape(self) -> torch.Size | None:
        return None if self._a_hat is None else self._a_hat.data.shape

    @property
    def a_hat(self) -> Tensor:
        assert self._a_hat is not None, "the first call of a trajectory sets â"
        return self._a_hat.unpack()

    @a_hat.setter
    def a_hat(self, value: Tensor) -> None:
        self._a_hat = store(value, self.input_format)

    def advance(self, q: Tensor) -> Tensor:
        """â ← â + q; returns the increment â actually made, which differs from q when â is kept
        in a lossy format: feeding that increment to the layer keeps ô = A(â) + b exact, so the
        storage rounding is corrected by the next step's difference like any quantization error."""
        a_hat = self.a_hat
        self.a_hat = a_hat + q
        return q if self._a_hat.lossless else self.a_hat - a_hat

    @property
    def has_output(self) -> bool:
        return self._output is not None

    @property
    def nbytes(self) -> int:
        return sum(0 if part is None else part.nbytes for part in (self._a_hat, self._output))

    def remember(self, output: Tensor) -> Tensor:
        """Keep ô for the next step (detached: the cache must not chain autograd graphs over steps)."""
        stored = store(output, self.output_format)
        self._output = CachedOutput(stored.data) if stored.lossless else stored
        return output

    def cached_output(self, owner: str) -> Tensor:
        assert self._output is not None, "a step before this one remembered ô"
        return self._output.unpack() if isinstance(self._output, Stored) else self._output.get(owner)


class LayerStates:
    """A layer's trajectory state in one thread: one `LayerState` per CFG branch and per call site
    (a shared layer running more than once per model call), so that differences are always taken
    between steps, never between branches or call sites."""

    def __init__(self, input_format: StateFormat, output_format: StateFormat) -> None:
        self.formats = input_format, output_format
        self.sites: dict[tuple[Hashable, int], LayerState] = {}

    def at(self, branch: Hashable, site: int) -> LayerState:
        """The state of a branch at a call site (0, 1, ...: the layer's calls within one model call)."""
        key = (branch, site)
        if key not in self.sites:
            self.sites[key] = LayerState(*self.formats)
        return self.sites[key]

    @property
    def nbytes(self) -> int:
        return sum(state.nbytes for state in self.sites.values())
