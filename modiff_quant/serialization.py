"""Shipping a quantized model: `save_quantized` / `load_quantized`.

A saved model is a folder of three files:
- `model.safetensors`: every tensor of the converted model, quantized weights of up to 8 bits as
  codes into per-channel tables of their exact values (`codes/<layer>/`, see `weight_codes`:
  a W8 model is about a quarter of its float32 size), plus each quantized layer's frozen
  quantizer parameters (`modiff/<layer>/`);
- `recipe.yaml`: the recipe, flat (its `extends` chain merged), which `prepare` re-applies;
- `plan.json`: the resolved per-layer plan, shapes, versions and a checksum of the other files;
- `config.json` (diffusers models): the model's diffusers config, from which
  `load_quantized(folder)` builds the model without the original float checkpoint.

Saving computes every byte first, then writes a new folder beside its place and renames it
into place (in an existing folder, each file is replaced atomically, `plan.json` last), so a
failure leaves neither an empty nor a half-written folder.

A saved model is data from whoever sent it. Loading checks everything before it changes the
model, in this order: files present, sizes within bounds before anything is parsed, `plan.json`
(format version, then every field's type), checksums, the recipe (flat, valid), the size of the
tensors' header, the plan of the recipe on this model, coded weights, every tensor's name,
shape, dtype and finiteness, and each layer's quantizer state, loaded first into standalone
quantizers that must restore it exactly and quantize a probe input to finite values. Any
mismatch or damage raises a `LoadError` that names the file, layer or tensor, and leaves the
model as it was.
Weights packed by a tensor subclass (torchao int4) cannot be stored in safetensors; they are
re-packed on load from the float weight of the model given, which must be the one they were
made from (checked by its SHA-256).
"""

from __future__ import annotations

import hashlib
import json
import platform
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import Tensor, nn

from .api import ensure_float, install, is_converted, mark_converted, plan_of
from .atomic_files import write_folder
from .attention_products import AttentionOperand
from .imports import quiet_imports
from .layer_parts import PARAMETER_KEYS, check_calibration_state
from .layers import QuantizedLayer, weight_digest
from .quoting import excerpt, first_few
from .recipe import LayerPlan, Plan, Recipe, RecipeError, flat_recipe
from .recipe.document import plan_document, recipe_document
from .registry import nearest
from .version import __version__
from .weight_codes import decode, encode

FORMAT = 1
TENSORS, RECIPE, PLAN, CONFIG = "model.safetensors", "recipe.yaml", "plan.json", "config.json"
_LAYER_PREFIX, _CODES_PREFIX = "modiff/", "codes/"
_MANIFEST_KEYS = ("format", "versions", "model_class", "files", "packed_weights", "coded_weights", "plan")

MAX_PLAN_BYTES = 16 << 20
"""Far above the plan of any real model (a few hundred bytes per layer); larger is refused unread."""
MAX_RECIPE_BYTES = 1 << 20
"""A saved recipe is a few kilobytes; parsing YAML is slow (about a second per megabyte)."""
MAX_HEADER_BYTES = 16 << 20
"""Of the safetensors header (about 100 bytes per tensor)."""
MAX_CONFIG_BYTES = 1 << 20
"""A diffusers model config is a few kilobytes."""
MAX_DEPTH = 32
"""Nesting of plan.json (a real plan nests 8 deep): deeper input could exhaust the recursion limit later."""


class LoadError(RuntimeError):
    """A saved quantized model cannot be loaded into the given model; nothing was changed."""


def save_quantized(model: nn.Module, directory: str | Path) -> Path:
    """Write a converted model to `directory`: all files or none (see the module docstring)."""
    if not is_converted(model):
        raise RuntimeError("save_quantized() needs a converted model: run modiff_quant.convert(model) first")
    folder = Path(directory)
    if folder.exists() and not folder.is_dir():
        raise NotADirectoryError(f"save_quantized(): {folder} exists and is not a folder")
    layers = _quantized_layers(model)
    unsaveable = [name for name, layer in layers.items() if layer.packed and layer.source_weight_digest is None]
    if unsaveable:
        raise RuntimeError(
            f"save_quantized() cannot store {first_few(unsaveable)}: packed weights are re-made "
            "from the float weights on load, but these were packed before modiff_quant prepared the model "
            "(torchao quantize_); apply the recipe with modiff_quant.prepare to a float model instead"
        )
    tensors = {
        f"{_LAYER_PREFIX}{name}/{key}": value
        for name, layer in layers.items()
        for key, value in layer.calibration_state().items()
        if key not in PARAMETER_KEYS
    }
    own = _own_state(model, layers)
    coded: dict[str, tuple[Tensor, Tensor]] = {}  # layer -> (codes, table), for the weights `encode` can code
    for name, layer in layers.items():
        if layer.packed or not layer.plan.has_weight:
            continue
        codes_and_table = encode(layer.weight, layer.plan.settings.w_bits)
        if codes_and_table is not None:
            coded[name] = codes_and_table
    for name, (codes, table) in coded.items():
        del own[f"{name}.weight"]
        tensors.update({f"{_CODES_PREFIX}{name}/codes": codes, f"{_CODES_PREFIX}{name}/table": table})
    tensors.update(own)
    payload = save_safetensors(
        {key: value.detach().cpu().contiguous() for key, value in tensors.items()},
        metadata={"format": f"modiff-quant/{FORMAT}"},
    )
    plan = plan_of(model)
    recipe_text = yaml.safe_dump(recipe_document(plan.recipe), sort_keys=False, allow_unicode=True).encode()
    files = {TENSORS: payload, RECIPE: recipe_text}
    if hasattr(model, "to_json_string"):  # a diffusers model: its config rebuilds it
        files[CONFIG] = model.to_json_string().encode()
    manifest = {
        "format": FORMAT,
        "versions": {"modiff_quant": __version__, "torch": torch.__version__, "python": platform.python_version()},
        "model_class": type(model).__name__,
        "files": {name: _file_facts(content) for name, content in files.items()},
        "packed_weights": {name: layer.source_weight_digest for name, layer in layers.items() if layer.packed},
        "coded_weights": sorted(coded),
        "plan": plan_document(plan),
    }
    write_folder(folder, {**files, PLAN: json.dumps(manifest, indent=1).encode()})
    return folder


def load_quantized(model: nn.Module | str | Path, directory: str | Path | None = None) -> nn.Module:
    """Make the float `model` (same architecture as the saved one) the saved quantized model, in
    place, bit-exact; raise `LoadError` naming what does not match, leaving `model` unchanged.

    `load_quantized(directory)` builds the model from the folder's `config.json` (a diffusers
    model) instead, with no float checkpoint; weights packed by torchao need the float model."""
    if directory is None:
        if isinstance(model, nn.Module):
            raise TypeError("load_quantized(model, directory): the folder to load is missing")
        directory, model = model, _model_from_config(Path(model))
    elif not isinstance(model, nn.Module):
        raise TypeError(f"load_quantized(model, directory): model must be an nn.Module, got {type(model).__name__}")
    ensure_float(model)
    saved = _read(Path(directory))
    plan = _resolve(saved, model)
    _check_plan(saved, plan_document(plan))
    own = _model_tensors(saved, plan)
    _check_tensors(saved, own, model, plan)
    states = _layer_states(saved, own, model, plan)
    install(model, plan)
    model.load_state_dict(own, strict=False)
    device = next(model.parameters()).device
    for name, layer in _quantized_layers(model).items():
        where = layer.weight.device if layer.plan.has_weight else device
        layer.load_calibration_state({key: value.to(where) for key, value in states[name].items()})
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


def _model_from_config(folder: Path) -> nn.Module:
    """The float model of `config.json`, built only as a diffusers model class (a config names a
    class; nothing else is imported) and only when its size fits the saved tensors."""
    with quiet_imports():
        import diffusers

    manifest = _read_manifest(folder / PLAN)
    if not (folder / TENSORS).is_file():
        raise LoadError(f"{folder / TENSORS} not found (part of the saved model)")
    if CONFIG not in manifest["files"]:
        raise LoadError(
            f"{folder} has no {CONFIG} (the saved {manifest['model_class']} is no diffusers model): "
            "pass the float model, load_quantized(model, folder)"
        )
    if manifest["packed_weights"]:
        raise LoadError(
            f"{folder}: torchao-packed weights ({first_few(list(manifest['packed_weights']))}) are re-made from the "
            "float model's weights: pass the float model, load_quantized(model, folder)"
        )
    try:
        config = json.loads(_read_checked(folder / CONFIG, manifest["files"][CONFIG]).decode("utf-8"))
    except ValueError as exc:
        raise LoadError(f"{folder / CONFIG} is not JSON ({excerpt(str(exc))})") from None
    name = config.get("_class_name") if isinstance(config, dict) else None
    cls = getattr(diffusers, name, None) if isinstance(name, str) else None
    if not (isinstance(cls, type) and issubclass(cls, diffusers.ModelMixin)) or name != manifest["model_class"]:
        raise LoadError(
            f"{folder / CONFIG}: _class_name {excerpt(name)} is not the saved model's diffusers class "
            f"({excerpt(manifest['model_class'])})"
        )
    try:
        with torch.device("meta"):  # sized first: a crafted config must not allocate more than the file holds
            shell = cls.from_config(config)
    except Exception as exc:  # diffusers raises many types for a config it cannot build
        raise LoadError(f"{folder / CONFIG}: {name} cannot be built from it ({excerpt(str(exc))})") from None
    floats = sum(t.numel() * t.element_size() for t in (*shell.parameters(), *shell.buffers()))
    limit = 8 * (folder / TENSORS).stat().st_size + (64 << 20)  # codes are 1/4 of float32; buffers may be unsaved
    if floats > limit:
        raise LoadError(
            f"{folder / CONFIG}: the {name} it describes ({floats:,} bytes) is far larger than the saved tensors"
        )
    return cls.from_config(config).eval()


def _read(folder: Path) -> _Saved:
    manifest = _read_manifest(folder / PLAN)
    contents = {name: _read_checked(folder / name, manifest["files"][name]) for name in (TENSORS, RECIPE)}
    recipe = _parse_recipe(folder / RECIPE, contents[RECIPE])
    tensors = _parse_tensors(folder / TENSORS, contents[TENSORS])
    return _Saved(manifest, recipe, tensors)


def _read_manifest(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise LoadError(f"{path} not found: {path.parent} is not a model written by save_quantized()")
    content = _read_at_most(path, MAX_PLAN_BYTES)
    if len(content) > MAX_PLAN_BYTES:
        raise LoadError(
            f"{path} is larger than the {MAX_PLAN_BYTES} bytes of any plan save_quantized() writes: not a saved model"
        )
    try:
        manifest = json.loads(content.decode("utf-8"), parse_constant=_refuse_constant)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise LoadError(f"{path} is damaged or truncated ({excerpt(str(exc))}); save the model again") from None
    if _depth(manifest) > MAX_DEPTH:
        raise LoadError(
            f"{path} is damaged: nested deeper than the {MAX_DEPTH} levels save_quantized() writes; "
            "save the model again"
        )
    absent = [key for key in _MANIFEST_KEYS if not isinstance(manifest, dict) or key not in manifest]
    if not absent:
        files = manifest["files"]
        absent = [
            f"the checksum of {name}"
            for name in (TENSORS, RECIPE)
            if not (
                isinstance(files, dict)
                and isinstance(files.get(name), dict)
                and {"bytes", "sha256"} <= files[name].keys()
            )
        ]
    if absent:
        raise LoadError(f"{path} is damaged: it lacks {', '.join(absent)}; save the model again")
    if manifest["format"] != FORMAT:
        versions = manifest["versions"]
        saved_by = versions.get("modiff_quant", "?") if isinstance(versions, dict) else "?"
        raise LoadError(
            f"{path}: format {excerpt(manifest['format'])} (written by modiff-quant {excerpt(saved_by)}); "
            f"modiff-quant {__version__} reads format {FORMAT}"
        )
    for key in _MANIFEST_KEYS:
        bad = _MANIFEST[key](manifest[key])
        if bad is not None:
            raise LoadError(
                f"{path} is damaged: '{excerpt(key + bad)}' is not as save_quantized() writes it; save the model again"
            )
    if len(manifest) > len(_MANIFEST_KEYS):
        unknown = ", ".join(sorted(set(manifest) - set(_MANIFEST_KEYS)))
        raise LoadError(f"{path} is damaged: unknown fields {excerpt(unknown)}; save the model again")
    return manifest


def _refuse_constant(name: str) -> None:
    raise ValueError(f"{name} is not a number save_quantized() writes")


def _depth(value: Any) -> int:
    """How deeply JSON lists and objects nest, found without recursion."""
    deepest, pending = 0, [(value, 0)]
    while pending:
        item, depth = pending.pop()
        deepest = max(deepest, depth)
        if isinstance(item, (dict, list)) and depth <= MAX_DEPTH:
            pending.extend((child, depth + 1) for child in (item.values() if isinstance(item, dict) else item))
    return deepest


_Check = Callable[[Any], str | None]
"""Validates a JSON value: None when valid, else where it is not (a suffix such as `.layers.x`,
empty for the value itself)."""


def _kind(*types: type) -> _Check:
    return lambda value: None if isinstance(value, types) and (bool in types or not isinstance(value, bool)) else ""


def _matching(pattern: str) -> _Check:
    compiled = re.compile(pattern)
    return lambda value: None if isinstance(value, str) and compiled.fullmatch(value) else ""


def _fields(fields: dict[str, _Check]) -> _Check:
    """An object with exactly these fields."""

    def check(value: Any) -> str | None:
        if not isinstance(value, dict) or value.keys() != fields.keys():
            return ""
        return next((f".{key}{bad}" for key, field in fields.items() if (bad := field(value[key])) is not None), None)

    return check


def _optional_fields(fields: dict[str, _Check], optional: dict[str, _Check]) -> _Check:
    """An object with these fields and any of the optional ones."""

    def check(value: Any) -> str | None:
        if not isinstance(value, dict):
            return ""
        present = {key: field for key, field in optional.items() if key in value}
        return _fields({**fields, **present})(value)

    return check


def _mapping(item: _Check) -> _Check:
    """An object of any names, each value passing `item`."""

    def check(value: Any) -> str | None:
        if not isinstance(value, dict):
            return ""
        return next((f".{key}{bad}" for key, entry in value.items() if (bad := item(entry)) is not None), None)

    return check


def _names(value: Any) -> str | None:
    """A list of distinct strings."""
    if not isinstance(value, list):
        return ""
    bad = next((f"[{index}]" for index, name in enumerate(value) if not isinstance(name, str)), None)
    return "" if bad is None and len(set(value)) != len(value) else bad


def _size(value: Any) -> str | None:
    return None if type(value) is int and 0 <= value < 1 << 63 else ""


_DIGEST = _matching("[0-9a-f]{64}")
_FACTS = _fields({"bytes": _size, "sha256": _DIGEST})
_MANIFEST: dict[str, _Check] = {
    "format": _kind(int),
    "versions": _mapping(_kind(str)),
    "model_class": _kind(str),
    "files": _optional_fields({TENSORS: _FACTS, RECIPE: _FACTS}, {CONFIG: _FACTS}),
    "packed_weights": _mapping(_DIGEST),
    "coded_weights": _names,
    "plan": _fields(
        {
            "layers": _mapping(
                _optional_fields(
                    {
                        "type": _kind(str),
                        "settings": _kind(dict),
                        "zero_bit_steps": _kind(list),
                        "adopted_from": _kind(str, type(None)),
                    },
                    {"a_bits_steps": _kind(list)},
                )
            ),
            "blocks": _mapping(
                _fields(
                    {
                        "type": _kind(str),
                        "steps": _kind(str, list, dict),
                        "skip_threshold": _kind(int, float, type(None)),
                    }
                )
            ),
        }
    ),
}
"""plan.json as `save_quantized` writes it; the plan's settings are compared with the recipe's plan."""


def _read_at_most(path: Path, limit: int) -> bytes:
    """Up to limit + 1 bytes: one more than allowed tells a file that is too long (or grew)."""
    try:
        with path.open("rb") as file:
            return file.read(limit + 1)
    except OSError as exc:
        raise LoadError(f"{path} cannot be read: {exc}") from None


def _read_checked(path: Path, facts: dict[str, Any]) -> bytes:
    if not path.is_file():
        raise LoadError(f"{path} not found (part of the saved model)")
    limit = {RECIPE: MAX_RECIPE_BYTES, CONFIG: MAX_CONFIG_BYTES}.get(path.name)
    if limit is not None and facts["bytes"] > limit:
        raise LoadError(
            f"{path}: {PLAN} says it has {facts['bytes']} bytes, "
            f"more than the {limit} of any {path.name} save_quantized() writes"
        )
    size = path.stat().st_size
    content = _read_at_most(path, size) if size == facts["bytes"] else b""
    if len(content) != facts["bytes"]:
        # the file's size, or what could be read of it when it shrank while being read
        found_bytes = size if size != facts["bytes"] else len(content)
        raise LoadError(f"{path} is truncated or was replaced: {found_bytes} bytes, {facts['bytes']} were saved")
    if hashlib.sha256(content).hexdigest() != facts["sha256"]:
        raise LoadError(f"{path} is corrupt: its SHA-256 differs from the one saved in {PLAN}")
    return content


def _parse_recipe(path: Path, content: bytes) -> Recipe:
    """The saved recipe, from the bytes whose checksum was checked (not read again), and flat: one
    that extended another would make the load read other files."""
    try:
        return flat_recipe(content.decode("utf-8"), path)
    except UnicodeDecodeError as exc:
        raise LoadError(f"{path} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except RecipeError as exc:  # its message starts with the file and line
        raise LoadError(str(exc)) from None


def _parse_tensors(path: Path, content: bytes) -> dict[str, Tensor]:
    header = int.from_bytes(content[:8], "little")
    if header > MAX_HEADER_BYTES:
        raise LoadError(
            f"{path}: its header claims {header} bytes, "
            f"more than the {MAX_HEADER_BYTES} of any model save_quantized() writes"
        )
    try:
        return load_safetensors(content)
    except (SafetensorError, ValueError, TypeError, RuntimeError) as exc:
        raise LoadError(f"{path} is not a valid safetensors file ({excerpt(str(exc))})") from None


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
                raise LoadError(f"{kind[:-1]} '{excerpt(name)}' of the saved model is not in this model{hint}")
        for name in found:
            if name not in expected:
                saved_class = excerpt(saved.manifest["model_class"])
                raise LoadError(
                    f"this model has {kind[:-1]} '{name}', which the saved {saved_class} does not: "
                    "a different architecture"
                )
            if found[name] != expected[name]:
                differences = _differences(expected[name], found[name])
                raise LoadError(
                    f"{kind[:-1]} '{name}': the saved recipe resolves differently on this model ({differences})"
                )


def _differences(saved: dict[str, Any], found: dict[str, Any]) -> str:
    """The fields, settings included, in which two layer or block plans differ."""
    saved_flat = {**saved, **saved.get("settings", {})}
    found_flat = {**found, **found.get("settings", {})}
    differing = sorted(
        key for key in {*saved_flat, *found_flat} if key != "settings" and saved_flat.get(key) != found_flat.get(key)
    )
    return "; ".join(f"{key}: saved {excerpt(saved_flat.get(key))}, here {found_flat.get(key)!r}" for key in differing)


def _installed(plan: Plan) -> dict[str, LayerPlan]:
    """The layers `install` makes quantized layers."""
    return {name: layer for name, layer in plan.layers.items() if not layer.leaves_float}


def _model_tensors(saved: _Saved, plan: Plan) -> dict[str, Tensor]:
    """The model's tensors (state_dict keys), coded weights decoded and checked."""
    own = {key: value for key, value in saved.tensors.items() if not key.startswith((_LAYER_PREFIX, _CODES_PREFIX))}
    coded = saved.manifest["coded_weights"]
    expected = {f"{_CODES_PREFIX}{name}/{part}" for name in coded for part in ("codes", "table")}
    unexpected = [key for key in saved.tensors if key.startswith(_CODES_PREFIX) and key not in expected]
    if unexpected:
        raise LoadError(f"tensor '{excerpt(unexpected[0])}' of {TENSORS} is the code of no weight {PLAN} lists")
    installed = _installed(plan)
    for name in coded:
        where = f"{PLAN} lists the weight of '{excerpt(name)}' as coded"
        if name not in installed:
            raise LoadError(f"{where}, but that is no quantized layer of the saved recipe")
        if name in saved.packed or f"{name}.weight" in own:
            also_as = "packed" if name in saved.packed else f"floats in {TENSORS}"
            raise LoadError(f"{where}, but also as {also_as}")
        parts = [saved.tensors.get(f"{_CODES_PREFIX}{name}/{part}") for part in ("codes", "table")]
        if None in parts:
            raise LoadError(f"{where}, but {TENSORS} lacks its codes or table")
        try:
            own[f"{name}.weight"] = decode(*parts)
        except ValueError as exc:
            raise LoadError(f"layer '{name}': its coded weight ({_CODES_PREFIX}{name}/) is damaged: {exc}") from None
    return own


def _check_tensors(saved: _Saved, own: dict[str, Tensor], model: nn.Module, plan: Plan) -> None:
    """Every saved tensor has a twin of the same shape and dtype in the float model, and every
    packed weight will be re-made from the float weight it was made from."""
    state = model.state_dict()
    packed = {f"{name}.weight" for name in saved.packed}
    extra = sorted(set(state) - set(own) - packed)
    if extra:
        saved_class = excerpt(saved.manifest["model_class"])
        raise LoadError(f"this model has tensors the saved {saved_class} does not: {first_few(extra)}")
    for key, value in own.items():
        if key not in state:
            raise LoadError(f"tensor '{excerpt(key)}' of the saved model is not in this model")
        if state[key].shape != value.shape or state[key].dtype != value.dtype:
            raise LoadError(
                f"tensor '{key}': saved as {excerpt(list(value.shape))} {value.dtype}, "
                f"this model has {list(state[key].shape)} {state[key].dtype}"
            )
        if value.is_floating_point() and not bool(value.isfinite().all()) and bool(state[key].isfinite().all()):
            raise LoadError(
                f"tensor '{key}' holds non-finite values, where this model's has none: {TENSORS} is damaged"
            )
    installed = _installed(plan)
    for name, digest in saved.packed.items():
        if name not in installed or f"{name}.weight" in own or weight_digest(state[f"{name}.weight"]) != digest:
            packer = installed[name].settings.base_quantizer if name in installed else "a base quantizer"
            raise LoadError(
                f"layer '{excerpt(name)}': its weight was packed by {packer} and is re-made on load "
                "from the float weight, but this model's float weight is not the one it was made from"
            )


def _layer_states(saved: _Saved, own: dict[str, Tensor], model: nn.Module, plan: Plan) -> dict[str, dict[str, Tensor]]:
    """Each quantized layer's `load_calibration_state` argument, checked."""
    states: dict[str, dict[str, Tensor]] = {name: {} for name in _installed(plan)}
    for key, value in saved.tensors.items():
        if key.startswith(_LAYER_PREFIX):
            name, _, part = key.removeprefix(_LAYER_PREFIX).partition("/")
            if name not in states or not part or part in PARAMETER_KEYS:
                raise LoadError(
                    f"tensor '{excerpt(key)}' of {TENSORS} belongs to no quantizer "
                    "of a quantized layer of the saved recipe"
                )
            states[name][part] = value
    modules = dict(model.named_modules())
    for name, state in states.items():
        try:
            check_calibration_state(
                plan.layers[name].settings,
                plan.layers[name].module_type,
                modules[name] if plan.layers[name].has_weight else AttentionOperand(),  # operands come with prepare
                state,
                f"{_LAYER_PREFIX}{name}/",
                plan.layers[name].activation_widths,
            )
        except ValueError as exc:
            raise LoadError(f"layer '{name}': {exc}") from None
        if name not in saved.packed and plan.layers[name].has_weight:
            # the weight as quantized: load_calibration_state would re-quantize without it
            state["weight"] = own[f"{name}.weight"]
    return states


def _quantized_layers(model: nn.Module) -> dict[str, QuantizedLayer]:
    return {name: module for name, module in model.named_modules() if isinstance(module, QuantizedLayer)}


def _own_state(model: nn.Module, layers: dict[str, QuantizedLayer]) -> dict[str, Tensor]:
    """The model's tensors without the quantizers' (saved per layer) and packed weights (re-made)."""
    skip = tuple(f"{name}.act_quantizers." for name in layers)
    packed = {f"{name}.weight" for name, layer in layers.items() if layer.packed}
    return {key: value for key, value in model.state_dict().items() if not key.startswith(skip) and key not in packed}


def _file_facts(content: bytes) -> dict[str, Any]:
    return {"bytes": len(content), "sha256": hashlib.sha256(content).hexdigest()}
