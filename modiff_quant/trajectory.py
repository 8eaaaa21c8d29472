"""Which trajectory, CFG branch and step each call of a prepared model belongs to, and where the
trajectory state (MoDiff's â/ô, cached block outputs) lives.

That state must never leak between sampling runs, batches or threads, and never be used stale:
- every thread keeps its own lane of state, so one converted model serves several threads;
- a tracker on the prepared model watches every top-level call. A new trajectory starts when the
  timestep goes up or jumps far past the steps taken so far, when the input's shape, device or
  dtype changes, or when the previous call never returned (an exception inside the model left
  the layers half-advanced);
- calls that repeat the first timestep of a trajectory are classifier-free-guidance branches
  (cond/uncond called separately), each with its own state; a branch call whose timestep is not
  its step's (guidance dropped or added mid-run) starts a new trajectory, with a warning;
- a non-finite model output drops the state (the step count goes on), so the next step starts
  afresh and recovers as the float model does instead of carrying NaN to the end of the trajectory.
"""

from __future__ import annotations

import copy
import threading
import warnings
import weakref
from collections.abc import Hashable, Iterator
from contextlib import contextmanager
from enum import Enum
from typing import Any, Protocol

import torch
from torch import Tensor

from .tensors import all_finite, iter_tensors

Position = tuple[Hashable, int]
"""(branch, step): step counts the calls of that branch since the trajectory started, from 0."""

JUMP_FACTOR = 2.5
"""A timestep that falls by more than this many times the largest fall of the trajectory so far
(after two falls) starts a new one: e.g. an img2img run after a loop that an exception broke off.
Every diffusers schedule stays below it (PNDM's reaches 2.0) except beta sigmas on few steps,
whose resets cost one full-precision step and nothing else."""

_PHASE_MEMO = 4096
"""Steps whose phases are memoised before the memo starts over (a bound for endless runs)."""

UNFINISHED = 1.5
"""A trajectory that ends (its timestep goes up) while still this many of its largest steps away
from t = 0 was broken off: either an early stop or two sampling loops sharing the model."""


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


class TrajectoryState(Protocol):
    """One member's memory of the current trajectory, in one lane."""

    @property
    def nbytes(self) -> int: ...


class Stateful(Protocol):
    """A quantized layer or a block cache: keeps its trajectory state in the tracker's lanes."""

    def new_state(self) -> TrajectoryState: ...

    def phase(self, step: int, timestep: float | None) -> Hashable:
        """What this member does differently at a step (skip it? which timestep group?): a small
        value, computed once per model call outside any compiled region, so that compiled code
        depends on these few values and never on the step index or timestep."""
        ...


class Recorder(Protocol):
    """Keeps the model calls of a calibration run (`calibration.CalibrationRecord`)."""

    def add(
        self,
        trajectory: int,
        position: Position,
        timestep: float | None,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> None: ...


class StaleCacheError(RuntimeError):
    """A cached output was modified in place after it was returned."""


class CachedOutput:
    """An output kept for reuse, guarded against in-place changes made to it downstream."""

    def __init__(self, value: Any) -> None:
        self.value = value
        self._tensors = list(iter_tensors(value))
        # compiled code has no version counters to read (they are the eager runtime's); there the
        # compiler already keeps a value that later code changes in place distinct from it
        self._versions = None if torch.compiler.is_compiling() else [t._version for t in self._tensors]

    def __deepcopy__(self, memo: dict[int, Any]) -> CachedOutput:
        """A copy guards its own tensors: their version counters start anew."""
        return CachedOutput(copy.deepcopy(self.value, memo))

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self._tensors)

    def get(self, owner: str) -> Any:
        if torch.compiler.is_compiling() or self._versions is None:
            return self.value
        if any(t._version != version for t, version in zip(self._tensors, self._versions, strict=True)):
            raise StaleCacheError(
                f"{owner}: its cached output was modified in place by the code that consumed it; "
                "MoDiff reuses outputs across steps, so use out-of-place ops (e.g. inplace=False) after this module"
            )
        return self.value


class Lane:
    """One thread's trajectory: the position of its calls, what detection knows, each member's state."""

    def __init__(self, thread: threading.Thread) -> None:
        self.thread = weakref.ref(thread)
        self.branch: Hashable | None = None  # set by `branch()`: overrides automatic detection
        self.pinned: tuple[Position, float | None] | None = None
        self.position: Position = (0, 0)
        self.call_branch: Hashable = 0  # position[0], apart: compiled code reads it, never the step
        self.timestep: float | None = None  # of the current model call, if it carried one
        self.trajectory = -1
        self.in_call = False  # between a model call's pre- and post-hook
        self.states: dict[int, TrajectoryState] = {}  # member slot -> its state
        self.phases: tuple[Hashable, ...] | None = None  # per member slot, for the current call
        self.visits: dict[int, int] = {}  # member slot -> calls of it within the current model call
        self.block_calls: list[tuple[int, bool]] = []  # (slot, skipped) of cached blocks, not yet counted
        self.restart()

    def restart(self, carried_fall: float = 0.0) -> None:
        """Forget the trajectory (state and detection); the next call starts a new one. A broken-off
        trajectory hands on its largest fall, against which the next one's first falls are judged."""
        self.states.clear()
        self.calls = 0
        self.branches: int | None = None  # known once the first step is over
        self.first_t: float | None = None
        self.step_t: float | None = None  # the timestep of the current step's first branch
        self.last_t: float | None = None
        self.signature: tuple[Any, ...] | None = None
        self.explicit_steps: dict[Hashable, int] = {}
        self.falls = 0
        self.largest_fall = 0.0
        self.carried_fall = carried_fall

    @property
    def nbytes(self) -> int:
        return sum(state.nbytes for state in self.states.values())

    @property
    def broken_off(self) -> bool:
        return self.falls > 0 and self.last_t is not None and self.last_t >= UNFINISHED * self.largest_fall

    @property
    def reference_fall(self) -> float:
        """What a fall is judged against: this trajectory's largest after two falls, else the one
        handed on by a broken-off predecessor (0: nothing known)."""
        return self.largest_fall if self.falls >= 2 else max(self.largest_fall, self.carried_fall)

    def jumps_to(self, t: float) -> bool:
        assert self.last_t is not None
        return self.reference_fall > 0 and self.last_t - t > JUMP_FACTOR * self.reference_fall

    def note_fall(self, t: float | None) -> None:
        if t is not None and self.last_t is not None and t < self.last_t:
            self.falls += 1
            self.largest_fall = max(self.largest_fall, self.last_t - t)
        self.last_t = t


class Tracker:
    """Assigns each model call a (branch, step) position and keeps the trajectory state, per thread."""

    def __init__(self) -> None:
        self.members: list[Stateful] = []  # quantized layers and block caches, added by prepare()
        self.mode = Mode.PREPARED
        self.record: Recorder | None = None  # model calls seen inside calibrate()
        self.observing: frozenset[torch.nn.Module] = frozenset()  # replay: the layers whose observers see this call
        self._lanes: dict[int | None, Lane] = {}
        self._local = threading.local()  # .lane: this thread's, found without a lookup compiled code cannot trace
        self._phases: dict[tuple[int, float | None], tuple[Hashable, ...]] = {}  # (step, timestep) -> phases
        self._block_counts: dict[int, list[int]] = {}  # cached block's slot -> [skipped, total] calls
        self._trajectories = 0

    def __getstate__(self) -> dict[str, Any]:
        """Pickled without trajectory state: threads do not travel, so an unpickled model starts afresh."""
        return {**self.__dict__, "_lanes": {}, "_local": None}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state, _local=threading.local())

    def __deepcopy__(self, memo: dict[int, Any]) -> Tracker:
        """A deep copy continues every lane's trajectory exactly where the original is."""
        copied = Tracker.__new__(Tracker)
        memo[id(self)] = copied
        copied.__dict__.update(copy.deepcopy({**self.__dict__, "_local": None}, memo), _local=threading.local())
        return copied

    def add(self, member: Stateful) -> int:
        """Register a layer or block cache; returns the slot its state is kept under."""
        self.members.append(member)
        self._phases.clear()
        return len(self.members) - 1

    def lane(self) -> Lane:
        """The calling thread's lane (a thread that reuses a finished thread's id gets a new one)."""
        lane = getattr(self._local, "lane", None)
        return lane if lane is not None else self._thread_lane()

    def _thread_lane(self) -> Lane:
        thread = threading.current_thread()
        lane = self._lanes.get(thread.ident)
        if lane is None or lane.thread() is not thread:
            self._prune()
            lane = self._lanes[thread.ident] = Lane(thread)
        self._local.lane = lane
        return lane

    def phase(self, slot: int) -> Hashable:
        """The phase of the member in `slot` for the calling thread's current model call."""
        lane = self.lane()
        if lane.phases is None:  # a member called outside any model call (the hooks set them)
            lane.phases = self.phases_at(lane.position[1], lane.timestep)
        return lane.phases[slot]

    def phases_at(self, step: int, timestep: float | None) -> tuple[Hashable, ...]:
        """Every member's phase at a step (memoised: the same few steps recur in every trajectory)."""
        key = (step, timestep)
        phases = self._phases.get(key)
        if phases is None:
            if len(self._phases) > _PHASE_MEMO:
                self._phases.clear()
            phases = self._phases[key] = tuple(member.phase(step, timestep) for member in self.members)
        return phases

    def _enter(self, lane: Lane, position: Position, timestep: float | None) -> None:
        """A model call (or a pinned replay) begins at `position`: its phases, no member visited yet."""
        lane.position, lane.timestep, lane.call_branch = position, timestep, position[0]
        lane.phases = self.phases_at(position[1], timestep)
        lane.visits.clear()
        self._count_block_calls(lane)

    def _count_block_calls(self, lane: Lane) -> None:
        """Add the lane's block calls so far to `block_counts` (counted here, in the hooks, not in
        compiled code, whose guards would change with every value of a growing count)."""
        for slot, skipped in lane.block_calls:
            counts = self._block_counts.setdefault(slot, [0, 0])
            counts[0] += skipped
            counts[1] += 1
        lane.block_calls.clear()

    def block_counts(self, slot: int) -> tuple[int, int]:
        """(skipped, total) calls of the cached block in `slot` since prepare, in every thread
        (the calling thread's up to now, other threads' up to their last finished model call)."""
        self._count_block_calls(self.lane())
        skipped, total = self._block_counts.get(slot, (0, 0))
        return skipped, total

    def state(self, slot: int) -> TrajectoryState:
        """The calling thread's state of the member in `slot`, created at the first call of its trajectory."""
        states = self.lane().states
        state = states.get(slot)
        if state is None:
            state = states[slot] = self.members[slot].new_state()
        return state

    @property
    def position(self) -> Position:
        return self.lane().position

    @property
    def timestep(self) -> float | None:
        return self.lane().timestep

    @property
    def branch(self) -> Hashable | None:
        return self.lane().branch

    @branch.setter
    def branch(self, key: Hashable | None) -> None:
        self.lane().branch = key

    def cache_bytes(self) -> int:
        """Memory held by all layers' and blocks' trajectory state right now, in every thread."""
        self._prune()
        return sum(lane.nbytes for lane in list(self._lanes.values()))

    def reset(self) -> None:
        """Forget every thread's trajectory state; the next call of each starts a trajectory."""
        self._prune()
        for lane in list(self._lanes.values()):
            lane.restart()

    def restart(self) -> None:
        """Forget the calling thread's trajectory state (a sampling run of this thread begins or ends)."""
        self.lane().restart()

    @torch.compiler.disable
    def on_model_call(self, module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """Forward pre-hook of the prepared model (run eagerly when the model is compiled: the
        bookkeeping of steps and branches stays out of the compiled graphs and their guards)."""
        lane = self.lane()
        if lane.pinned is not None:
            self._enter(lane, *lane.pinned)
            return
        sample = _find_sample(args, kwargs)
        t = _find_timestep(args, kwargs)
        signature = None if sample is None else (tuple(sample.shape), sample.device, sample.dtype)
        if lane.in_call:  # the previous call raised inside the model: some layers advanced, others not
            lane.restart()
        elif lane.calls:
            self._detect_new_trajectory(lane, t, signature)
        lane.in_call = True
        if not lane.calls:
            lane.trajectory, self._trajectories = self._trajectories, self._trajectories + 1
        lane.signature = signature
        lane.note_fall(t)
        self._enter(lane, _advance(lane, t), t)
        if self.mode is Mode.CALIBRATING and self.record is not None:
            self.record.add(lane.trajectory, lane.position, t, args, kwargs)

    @torch.compiler.disable
    def on_model_return(
        self, module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any
    ) -> None:
        """Forward hook of the prepared model: the call finished; a non-finite output must not
        poison the steps after it through the state, so the next step starts afresh."""
        lane = self.lane()
        self._count_block_calls(lane)
        if lane.pinned is not None:
            return
        lane.in_call = False
        if self.mode is Mode.CONVERTED and lane.states and not all_finite(output):
            lane.states.clear()

    def _detect_new_trajectory(self, lane: Lane, t: float | None, signature: tuple[Any, ...] | None) -> None:
        went_up = t is not None and lane.last_t is not None and t > lane.last_t
        if went_up:
            if lane.broken_off:
                warnings.warn(
                    "modiff_quant: a trajectory ended before the end of its schedule: a new one starts at a higher "
                    "timestep. If that was an early stop, wrap each run in modiff_quant.sampling(model) to say so; "
                    "if two sampling loops share this model, their calls interleave and each call restarts the "
                    "other's trajectory: run each loop in its own thread (each thread keeps its own state)",
                    RuntimeWarning,
                    # this method <- the hook <- compiler.disable's wrappers (2) <- Module call internals (2) <- caller
                    stacklevel=7,
                )
            # a trajectory of one call says nothing about its schedule: keep what the one before handed on
            if not lane.falls:
                carried_fall = lane.carried_fall
            else:
                carried_fall = lane.largest_fall if lane.broken_off else 0.0
            lane.restart(carried_fall=carried_fall)
        elif signature != lane.signature:
            warnings.warn(
                f"modiff_quant: model input changed from {_describe(lane.signature)} to {_describe(signature)} "
                f"after {lane.calls} calls without a new timestep sequence; starting a new trajectory "
                "(wrap each sampling run in modiff_quant.sampling(model) to make this explicit)",
                RuntimeWarning,
                stacklevel=7,
            )
            lane.restart()
        elif t is not None and lane.last_t is not None and lane.jumps_to(t):
            lane.restart(carried_fall=lane.reference_fall)
        elif (
            lane.branch is None
            and lane.branches is not None
            and lane.calls % lane.branches
            and t is not None
            and t != lane.step_t
        ):
            warnings.warn(
                f"modiff_quant: the model was called {lane.branches} times per step (classifier-free guidance "
                f"branches), but the call expected for branch {lane.calls % lane.branches} came at t={t:g}, not at "
                f"this step's t={lane.step_t:g}: guidance was dropped or added mid-run, so the branches can no "
                "longer be told apart and a new trajectory starts (the call before this one may have used another "
                "branch's state); name the branches with modiff_quant.branch(model, key) or diffusers' "
                "cache_context to keep them",
                RuntimeWarning,
                stacklevel=7,
            )
            lane.restart(carried_fall=lane.reference_fall)

    @contextmanager
    def pinned(self, branch: Hashable, step: int, timestep: float | None) -> Iterator[None]:
        """Model and block calls inside run at this position (replay of recorded calls: no detection)."""
        lane = self.lane()
        previous, lane.pinned = lane.pinned, ((branch, step), timestep)
        self._enter(lane, *lane.pinned)
        try:
            yield
        finally:
            lane.pinned = previous

    def _prune(self) -> None:
        """Drop the lanes of threads that have finished (their state with them)."""
        for ident, lane in list(self._lanes.items()):
            thread = lane.thread()
            if thread is None or not thread.is_alive():
                self._lanes.pop(ident, None)


def _advance(lane: Lane, t: float | None) -> Position:
    if lane.branch is not None:
        step = lane.explicit_steps.get(lane.branch, 0)
        lane.explicit_steps[lane.branch] = step + 1
        lane.calls += 1
        return lane.branch, step
    if lane.branches is None:
        if lane.calls == 0 or (t is not None and t == lane.first_t):
            if lane.calls == 0:
                lane.first_t = lane.step_t = t
            lane.calls += 1
            return lane.calls - 1, 0
        lane.branches = lane.calls
    position = (lane.calls % lane.branches, lane.calls // lane.branches)
    if position[0] == 0:
        lane.step_t = t
    lane.calls += 1
    return position


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
