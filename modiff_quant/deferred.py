"""Layers marked for MoDiff one at a time (torchao's `quantize_` hands its handlers single
modules), bound into one prepared model once the model they belong to is known.

MoDiff needs the model's calls, not only the layers': which trajectory, step and timestep each
call is. A marked layer cannot see its model, so the model is found when it is first used:
either a modiff_quant function is called on it (`sampling`, `calibrate`, `convert`, ...), or it is
called, caught by a global forward pre-hook that removes itself once no marked layer is left.
Binding is the lifecycle API's work, one storey up: `api` hands its binder over at import.
Binding resolves one recipe (an exact-name rule per marked layer, everything else float and
unmodulated) exactly as `prepare` does, and converts at once when nothing needs calibration.
"""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Callable
from dataclasses import fields
from typing import Any

from torch import nn
from torch.nn.modules.module import register_module_forward_pre_hook
from torch.utils.hooks import RemovableHandle

from .quant import FLOAT_BITS
from .recipe import LayerSettings, Location, Recipe, Rule

_ORIGIN = Location("torchao quantize_ (MoDiffConfig)", 0)

Binder = Callable[[nn.Module, tuple[Any, ...]], None]
"""Binds a model holding marked layers, during its call with these positional arguments."""

_marked: weakref.WeakKeyDictionary[nn.Module, LayerSettings] = weakref.WeakKeyDictionary()
_hook: RemovableHandle | None = None
_binder: Binder | None = None


def set_binder(binder: Binder) -> None:
    """Install what the global hook calls on a model holding marked layers (set by `api`)."""
    global _binder
    _binder = binder


def defer(layer: nn.Module, settings: LayerSettings) -> None:
    """Mark `layer` to get `settings` when its model is bound."""
    global _hook
    _marked[layer] = settings
    if _hook is None:
        _hook = register_module_forward_pre_hook(_bind_on_call)


def take_marks(model: nn.Module) -> Recipe | None:
    """The recipe of the marked layers in `model` (their marks removed), or None when none is;
    without a walk of the model when no layer anywhere is marked."""
    if not _marked:
        return None
    layers = [(name, module) for name, module in model.named_modules() if name and module in _marked]
    if not layers:
        return None
    _warn_of_unmarked_convolutions(model, [layer for _, layer in layers])
    rules = tuple(Rule((name,), _as_values(_marked.pop(layer)), {}, None, _ORIGIN) for name, layer in layers)
    unmodulated = LayerSettings(w_bits=FLOAT_BITS, a_bits=FLOAT_BITS, scheme="plain")
    _release_hook()
    return Recipe(
        "torchao-quantize_", "MoDiffConfig applied by torchao's quantize_", True, unmodulated, {}, rules, _ORIGIN.file
    )


def _warn_of_unmarked_convolutions(model: nn.Module, marked: list[nn.Module]) -> None:
    """torchao's `quantize_` visits Linear layers only unless its filter_fn says otherwise: on a
    UNet that leaves most of the work float, which should not go unnoticed."""
    if any(isinstance(layer, nn.Conv1d | nn.Conv2d) for layer in marked):
        return
    convs = [m for m in model.modules() if type(m) in (nn.Conv1d, nn.Conv2d)]
    if not convs:
        return
    weights = sum(m.weight.numel() for m in convs)
    total = weights + sum(m.weight.numel() for m in marked if isinstance(m, nn.Linear))
    warnings.warn(
        f"MoDiffConfig reached {len(marked)} Linear layers only, torchao quantize_'s default filter_fn; the model's "
        f"{len(convs)} convolutions ({weights / total:.0%} of the weights) stay float. To quantize them too, pass "
        "filter_fn=modiff_quant.backends.torchao_config.quantizable to quantize_; diffusers' "
        "from_pretrained(quantization_config=...) reaches Linear layers only: use modiff_quant.attach(pipe, recipe).",
        UserWarning,
        stacklevel=4,
    )


def _as_values(settings: LayerSettings) -> dict[str, Any]:
    return {field.name: getattr(settings, field.name) for field in fields(settings)}


def _bind_on_call(module: nn.Module, args: tuple[Any, ...]) -> None:
    """Global forward pre-hook: the first called module that holds marked layers is their model.
    Its own hooks were collected before this one ran, so this call is announced to its tracker here."""
    if not any(m in _marked for m in module.modules()):
        return
    assert _binder is not None, "modiff_quant.api sets the binder when the package is imported"
    _binder(module, args)


def _release_hook() -> None:
    global _hook
    if _hook is not None and not _marked:
        _hook.remove()
        _hook = None
