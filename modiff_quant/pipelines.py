"""diffusers pipelines: `attach` puts MoDiff on a pipeline's denoiser and ties its state to the
pipeline's own lifecycle, so `pipe(...)` needs no other change: every call of the pipeline is one
sampling scope (state reset when it starts and when it ends, also when it raises, e.g. in a step
callback), and diffusers' own cache reset and `cache_context` reach the state (see `diffusers_state`).

A pipeline that batches cond and uncond needs nothing more: the batch is one state. A pipeline
that calls the branches separately names them with `cache_context`, or else the tracker detects
them (calls repeating a step's timestep are branches). Schedulers only change the timesteps,
which the tracker reads from each call.
"""

from __future__ import annotations

import sys
from contextlib import ExitStack
from functools import cache
from pathlib import Path
from typing import Any

from torch import nn

from .api import (
    bind_on_call,
    convert,
    is_converted,
    is_prepared,
    needs_calibration,
    prepare,
    sampling,
)
from .deferred import set_binder
from .recipe import Recipe
from .serialization import load_quantized

DENOISERS = ("unet", "transformer")


def _bind_diffusers_model_on_call(model: nn.Module, args: tuple[Any, ...]) -> None:
    """A diffusers model bound on its first call (torchao's `quantize_`, or `from_pretrained`
    with a `quantization_config` holding a `MoDiffConfig`) also gets the state hook, so that its
    pipeline's calls reset its MoDiff state as they do for an attached one."""
    diffusers = sys.modules.get("diffusers")  # a diffusers model means diffusers is imported
    if bind_on_call(model, args) and diffusers is not None and isinstance(model, diffusers.ModelMixin):
        from .diffusers_state import register_state_hook

        register_state_hook(model)


set_binder(_bind_diffusers_model_on_call)  # replaces the lifecycle API's binder: one storey up, it knows diffusers


def attach(
    pipe_or_model: Any, recipe: Recipe | str | Path | None = None, *, component: str | None = None
) -> nn.Module:
    """Apply `recipe` to the denoiser of a diffusers pipeline (its `unet` or `transformer`, or
    `component`), or to a model, and return the prepared denoiser.

    The denoiser is converted at once when no layer needs calibration data (e.g. `dynamic`
    recipes); otherwise run the pipeline inside `modiff_quant.calibrate(denoiser)`, then call
    `modiff_quant.convert(denoiser)`. `recipe` may also be a folder written by `save_quantized`,
    which is loaded instead. Its MoDiff state is reset when each pipeline call starts and ends.
    Without `recipe`, the denoiser is one already attached to another pipeline (e.g. an img2img
    pipeline made from the same components), whose calls this pipeline's calls now scope too."""
    from .diffusers_state import register_state_hook  # imports diffusers, which `import modiff_quant` does not need

    denoiser = denoiser_of(pipe_or_model, component)
    if recipe is not None:
        saved = not isinstance(recipe, Recipe) and Path(recipe).is_dir()  # a folder of save_quantized
        if saved:
            load_quantized(denoiser, recipe)
        else:
            prepare(denoiser, recipe)
        register_state_hook(denoiser)
    elif not is_prepared(denoiser):
        raise ValueError(
            "attach() without a recipe ties an already quantized denoiser to another pipeline, "
            f"but this {type(denoiser).__name__} is not prepared: pass a recipe"
        )
    if not isinstance(pipe_or_model, nn.Module):
        pipe_or_model.__class__ = _scoped(type(pipe_or_model))
    if not is_converted(denoiser) and not needs_calibration(denoiser):
        convert(denoiser)
    return denoiser


@cache
def _scoped(pipeline: type) -> type:
    """`pipeline` whose calls are sampling scopes of its prepared models; same name and module, so
    diffusers' `save_pretrained` and `isinstance` checks see the original class."""
    if getattr(pipeline, "_modiff_scoped", False):
        return pipeline

    def __call__(self: Any, *args: Any, **kwargs: Any) -> Any:
        with ExitStack() as scopes:
            for model in [
                value for value in vars(self).values() if isinstance(value, nn.Module) and is_prepared(value)
            ]:
                scopes.enter_context(sampling(model))
            return pipeline.__call__(self, *args, **kwargs)

    namespace = {
        "__call__": __call__,
        "__module__": pipeline.__module__,
        "__qualname__": pipeline.__qualname__,
        "__doc__": pipeline.__doc__,
        "_modiff_scoped": True,
    }
    return type(pipeline.__name__, (pipeline,), namespace)


def denoiser_of(pipe_or_model: Any, component: str | None) -> nn.Module:
    """The model itself, or a pipeline's `component`, or its one `unet` or `transformer`."""
    if component is None and isinstance(pipe_or_model, nn.Module):
        return pipe_or_model
    where = type(pipe_or_model).__name__
    if component is not None:
        found = getattr(pipe_or_model, component, None)
        if not isinstance(found, nn.Module):
            raise ValueError(f"{where} has no model component {component!r}{_components(pipe_or_model)}")
        return found
    found = [name for name in DENOISERS if isinstance(getattr(pipe_or_model, name, None), nn.Module)]
    if len(found) != 1:
        have = "both unet and transformer" if found else "neither a unet nor a transformer"
        raise ValueError(f"{where} has {have}; name the denoiser with component=...{_components(pipe_or_model)}")
    return getattr(pipe_or_model, found[0])


def _components(pipe: Any) -> str:
    names = [name for name, value in getattr(pipe, "components", {}).items() if isinstance(value, nn.Module)]
    return f" (its model components: {', '.join(names)})" if names else ""
