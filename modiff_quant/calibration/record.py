"""The model calls of the sampling loop run inside `calibrate()`, kept for replay at `convert()`.

Base quantizers choose their calibration samples from the whole trajectory after it has run
(Q-Diffusion: uniformly spaced steps; PTQ4DM: normally distributed timesteps), and MoDiff
observers need each chosen step together with the step before it; so the calls are recorded,
not observed on the fly.
"""

from __future__ import annotations

import hashlib
from collections.abc import Hashable
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor

from .. import distributed
from ..tensors import iter_tensors, map_tensors, tensor_bytes
from ..trajectory import Position


@dataclass(frozen=True)
class Inputs:
    """Positional and keyword arguments of one call, batched along dim 0 with `rows` rows."""

    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    rows: int

    @classmethod
    def keep(cls, args: tuple[Any, ...], kwargs: dict[str, Any], rows: int) -> Inputs:
        """Detached copies, safe from later in-place changes by the caller, in the standard memory
        layout (torch 2.13's channels-last GroupNorm backward crashes on small inputs)."""
        return cls(map_tensors(args, _copy), map_tensors(kwargs, _copy), rows)

    def moved(self, device: torch.device) -> Inputs:
        """The inputs with their tensors on `device`."""
        return Inputs(
            map_tensors(self.args, lambda t: t.to(device)), map_tensors(self.kwargs, lambda t: t.to(device)), self.rows
        )

    def select(self, rows: Tensor) -> Inputs:
        """The inputs restricted to some batch rows (tensors whose first dim is the batch)."""
        return Inputs(
            map_tensors(self.args, lambda t: _rows(t, rows, self.rows)),
            map_tensors(self.kwargs, lambda t: _rows(t, rows, self.rows)),
            len(rows),
        )


@dataclass(frozen=True)
class RecordedCall:
    """One model call: its trajectory, CFG branch, step, timestep and inputs."""

    trajectory: int
    branch: Hashable
    step: int
    timestep: float | None
    inputs: Inputs

    @property
    def rows(self) -> int:
        return self.inputs.rows

    @property
    def chain(self) -> tuple[int, Hashable]:
        """The trajectory branch this call continues (state carries over only within one)."""
        return self.trajectory, self.branch


class CalibrationRecord:
    """All model calls of the calibration loop, indexed by (trajectory, branch, step)."""

    def __init__(self) -> None:
        self.calls: list[RecordedCall] = []
        self._index: dict[tuple[int, Hashable, int], RecordedCall] = {}

    def __len__(self) -> int:
        return len(self.calls)

    def add(
        self,
        trajectory: int,
        position: Position,
        timestep: float | None,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> None:
        sample = next((t for t in iter_tensors((args, kwargs)) if t.dim() > 0), None)
        if sample is None:
            raise RuntimeError("calibrate(): the model call carries no batched tensor to record")
        self._append(
            RecordedCall(trajectory, position[0], position[1], timestep, Inputs.keep(args, kwargs, sample.shape[0]))
        )

    def _append(self, call: RecordedCall) -> None:
        self.calls.append(call)
        self._index[(call.trajectory, call.branch, call.step)] = call

    def previous(self, call: RecordedCall) -> RecordedCall | None:
        """The call one step earlier in the same trajectory branch."""
        return self._index.get((call.trajectory, call.branch, call.step - 1))

    def chains(self) -> dict[tuple[int, Hashable], list[RecordedCall]]:
        """Calls grouped by trajectory branch, in step order."""
        chains: dict[tuple[int, Hashable], list[RecordedCall]] = {}
        for call in self.calls:
            chains.setdefault(call.chain, []).append(call)
        return {key: sorted(calls, key=lambda c: c.step) for key, calls in chains.items()}

    def fingerprint(self) -> str:
        """A hash of every recorded input and position: equal records replay identically."""
        digest = hashlib.sha256()
        for call in self.calls:
            digest.update(repr((call.trajectory, call.branch, call.step, call.timestep, call.rows)).encode())
            for tensor in iter_tensors((call.inputs.args, call.inputs.kwargs)):
                digest.update(tensor_bytes(tensor))
        return digest.hexdigest()


def gathered_record(record: CalibrationRecord, device: torch.device) -> CalibrationRecord:
    """Every process's record of a torch.distributed job as one, on `device`, in rank order, each
    rank's trajectories numbered on from the ranks before it (in order of first call). When each
    process calibrates on its share of the batches, this is the record one process makes of them all."""
    if distributed.world_size() == 1:
        return record
    merged = CalibrationRecord()
    following = None  # the next free trajectory number
    cpu = torch.device("cpu")
    for calls in distributed.gathered([[_moved(call, cpu) for call in record.calls]]):
        numbers: dict[int, int] = {}
        for call in calls:
            if following is None:  # rank 0 keeps its numbers
                number = call.trajectory
            else:
                number = numbers.setdefault(call.trajectory, following + len(numbers))
            merged._append(replace(_moved(call, device), trajectory=number))
        if merged.calls:
            following = max(call.trajectory for call in merged.calls) + 1
    return merged


def _moved(call: RecordedCall, device: torch.device) -> RecordedCall:
    """The call with its inputs on `device` (a CUDA tensor would unpickle on the sender's GPU)."""
    return replace(call, inputs=call.inputs.moved(device))


def _copy(tensor: Tensor) -> Tensor:
    return tensor.detach().clone(memory_format=torch.contiguous_format)


def _rows(tensor: Tensor, rows: Tensor, batch: int) -> Tensor:
    return tensor[rows.to(tensor.device)] if tensor.dim() > 0 and tensor.shape[0] == batch else tensor
