"""Block-level 0-bit skipping: DeepCache-style caching in the recipe language.

The block keeps its class, name and attributes (pipelines inspect blocks, e.g. diffusers'
`has_cross_attention`); only its instance `forward` is replaced by a `BlockCache`.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any

from torch import Tensor, nn

from .recipe import BlockPlan
from .trajectory import CachedOutput, Tracker


class BlockState:
    """A cached block's memory of the trajectory in one thread: its last output per branch and,
    for adaptive skipping, the input of the call that computed it."""

    def __init__(self) -> None:
        self.outputs: dict[Hashable, CachedOutput] = {}
        self.inputs: dict[Hashable, Tensor] = {}

    @property
    def nbytes(self) -> int:
        return sum(cached.nbytes for cached in self.outputs.values()) + sum(x.nbytes for x in self.inputs.values())


class BlockCache:
    """On the block's 0-bit steps, return its last output for this branch without calling it.

    With a `skip_threshold` (adaptive caching), a 0-bit step is skipped only while the block's
    first tensor input has changed by less than the threshold, in relative L2 norm, since the
    call that computed the cached output; otherwise the block runs and refreshes its cache.
    """

    def __init__(self, module: nn.Module, plan: BlockPlan, tracker: Tracker) -> None:
        if "forward" in vars(module):
            raise RuntimeError(
                f"{plan.name}: its forward is already replaced by another library's hook; cannot cache the block"
            )
        self.plan = plan
        self._tracker = tracker
        self._module = module  # the class forward is called on it: a bound method would pickle as this cache
        self._slot = tracker.add(self)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        tracker = self._tracker
        if tracker.mode.stateless:  # recording and reconstruction passes compute every block
            return type(self._module).forward(self._module, *args, **kwargs)
        lane = tracker.lane()
        branch, scheduled = lane.call_branch, tracker.phase(self._slot)
        state = tracker.state(self._slot)
        cached = state.outputs.get(branch)
        probe = _first_tensor(args, kwargs) if self.plan.skip_threshold is not None else None
        if cached is not None and scheduled and (probe is None or self._changed_little(state.inputs[branch], probe)):
            lane.block_calls.append((self._slot, True))
            return cached.get(self.plan.name)
        lane.block_calls.append((self._slot, False))
        output = type(self._module).forward(self._module, *args, **kwargs)
        state.outputs[branch] = CachedOutput(output)
        if probe is not None:
            state.inputs[branch] = probe.detach()
        return output

    def phase(self, step: int, timestep: float | None) -> bool:
        """Whether `step` is one of the block's 0-bit steps."""
        return self.plan.schedule.contains(step)

    @property
    def counts(self) -> tuple[int, int]:
        """(skipped, total) calls since prepare(), for the skip fraction eval reports."""
        return self._tracker.block_counts(self._slot)

    def _changed_little(self, reference: Tensor, x: Tensor) -> bool:
        return bool((x - reference).norm() <= self.plan.skip_threshold * reference.norm())

    def new_state(self) -> BlockState:
        return BlockState()


def _first_tensor(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Tensor:
    return next(value for value in (*args, *kwargs.values()) if isinstance(value, Tensor))


def install_block_cache(module: nn.Module, plan: BlockPlan, tracker: Tracker) -> BlockCache:
    cache = BlockCache(module, plan, tracker)
    module.forward = cache
    return cache
