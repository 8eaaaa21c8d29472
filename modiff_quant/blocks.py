"""Block-level 0-bit skipping: DeepCache-style caching in the recipe language.

The block keeps its class, name and attributes (pipelines inspect blocks, e.g. diffusers'
`has_cross_attention`); only its instance `forward` is replaced by a `BlockCache`.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any

from torch import nn

from .recipe import BlockPlan
from .trajectory import CachedOutput, Tracker


class BlockCache:
    """On the block's 0-bit steps, return its last output for this branch without calling it."""

    def __init__(self, module: nn.Module, plan: BlockPlan, tracker: Tracker) -> None:
        if "forward" in vars(module):
            raise RuntimeError(f"{plan.name}: its forward is already replaced by another library's hook; cannot cache the block")
        self.plan = plan
        self._tracker = tracker
        self._module = module  # the class forward is called on it: a bound method would pickle as this cache
        self._outputs: dict[Hashable, CachedOutput] = {}

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self._tracker.mode.stateless:  # recording and reconstruction passes compute every block
            return type(self._module).forward(self._module, *args, **kwargs)
        branch, step = self._tracker.position
        cached = self._outputs.get(branch)
        if cached is not None and self.plan.schedule.contains(step):
            return cached.get(self.plan.name)
        output = type(self._module).forward(self._module, *args, **kwargs)
        self._outputs[branch] = CachedOutput(output)
        return output

    def reset_state(self) -> None:
        self._outputs.clear()

    def cache_bytes(self) -> int:
        return sum(cached.nbytes for cached in self._outputs.values())


def install_block_cache(module: nn.Module, plan: BlockPlan, tracker: Tracker) -> BlockCache:
    cache = BlockCache(module, plan, tracker)
    module.forward = cache
    return cache
