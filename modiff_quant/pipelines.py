"""diffusers pipelines: `attach` puts MoDiff on a pipeline's denoiser and ties its state to the
pipeline's own lifecycle (see `diffusers_state`), so `pipe(...)` needs no other change.

A pipeline that batches cond and uncond needs nothing more: the batch is one state. A pipeline
that calls the branches separately names them with `cache_context`, or else the tracker detects
them (calls repeating a step's timestep are branches). Schedulers only change the timesteps,
which the tracker reads from each call.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from .api import convert, is_converted, needs_calibration, prepare
from .recipe import Recipe
from .serialization import load_quantized

DENOISERS = ("unet", "transformer")


def attach(pipe_or_model: Any, recipe: Recipe | str | Path, *, component: str | None = None) -> nn.Module:
    """Apply `recipe` to the denoiser of a diffusers pipeline (its `unet` or `transformer`, or
    `component`), or to a model, and return the prepared denoiser.

    The denoiser is converted at once when no layer needs calibration data (e.g. `dynamic`
    recipes); otherwise run the pipeline inside `modiff_quant.calibrate(denoiser)`, then call
    `modiff_quant.convert(denoiser)`. `recipe` may also be a folder written by `save_quantized`,
    which is loaded instead. Its MoDiff state is reset after every pipeline call."""
    from .diffusers_state import register_state_hook  # imports diffusers, which `import modiff_quant` does not need

    denoiser = _denoiser(pipe_or_model, component)
    if not isinstance(recipe, Recipe) and Path(recipe).is_dir():
        load_quantized(denoiser, recipe)
    else:
        prepare(denoiser, recipe)
    register_state_hook(denoiser)
    if not is_converted(denoiser) and not needs_calibration(denoiser):
        convert(denoiser)
    return denoiser


def _denoiser(pipe_or_model: Any, component: str | None) -> nn.Module:
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
