"""Which trajectory, CFG branch and step each call of a prepared model belongs to.

MoDiff layers remember the previous step (â, ô). That memory must never leak between sampling
runs or batches, so a tracker attached to the prepared model watches every top-level call:
a timestep that goes up, or a change of the input's shape, device or dtype, starts a new
trajectory. Calls that repeat the first timestep of a trajectory are classifier-free-guidance
branches (cond/uncond called separately); each branch keeps its own state.
"""

from __future__ import annotations

import warnings
from collections.abc import Hashable, Iterable, Iterator
from contextlib import contextmanager
from enum import Enum
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import Tensor

if TYPE_CHECKING:
    from .calibration.record import CalibrationRecord

Position = tuple[Hashable, int]
"""(branch, step): step counts the calls of that branch since the trajectory started, from 0."""


class Mode(Enum):
    PREPARED = "prepared"  # wrapped, not converted: running it is an error (nothing is quantized yet)
    CALIBRATING = "calibrating"  # the user's sampling loop: float forward, every model call recorded
    CONVERTED = "converted"  # quantized
    # used inside convert() while calibration data is replayed:
    OBSERVING = "observing"  # float forward, observers see what they will quantize
    REFERENCE = "reference"  # float weights and activations, no state: reconstruction targets
    WEIGHTS_ONLY = "weights-only"  # quantized weights, float activations, no state
    PRIMING = "priming"  # float forward that sets the state a following quantized call continues from

    @property
    def stateless(self) -> bool:
        return self in (Mode.CALIBRATING, Mode.REFERENCE, Mode.WEIGHTS_ONLY)


class Stateful(Protocol):
    def reset_state(self) -> None: ...

    def cache_bytes(self) -> int: ...


class StaleCacheError(RuntimeError):
    """A cached output was modified in place after it was returned."""


class CachedOutput:
    """An output kept for reuse, guarded against in-place changes made to it downstream."""

    def __init__(self, value: Any) -> None:
        self.value = value
        self._versions = [(t, t._version) for t in iter_tensors(value)]

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t, _ in self._versions)

    def get(self, owner: str) -> Any:
        if any(t._version != version for t, version in self._versions):
            raise StaleCacheError(
                f"{owner}: its cached output was modified in place by the code that consumed it; "
                "MoDiff reuses outputs across steps, so use out-of-place ops (e.g. inplace=False) after this module"
            )
        return self.value


def iter_tensors(value: Any) -> Iterable[Tensor]:
    if isinstance(value, Tensor):
        yield value
    elif isinstance(value, (tuple, list)):
        for item in value:
            yield from iter_tensors(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from iter_tensors(item)


class Tracker:
    """Assigns each model call a (branch, step) position and resets state at trajectory starts."""

    def __init__(self) -> None:
        self.members: list[Stateful] = []  # quantized layers and block caches, filled by prepare()
        self.mode = Mode.PREPARED
        self.branch: Hashable | None = None  # set by `branch()`: overrides automatic detection
        self.position: Position = (0, 0)
        self.timestep: float | None = None  # of the current model call, if it carried one
        self.record: CalibrationRecord | None = None  # model calls seen inside calibrate()
        self.observing: frozenset[torch.nn.Module] = frozenset()  # replay: the layers whose observers see this call
        self._pinned: tuple[Position, float | None] | None = None
        self._trajectory = -1
        self._clear()

    def _clear(self) -> None:
        self._calls = 0
        self._branches: int | None = None  # known once the first step is over
        self._first_t: float | None = None
        self._last_t: float | None = None
        self._signature: tuple[Any, ...] | None = None
        self._explicit_steps: dict[Hashable, int] = {}

    def cache_bytes(self) -> int:
        """Memory held by all layers' and blocks' trajectory state right now."""
        return sum(member.cache_bytes() for member in self.members)

    def reset(self) -> None:
        """Forget every layer's and block's memory; the next call starts a trajectory."""
        for member in self.members:
            member.reset_state()
        self._clear()

    def on_model_call(self, module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """Forward pre-hook of the prepared model."""
        if self._pinned is not None:
            self.position, self.timestep = self._pinned
            return
        sample = _find_sample(args, kwargs)
        t = _find_timestep(args, kwargs)
        signature = None if sample is None else (tuple(sample.shape), sample.device, sample.dtype)
        if self._calls:
            t_went_up = t is not None and self._last_t is not None and t > self._last_t
            if signature != self._signature and not t_went_up:
                warnings.warn(
                    f"modiff_quant: model input changed from {self._describe(self._signature)} to {self._describe(signature)} "
                    f"after {self._calls} calls without a new timestep sequence; starting a new trajectory "
                    "(wrap each sampling run in modiff_quant.sampling(model) to make this explicit)",
                    RuntimeWarning,
                    stacklevel=5,  # this hook <- torch Module call internals (3 frames) <- the caller
                )
            if t_went_up or signature != self._signature:
                self.reset()
        if not self._calls:
            self._trajectory += 1
        self._signature, self._last_t, self.timestep = signature, t, t
        self.position = self._advance(t)
        if self.mode is Mode.CALIBRATING and self.record is not None:
            self.record.add(self._trajectory, self.position, t, args, kwargs)

    @contextmanager
    def pinned(self, branch: Hashable, step: int, timestep: float | None) -> Iterator[None]:
        """Model and block calls inside run at this position (replay of recorded calls: no detection)."""
        previous, self._pinned = self._pinned, ((branch, step), timestep)
        self.position, self.timestep = self._pinned
        try:
            yield
        finally:
            self._pinned = previous

    def _advance(self, t: float | None) -> Position:
        if self.branch is not None:
            step = self._explicit_steps.get(self.branch, 0)
            self._explicit_steps[self.branch] = step + 1
            self._calls += 1
            return self.branch, step
        if self._branches is None:
            if self._calls == 0 or (t is not None and t == self._first_t):
                self._first_t = t if self._calls == 0 else self._first_t
                self._calls += 1
                return self._calls - 1, 0
            self._branches = self._calls
        position = (self._calls % self._branches, self._calls // self._branches)
        self._calls += 1
        return position

    @staticmethod
    def _describe(signature: tuple[Any, ...] | None) -> str:
        if signature is None:
            return "no tensor"
        shape, device, dtype = signature
        return f"shape {list(shape)} {dtype} on {device}"


def _find_sample(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Tensor | None:
    candidates = [*args[:1], kwargs.get("sample"), kwargs.get("hidden_states"), kwargs.get("x"), *kwargs.values()]
    return next((c for c in candidates if isinstance(c, Tensor)), None)


def _find_timestep(args: tuple[Any, ...], kwargs: dict[str, Any]) -> float | None:
    for key in ("timestep", "timesteps", "t"):
        if key in kwargs:
            return _as_float(kwargs[key])
    return _as_float(args[1]) if len(args) > 1 else None


def _as_float(value: Any) -> float | None:
    """A timestep as a float: tensors (largest entry), Python and NumPy numbers; else None."""
    if isinstance(value, Tensor):
        return float(value.detach().max()) if value.numel() else None
    if isinstance(value, (bool, str, bytes)):
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None
