"""Block-level 0-bit skipping: DeepCache-style caching in the recipe language.

The block keeps its class, name and attributes (pipelines inspect blocks, e.g. diffusers'
`has_cross_attention`); only its instance `forward` is replaced by a `BlockCache`. A block that
already carries diffusers hooks (group offloading, layerwise casting, ...) gets the cache as one
more hook of its `diffusers.hooks` registry instead, so that the hooks chain in either order and
removing one of them leaves the others in place.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
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
        self.plan = plan
        self._tracker = tracker
        self._module = module  # the class forward is called on it: a bound method would pickle as this cache
        self._slot = tracker.add(self)
        self.compute: Callable[..., Any] | None = None  # the forward the cache skips (None: the block's class forward)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        tracker = self._tracker
        if tracker.mode.stateless:  # recording and reconstruction passes compute every block
            return self._forward(*args, **kwargs)
        lane = tracker.lane()
        branch, scheduled = lane.call_branch, tracker.phase(self._slot)
        state = tracker.state(self._slot)
        cached = state.outputs.get(branch)
        probe = _first_tensor(args, kwargs) if self.plan.skip_threshold is not None else None
        if cached is not None and scheduled and (probe is None or self._changed_little(state.inputs[branch], probe)):
            lane.block_calls.append((self._slot, True))
            return cached.get(self.plan.name)
        lane.block_calls.append((self._slot, False))
        output = self._forward(*args, **kwargs)
        state.outputs[branch] = CachedOutput(output)
        if probe is not None:
            state.inputs[branch] = probe.detach()
        return output

    def _forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.compute is not None:
            return self.compute(*args, **kwargs)
        return type(self._module).forward(self._module, *args, **kwargs)

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


BLOCK_HOOK = "modiff_quant_block_cache"


def install_block_cache(module: nn.Module, plan: BlockPlan, tracker: Tracker) -> BlockCache:
    """Cache `module`: as its instance forward (picklable; diffusers hooks added later wrap it),
    or as a hook of the diffusers hooks already on it."""
    registry = getattr(module, "_diffusers_hook", None)
    if registry is not None and registry.hooks:
        return _join_diffusers_hooks(module, registry, plan, tracker)
    if "forward" in vars(module):
        raise RuntimeError(
            f"{plan.name}: its forward is already replaced by a library other than diffusers' hooks; "
            "cannot cache the block"
        )
    cache = BlockCache(module, plan, tracker)
    module.forward = cache
    return cache


def _join_diffusers_hooks(module: nn.Module, registry: Any, plan: BlockPlan, tracker: Tracker) -> BlockCache:
    """The cache as the outermost hook of the block's registry: a skipped call runs none of the
    hooks inside (no onloading of offloaded weights); a computed call runs them all."""
    from diffusers.hooks import ModelHook

    cache = BlockCache(module, plan, tracker)
    hook = ModelHook()
    hook.new_forward = lambda _module, *args, **kwargs: cache(*args, **kwargs)
    cache.compute = lambda *args, **kwargs: hook.fn_ref.original_forward(*args, **kwargs)
    registry.register_hook(hook, BLOCK_HOOK)
    return cache
