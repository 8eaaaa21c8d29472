"""Shipping a quantized model: `save_quantized` / `load_quantized`.

A saved model is a folder of three files:
- `model.safetensors`: every tensor of the converted model, quantized weights of up to 8 bits as
  codes into per-channel tables of their exact values (`codes/<layer>/`, see `weight_codes`:
  a W8 model is about a quarter of its float32 size), plus each quantized layer's frozen
  quantizer parameters (`modiff/<layer>/`);
- `recipe.yaml`: the recipe, flat (its `extends` chain merged), which `prepare` re-applies;
- `plan.json`: the resolved per-layer plan, shapes, versions and a checksum of the other two.

Loading checks everything it can before it changes the model (files complete and unchanged,
format version, the plan of the recipe on this model, every tensor's name, shape and dtype), so
a mismatch or a damaged file raises an error that names it and leaves the model as it was.
Weights packed by a tensor subclass (torchao int4) cannot be stored in safetensors; they are
re-packed on load from the float weight of the model given, which must be the one they were
made from (checked by its SHA-256).
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import Tensor, nn

from .api import ensure_float, install, is_converted, mark_converted, plan_of
from .layers import QuantizedLayer, weight_digest
from .recipe import Plan, Recipe, RecipeError, load_recipe
from .recipe.document import plan_document, recipe_document
from .registry import nearest
from .weight_codes import decode, encode

FORMAT = 1
TENSORS, RECIPE, PLAN = "model.safetensors", "recipe.yaml", "plan.json"
_LAYER_PREFIX, _CODES_PREFIX = "modiff/", "codes/"
_MANIFEST_KEYS = ("format", "versions", "model_class", "files", "packed_weights", "coded_weights", "plan")


class LoadError(RuntimeError):
    """A saved quantized model cannot be loaded into the given model; nothing was changed."""


def save_quantized(model: nn.Module, directory: str | Path) -> Path:
    """Write a converted model to `directory` (created; files there are replaced atomically)."""
    from . import __version__

    if not is_converted(model):
        raise RuntimeError("save_quantized() needs a converted model: run modiff_quant.convert(model) first")
    layers = _quantized_layers(model)
    unsaveable = [name for name, layer in layers.items() if layer.packed and layer.source_weight_digest is None]
    if unsaveable:
        raise RuntimeError(
            f"save_quantized() cannot store {', '.join(unsaveable[:3])}{', ...' if len(unsaveable) > 3 else ''}: packed weights are re-made "
            "from the float weights on load, but these were packed before modiff_quant prepared the model (torchao quantize_); "
            "apply the recipe with modiff_quant.prepare to a float model instead"
        )
    folder = Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {f"{_LAYER_PREFIX}{name}/{key}": value for name, layer in layers.items() for key, value in layer.calibration_state().items() if key != "weight"}
    own = _own_state(model, layers)
    coded = {name: found for name, layer in layers.items() if not layer.packed and (found := encode(layer.weight, layer.plan.settings.w_bits)) is not None}
    for name, (codes, table) in coded.items():
        del own[f"{name}.weight"]
        tensors.update({f"{_CODES_PREFIX}{name}/codes": codes, f"{_CODES_PREFIX}{name}/table": table})
    tensors.update(own)
    payload = save_safetensors({key: value.detach().cpu().contiguous() for key, value in tensors.items()}, metadata={"format": f"modiff-quant/{FORMAT}"})
    plan = plan_of(model)
    recipe_text = yaml.safe_dump(recipe_document(plan.recipe), sort_keys=False, allow_unicode=True).encode()
    manifest = {
        "format": FORMAT,
        "versions": {"modiff_quant": __version__, "torch": torch.__version__, "python": platform.python_version()},
        "model_class": type(model).__name__,
        "files": {TENSORS: _file_facts(payload), RECIPE: _file_facts(recipe_text)},
        "packed_weights": {name: layer.source_weight_digest for name, layer in layers.items() if layer.packed},
        "coded_weights": sorted(coded),
        "plan": plan_document(plan),
    }
    for name, content in ((TENSORS, payload), (RECIPE, recipe_text), (PLAN, json.dumps(manifest, indent=1).encode())):
        _write_atomically(folder / name, content)
    return folder


def load_quantized(model: nn.Module, directory: str | Path) -> nn.Module:
    """Make the float `model` (same architecture as the saved one) the saved quantized model, in
    place, bit-exact; raise `LoadError` naming what does not match, leaving `model` unchanged."""
    ensure_float(model)
    saved = _read(Path(directory))
    plan = _resolve(saved, model)
    _check_plan(saved, plan_document(plan))
    _check_tensors(saved, model, plan)
    install(model, plan)
    model.load_state_dict(saved.own, strict=False)
    for name, layer in _quantized_layers(model).items():
        prefix = f"{_LAYER_PREFIX}{name}/"
        state = {key.removeprefix(prefix): value for key, value in saved.tensors.items() if key.startswith(prefix)}
        if name not in saved.packed:
            state["weight"] = saved.own[f"{name}.weight"]  # as quantized: load_calibration_state would re-quantize without it
        layer.load_calibration_state({key: value.to(layer.weight.device) for key, value in state.items()})
    mark_converted(model)
    return model


@dataclass(frozen=True)
class _Saved:
    manifest: dict[str, Any]
    recipe: Recipe
    tensors: dict[str, Tensor]

    @property
    def packed(self) -> dict[str, str]:
        return self.manifest["packed_weights"]

    @cached_property
    def own(self) -> dict[str, Tensor]:
        """The model's tensors (state_dict keys), coded weights decoded."""
        own = {key: value for key, value in self.tensors.items() if not key.startswith((_LAYER_PREFIX, _CODES_PREFIX))}
        for name in self.manifest["coded_weights"]:
            own[f"{name}.weight"] = decode(self.tensors[f"{_CODES_PREFIX}{name}/codes"], self.tensors[f"{_CODES_PREFIX}{name}/table"])
        return own


def _read(folder: Path) -> _Saved:
    manifest = _read_manifest(folder / PLAN)
    contents = {name: _read_checked(folder / name, manifest["files"][name]) for name in (TENSORS, RECIPE)}
    try:
        recipe = load_recipe(folder / RECIPE)
    except RecipeError as exc:
        raise LoadError(f"{folder / RECIPE}: {exc}") from None
    try:
        tensors = load_safetensors(contents[TENSORS])
    except SafetensorError as exc:
        raise LoadError(f"{folder / TENSORS} is not a valid safetensors file ({exc})") from None
    return _Saved(manifest, recipe, tensors)


def _read_manifest(path: Path) -> dict[str, Any]:
    from . import __version__

    if not path.is_file():
        raise LoadError(f"{path} not found: {path.parent} is not a model written by save_quantized()")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise LoadError(f"{path} is damaged or truncated ({exc}); save the model again") from None
    absent = [key for key in _MANIFEST_KEYS if not isinstance(manifest, dict) or key not in manifest]
    absent += [f"the checksum of {name}" for name in (TENSORS, RECIPE) if not absent and not {"bytes", "sha256"} <= set(manifest["files"].get(name, {}))]
    if absent:
        raise LoadError(f"{path} is damaged: it lacks {', '.join(absent)}; save the model again")
    if manifest["format"] != FORMAT:
        saved_by = manifest["versions"].get("modiff_quant", "?")
        raise LoadError(f"{path}: format {manifest['format']} (written by modiff-quant {saved_by}); modiff-quant {__version__} reads format {FORMAT}")
    return manifest


def _read_checked(path: Path, facts: dict[str, Any]) -> bytes:
    if not path.is_file():
        raise LoadError(f"{path} not found (part of the saved model)")
    content = path.read_bytes()
    if len(content) != facts["bytes"]:
        raise LoadError(f"{path} is truncated or was replaced: {len(content)} bytes, {facts['bytes']} were saved")
    if hashlib.sha256(content).hexdigest() != facts["sha256"]:
        raise LoadError(f"{path} is corrupt: its SHA-256 differs from the one saved in {PLAN}")
    return content


def _resolve(saved: _Saved, model: nn.Module) -> Plan:
    try:
        return saved.recipe.resolve(model)
    except (RecipeError, ValueError) as exc:
        raise LoadError(f"the saved recipe does not apply to this model: {exc}") from None


def _check_plan(saved: _Saved, plan: dict[str, Any]) -> None:
    """The saved plan and this model's plan must agree layer by layer and block by block."""
    for kind in ("layers", "blocks"):
        expected, found = saved.manifest["plan"][kind], plan[kind]
        for name in expected:
            if name not in found:
                close = nearest(name, [other for other in found if other not in expected])
                hint = f"; this model has {' or '.join(repr(c) for c in close)} (renamed?)" if close else ""
                raise LoadError(f"{kind[:-1]} '{name}' of the saved model is not in this model{hint}")
        for name in found:
            if name not in expected:
                raise LoadError(f"this model has {kind[:-1]} '{name}', which the saved {saved.manifest['model_class']} does not: a different architecture")
            if found[name] != expected[name]:
                raise LoadError(f"{kind[:-1]} '{name}': the saved recipe resolves differently on this model ({_differences(expected[name], found[name])})")


def _differences(saved: dict[str, Any], found: dict[str, Any]) -> str:
    flat = {**saved, **saved.get("settings", {})}, {**found, **found.get("settings", {})}
    keys = sorted(k for k in {*flat[0], *flat[1]} if k != "settings" and flat[0].get(k) != flat[1].get(k))
    return "; ".join(f"{k}: saved {flat[0].get(k)!r}, here {flat[1].get(k)!r}" for k in keys)


def _check_tensors(saved: _Saved, model: nn.Module, plan: Plan) -> None:
    """Every saved tensor has a twin of the same shape and dtype in the float model, and every
    packed weight will be re-made from the float weight it was made from."""
    own = saved.own
    state = model.state_dict()
    packed = {f"{name}.weight" for name in saved.packed}
    extra = sorted(set(state) - set(own) - packed)
    if extra:
        raise LoadError(f"this model has tensors the saved {saved.manifest['model_class']} does not: {', '.join(extra[:3])}{', ...' if len(extra) > 3 else ''}")
    for key, value in own.items():
        if key not in state:
            raise LoadError(f"tensor '{key}' of the saved model is not in this model")
        if state[key].shape != value.shape or state[key].dtype != value.dtype:
            raise LoadError(f"tensor '{key}': saved as {list(value.shape)} {value.dtype}, this model has {list(state[key].shape)} {state[key].dtype}")
    for name, digest in saved.packed.items():
        if name not in plan.layers or weight_digest(state[f"{name}.weight"]) != digest:
            raise LoadError(f"layer '{name}': its weight was packed by {plan.layers[name].settings.base_quantizer if name in plan.layers else 'a base quantizer'} and is re-made on load from the float weight, but this model's float weight is not the one it was made from")


def _quantized_layers(model: nn.Module) -> dict[str, QuantizedLayer]:
    return {name: module for name, module in model.named_modules() if isinstance(module, QuantizedLayer)}


def _own_state(model: nn.Module, layers: dict[str, QuantizedLayer]) -> dict[str, Tensor]:
    """The model's tensors without the quantizers' (saved per layer) and packed weights (re-made)."""
    skip = tuple(f"{name}.act_quantizers." for name in layers)
    packed = {f"{name}.weight" for name, layer in layers.items() if layer.packed}
    return {key: value for key, value in model.state_dict().items() if not key.startswith(skip) and key not in packed}


def _file_facts(content: bytes) -> dict[str, Any]:
    return {"bytes": len(content), "sha256": hashlib.sha256(content).hexdigest()}


def _write_atomically(path: Path, content: bytes) -> None:
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_bytes(content)
    os.replace(temporary, path)
