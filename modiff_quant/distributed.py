"""Work split over the processes of a torch.distributed job (torchrun, or a user's own).

Sampling is sharded by whole batches: every process draws the same noise, runs the contiguous
block of global batch indices that is its share, and gathers the results in global order. A batch
is sampled exactly as in one process (same images, same sampler seed: the seed plus the global
batch index, same per-batch activation statistics), so every image and metric is the same for any
number of processes at the same batch size. Rank 0 alone prints and writes files.

torchrun sets WORLD_SIZE, RANK and the rendezvous variables; `join` starts the default process
group from them (gloo on the CPU, NCCL for CUDA devices) unless the caller already has one.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import timedelta
from functools import cache
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor
from tqdm.auto import tqdm

T = TypeVar("T")

TIMEOUT_VARIABLE = "MODIFF_QUANT_DISTRIBUTED_TIMEOUT"
DEFAULT_TIMEOUT_S = 1800
"""How long a collective waits for every process: a rank that died or hangs fails the others
after this many seconds (override with MODIFF_QUANT_DISTRIBUTED_TIMEOUT)."""


class ProcessGroupError(RuntimeError):
    """A collective of the torch.distributed job failed: another process died or did not answer
    within the process group's timeout."""


def launched() -> bool:
    """Whether this process is one of several that torchrun started."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def join(device: torch.device) -> None:
    """Start the default process group from torchrun's environment, once, unless one exists (a
    user's job) or this is a single process."""
    if dist.is_initialized() or not launched():
        return
    raw = os.environ.get(TIMEOUT_VARIABLE, str(DEFAULT_TIMEOUT_S))
    try:
        seconds = float(raw)
    except ValueError:
        seconds = -1.0
    if not seconds > 0:
        raise ValueError(f"{TIMEOUT_VARIABLE}: expected a number of seconds > 0, got {raw!r}")
    if device.type == "cuda":
        torch.cuda.set_device(local_device(device))  # where NCCL gathers, one GPU per process
    backend = "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend=backend, timeout=timedelta(seconds=seconds))


def leave() -> None:
    """Close the process group `join` started (a user's own group is theirs to close)."""
    if dist.is_initialized() and launched():
        dist.destroy_process_group()


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main() -> bool:
    """Rank 0, the process that prints and writes files (the only one outside a job)."""
    return rank() == 0


def local_device(device: torch.device) -> torch.device:
    """A CUDA device without an index becomes this process's own GPU (torchrun's LOCAL_RANK)."""
    if device.type == "cuda" and device.index is None and launched():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def share(count: int) -> range:
    """This process's contiguous block of `count` global indices (the first ranks take one more
    when `count` does not divide evenly)."""
    size, index = world_size(), rank()
    base, extra = divmod(count, size)
    start = index * base + min(index, extra)
    return range(start, start + base + (index < extra))


def gathered(items: list[T]) -> list[T]:
    """Every process's `items` (picklable; tensors on the CPU), concatenated in rank order, so in
    global order when each holds its `share`, on every process."""
    if world_size() == 1:
        return items
    parts: list[Any] = [None] * world_size()
    with _collective():
        dist.all_gather_object(parts, items)
    return [item for part in parts for item in part]


def added(parts: Sequence[Any]) -> Any:
    """Every process's partial sum (from `gathered`) added in rank order, skipping the processes
    that had none (None); None when none had one."""
    present = [part for part in parts if part is not None]
    return sum(present[1:], present[0]) if present else None


def sum_gradients(parameters: Sequence[Tensor]) -> None:
    """Each parameter's gradient replaced by its sum over the processes (one collective): with each
    process's loss its rows' share of a batch mean, the gradient of the whole batch."""
    if world_size() == 1:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in parameters]
    flat = torch.cat([grad.reshape(-1) for grad in grads])
    with _collective():
        dist.all_reduce(flat)
    for parameter, total in zip(parameters, flat.split([p.numel() for p in parameters])):
        parameter.grad = total.view_as(parameter)


def same_as_main(tensors: Sequence[Tensor]) -> None:
    """Rank 0's values in place on every process (what each learned from summed gradients may
    differ in the last bit where an all-reduce sums in a different order on each process)."""
    if world_size() == 1:
        return
    with _collective(), torch.no_grad():
        for tensor in tensors:
            dist.broadcast(tensor, src=0)


@contextmanager
def _collective() -> Iterator[None]:
    """A collective whose failure says which process saw it and why, as ProcessGroupError."""
    try:
        yield
    except RuntimeError as exc:  # gloo: "Connection closed by peer", "Timed out waiting ..."
        cause = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ProcessGroupError(
            f"process {rank()} of {world_size()}: another process of the job failed or did not answer within the "
            f"process group's timeout ({TIMEOUT_VARIABLE} for modiff-quant's commands, default {DEFAULT_TIMEOUT_S} "
            f"s): {cause}"
        ) from exc


class JobProgress:
    """Rank 0's bar of the batches every process of the job has finished (shown only when there
    are several processes). Each process adds its finished batches to a counter in torchrun's
    store, one atomic add and no collective, so a process never waits for the bar; rank 0 shows
    the sum each time it finishes a batch of its own. Without torchrun's store (a job started
    otherwise), rank 0 counts its own batches."""

    def __init__(self, total: int, desc: str) -> None:
        self._store = _store() if world_size() > 1 else None
        # every process makes the same bars in the same order: the n-th bar has the same counter in each
        self._key = f"modiff_quant/progress/{next(_BARS)}"
        self._done = 0
        shown = world_size() > 1 and is_main()
        self._bar = tqdm(
            total=total, desc=f"{desc} ({world_size()} processes)", unit="batch", leave=False, disable=not shown
        )

    def advance(self) -> None:
        """One more batch of this process is done."""
        self._done += 1
        count = self._store.add(self._key, 1) if self._store is not None else self._done
        self._bar.update(count - self._bar.n)

    def finish(self) -> None:
        """Every process is done (after a gather): the bar shows the total, then goes."""
        if not self._bar.disable:
            self._bar.n = self._bar.total
            self._bar.refresh()  # update() would skip a render within its minimum interval
        self._bar.close()


_BARS = itertools.count()
"""Bars made so far in this process (so a counter in the store is never reused)."""


@cache
def _store() -> dist.TCPStore | None:
    """A client of the key-value store torchrun's processes rendezvoused on, if there is one."""
    address, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    if not address or not port:
        return None
    return dist.TCPStore(address, int(port), is_master=False, timeout=timedelta(seconds=60))
