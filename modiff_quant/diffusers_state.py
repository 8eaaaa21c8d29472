"""MoDiff state as a diffusers stateful hook.

MoDiff's â/ô memory is a stateful per-step cache, which diffusers already manages for its own
caches through `diffusers.hooks`: a stateful hook is reset by `_reset_stateful_cache()`, which
every pipeline calls at the end of `__call__` (`maybe_free_model_hooks`), and is told the CFG
branch of each call by `cache_context("cond"/"uncond")` in the pipelines that call the branches
separately. Registering MoDiff there makes both reach its tracker.
"""

from __future__ import annotations

import types

from diffusers.hooks import HookRegistry, ModelHook
from diffusers.hooks.hooks import CacheContext, StateManager
from torch import nn

from .api import restart, set_branch

HOOK_NAME = "modiff_quant"


def register_state_hook(model: nn.Module) -> None:
    """Reset `model`'s MoDiff state with the pipeline's caches and key it by cache context."""
    HookRegistry.check_if_exists_or_initialize(model).register_hook(_MoDiffHook(model), HOOK_NAME)
    if not hasattr(model, "_reset_stateful_cache"):  # models without diffusers' CacheMixin (UNet2DConditionModel)
        model._reset_stateful_cache = types.MethodType(_reset_stateful_hooks, model)


class _BranchContexts(StateManager):
    """Found by diffusers' `cache_context` on the hook like its own caches' state managers: the
    context's name ("cond"/"uncond") becomes the MoDiff branch of the calls inside it."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__(dict)
        self._model = model

    def set_context(self, context: CacheContext | None) -> None:
        super().set_context(context)
        set_branch(self._model, None if context is None else context.name)


class _MoDiffHook(ModelHook):
    """A pass-through forward hook whose state is the model's MoDiff state."""

    _is_stateful = True

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.contexts = _BranchContexts(model)

    def reset_state(self, module: nn.Module) -> nn.Module:
        restart(module)  # this thread's pipeline call ended; another thread's may be running
        return module


def _reset_stateful_hooks(model: nn.Module, recurse: bool = True) -> None:
    """What CacheMixin._reset_stateful_cache does, for models without the mixin."""
    HookRegistry.check_if_exists_or_initialize(model).reset_stateful_hooks(recurse=recurse)
