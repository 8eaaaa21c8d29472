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


class BlockCache:
    """On the block's 0-bit steps, return its last output for this branch without calling it.

    With a `skip_threshold` (adaptive caching), a 0-bit step is skipped only while the block's
    first tensor input has changed by less than the threshold, in relative L2 norm, since the
    call that computed the cached output; otherwise the block runs and refreshes its cache.
    """

    def __init__(self, module: nn.Module, plan: BlockPlan, tracker: Tracker) -> None:
        if "forward" in vars(module):
            raise RuntimeError(f"{plan.name}: its forward is already replaced by another library's hook; cannot cache the block")
        self.plan = plan
        self._tracker = tracker
        self._module = module  # the class forward is called on it: a bound method would pickle as this cache
        self._outputs: dict[Hashable, CachedOutput] = {}
        self._inputs: dict[Hashable, Tensor] = {}  # adaptive: the input of the computing call
        self.calls = self.skips = 0  # since prepare(), for the skip fraction eval reports

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self._tracker.mode.stateless:  # recording and reconstruction passes compute every block
            return type(self._module).forward(self._module, *args, **kwargs)
        branch, step = self._tracker.position
        cached = self._outputs.get(branch)
        self.calls += 1
        probe = _first_tensor(args, kwargs) if self.plan.skip_threshold is not None else None
        if cached is not None and self.plan.schedule.contains(step) and (probe is None or self._changed_little(branch, probe)):
            self.skips += 1
            return cached.get(self.plan.name)
        output = type(self._module).forward(self._module, *args, **kwargs)
        self._outputs[branch] = CachedOutput(output)
        if probe is not None:
            self._inputs[branch] = probe.detach()
        return output

    def _changed_little(self, branch: Hashable, x: Tensor) -> bool:
        reference = self._inputs[branch]
        return bool((x - reference).norm() <= self.plan.skip_threshold * reference.norm())

    def reset_state(self) -> None:
        self._outputs.clear()
        self._inputs.clear()

    def cache_bytes(self) -> int:
        return sum(cached.nbytes for cached in self._outputs.values()) + sum(x.nbytes for x in self._inputs.values())


def _first_tensor(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Tensor:
    return next(value for value in (*args, *kwargs.values()) if isinstance(value, Tensor))


def install_block_cache(module: nn.Module, plan: BlockPlan, tracker: Tracker) -> BlockCache:
    cache = BlockCache(module, plan, tracker)
    module.forward = cache
    return cache
