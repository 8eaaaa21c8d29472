"""`oneshot`: prepare, calibrate, convert and save in one call, as llm-compressor users do.

The recipe is resolved and the calibration input checked before the model changes, so a
calibrated recipe without calibration data fails at once and leaves the model as it was.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .api import calibrate, convert, reset
from .layer_parts import build_parts, layer_type_named, needs_data, splits
from .pipelines import attach, denoiser_of
from .recipe import Recipe, load_recipe
from .serialization import save_quantized

Calibration = Callable[[Any], object] | Iterable[Mapping[str, Any] | str]
"""Your sampling loop, called with the pipeline or model; or, for a pipeline, the calls to make:
prompts, or keyword arguments of the pipeline's `__call__` (one trajectory each)."""


def oneshot(
    pipe_or_model: Any,
    recipe: Recipe | str | Path,
    *,
    calibration: Calibration | None = None,
    output_dir: str | Path | None = None,
    component: str | None = None,
) -> nn.Module:
    """Quantize the denoiser of `pipe_or_model` (a diffusers pipeline or the model itself) with
    `recipe`, calibrating on `calibration` when the recipe's base quantizers need data; with
    `output_dir`, also `save_quantized` there. `component` names the denoiser of a pipeline with
    more than one (as in `attach`). Returns the converted denoiser (the pipeline, if one was
    given, samples with it from now on).

    Raises ValueError before anything changes when the recipe needs calibration data and none is
    given, or when prompts are given for a bare model.
    """
    loaded = recipe if isinstance(recipe, Recipe) else load_recipe(recipe)
    denoiser = denoiser_of(pipe_or_model, component)
    wanted = first_calibrated_layer(loaded, denoiser)
    if wanted and calibration is None:
        raise ValueError(
            f"recipe {loaded.name}: {wanted} needs calibration data; pass calibration= (your sampling loop, "
            "or prompts / pipeline keyword arguments)"
        )
    run = None if calibration is None else _calibration_loop(pipe_or_model, denoiser, calibration)
    attach(pipe_or_model, loaded, component=component)  # converts at once when no layer needs data
    if wanted:
        assert run is not None
        with torch.no_grad(), calibrate(denoiser):
            run()
        convert(denoiser)
    if output_dir is not None:
        save_quantized(denoiser, output_dir)
    return denoiser


def first_calibrated_layer(recipe: Recipe, denoiser: nn.Module) -> str | None:
    """The first layer whose base quantizer calibrates (or whose input split is found on data), or None."""
    modules = dict(denoiser.named_modules())
    for name, layer in recipe.resolve(denoiser).layers.items():
        if layer.leaves_float:
            continue
        layer_type = layer_type_named(layer.module_type)
        _, base_quantizer, quantizers = build_parts(layer.settings, layer_type, layer.activation_widths)
        if needs_data(quantizers, base_quantizer, splits(layer.settings, layer_type), layer.quantizes_weight):
            return f"layer '{name}' ({type(modules[name]).__name__}, base quantizer {layer.settings.base_quantizer})"
    return None


def _calibration_loop(pipe_or_model: Any, denoiser: nn.Module, calibration: Calibration) -> Callable[[], None]:
    """What runs inside `calibrate`: the user's loop, or one pipeline call per item."""
    if callable(calibration):
        return lambda: calibration(pipe_or_model)
    if isinstance(pipe_or_model, nn.Module):
        raise ValueError(
            "calibration for a bare model must be your sampling loop (a callable taking the model); "
            "prompts and keyword arguments are for pipelines"
        )
    calls = [{"prompt": item} if isinstance(item, str) else dict(item) for item in calibration]
    if not calls:
        raise ValueError("calibration holds no prompts or calls")

    def run() -> None:
        for call in calls:
            reset(denoiser)  # one trajectory per call
            pipe_or_model(**call)

    return run
