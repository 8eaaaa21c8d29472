"""The lifecycle of a quantized model: prepare -> calibrate -> convert -> sampling.

`prepare` re-classes the Linear/Conv layers a recipe selects and installs block caches;
`calibrate` runs the user's own sampling loop with observers on; `convert` freezes quantization
parameters and quantizes weights; `sampling` scopes one or more trajectories.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NoReturn

from torch import nn

from .attention_products import attention_operands, install_operands
from .blocks import BlockCache, install_block_cache
from .calibration.record import CalibrationRecord, gathered_record
from .conversion import convert_layers
from .deferred import set_binder, take_marks
from .layers import Execution, QuantizedLayer, quantize_layer
from .recipe import Plan, Recipe, load_recipe
from .tensors import device_of
from .trajectory import Mode, Tracker

_TRACKER = "_modiff_tracker"
_PLAN = "_modiff_plan"


def prepare(model: nn.Module, recipe: Recipe | str | Path) -> nn.Module:
    """Apply a recipe (object, file or shipped name) to `model` in place and return it.

    The recipe is resolved and validated against the model before anything changes.
    """
    ensure_float(model)
    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe)
    plan = recipe.resolve(model)
    return install(model, plan)


def ensure_float(model: nn.Module) -> None:
    """Raise unless `model` is untouched by modiff_quant (a recipe applies to float models only)."""
    prepared = [
        name or "the model"
        for name, module in model.named_modules()
        if is_prepared(module) or isinstance(module, QuantizedLayer)
    ]
    if prepared:
        raise RuntimeError(
            f"already prepared by modiff_quant: {', '.join(prepared[:3])}; prepare a fresh copy of the float model"
        )


def install(model: nn.Module, plan: Plan) -> nn.Module:
    """The in-place part of `prepare`, for a plan already resolved against `model`."""
    tracker = Tracker()
    owners = attention_operands(model)
    for attention in {
        owners[name] for name, layer in plan.layers.items() if name in owners and not layer.leaves_float
    }:
        install_operands(model.get_submodule(attention))
    modules = dict(model.named_modules())
    for name, layer in plan.layers.items():
        if not layer.leaves_float:
            quantize_layer(modules[name], layer, tracker)
    for name, block in plan.blocks.items():
        install_block_cache(modules[name], block, tracker)
    setattr(model, _TRACKER, tracker)
    setattr(model, _PLAN, plan)
    if hasattr(model, "save_pretrained"):  # a diffusers model: its own save would drop the quantization
        model.save_pretrained = _refuse_save_pretrained
    model.register_forward_pre_hook(tracker.on_model_call, with_kwargs=True)
    model.register_forward_hook(tracker.on_model_return, with_kwargs=True)
    model.register_load_state_dict_post_hook(_converted_by_loading)
    return model


def _converted_by_loading(model: nn.Module, incompatible: Any) -> None:
    """`prepare(model, recipe)` then `model.load_state_dict(converted.state_dict())`, as torchao
    users load: once the calibrated layers have their frozen scales from the state_dict, the
    model is the converted one (its weights are the quantized ones loaded). Layers left without
    are reported as missing keys, so a strict load fails."""
    if _tracker(model).mode is not Mode.PREPARED:
        return
    layers = [layer for layer in model.modules() if isinstance(layer, QuantizedLayer) and layer.calibrates]
    if not any(layer.frozen for layer in layers):
        return  # e.g. float weights loaded before calibrating
    missing = [layer.plan.name for layer in layers if not layer.frozen]
    if missing:
        incompatible.missing_keys.extend(f"{name}.act_quantizers (frozen scales)" for name in missing)
        return
    mark_converted(model)


def _refuse_save_pretrained(*args: Any, **kwargs: Any) -> NoReturn:
    raise RuntimeError(
        "save_pretrained() would write this MoDiff model's quantized layers as plain float layers, which reload "
        "without MoDiff; save it with modiff_quant.save_quantized(model, folder) and load it with "
        "modiff_quant.load_quantized(folder) or modiff_quant.attach(pipe, folder)"
    )


def mark_converted(model: nn.Module) -> None:
    """The end of `convert()`, also for a prepared model whose layers were restored from a saved
    conversion (`load_quantized`): quantized from now on, calibration record dropped."""
    tracker = _tracker(model)
    tracker.mode = Mode.CONVERTED
    tracker.record = None
    tracker.reset()


def is_prepared(model: nn.Module) -> bool:
    """True for a model that `prepare` has been applied to."""
    return hasattr(model, _TRACKER)


def is_converted(model: nn.Module) -> bool:
    """True for a prepared model that `convert` (or `load_quantized`) has quantized."""
    return is_prepared(model) and _tracker(model).mode is Mode.CONVERTED


def plan_of(model: nn.Module) -> Plan:
    """The resolved recipe plan a prepared model was built from."""
    _tracker(model)
    return getattr(model, _PLAN)


@contextmanager
def calibrate(model: nn.Module) -> Iterator[nn.Module]:
    """Run your sampling loop inside: the model computes in full precision and every call is
    recorded. `convert()` then replays the samples each base quantizer chooses to its observers
    (temporal differences under `modiff`) and runs its reconstruction. Calls are kept until
    `convert()`, in memory; state is reset on entry and exit. In a torch.distributed job every
    process must calibrate: on leaving, each process gets every process's calls (in rank order),
    so each one converts the same model from the whole record."""
    tracker = _tracker(model)
    if tracker.mode is not Mode.PREPARED:
        raise RuntimeError(
            f"calibrate() needs a prepared model that is not yet converted (model is {tracker.mode.value})"
        )
    tracker.reset()
    record = tracker.record = CalibrationRecord()
    tracker.mode = Mode.CALIBRATING
    try:
        yield model
    finally:
        tracker.mode = Mode.PREPARED
        tracker.reset()
    tracker.record = gathered_record(record, device_of(model))


def convert(model: nn.Module, cache_dir: str | Path | None = None) -> nn.Module:
    """Calibrate on what `calibrate()` recorded, freeze the quantization parameters and quantize
    the weights (once). With `cache_dir`, the outcome is saved there and reused by any later
    convert of the same float model, recipe and calibration data."""
    tracker = _tracker(model)
    if tracker.mode is not Mode.PREPARED:
        raise RuntimeError(f"convert() needs a prepared model (model is {tracker.mode.value})")
    convert_layers(
        model, tracker, [layer for layer in model.modules() if isinstance(layer, QuantizedLayer)], cache_dir
    )
    mark_converted(model)
    return model


@contextmanager
def sampling(model: nn.Module) -> Iterator[nn.Module]:
    """Scope of sampling runs in this thread: its state of every layer and block is reset on
    entry and on exit, also when the block raises (other threads keep theirs)."""
    tracker = _tracker(model)
    tracker.restart()
    try:
        yield model
    finally:
        tracker.restart()


def set_execution(model: nn.Module, mode: Execution) -> nn.Module:
    """Run a converted model's quantized layers as fake quantization (`fake`, the default: float
    products of dequantized values) or on int8 codes with int32 accumulation (`integer`: oneDNN
    kernels on x86 CPUs, the same outputs to float rounding). Layers with float activations stay
    float. Raises ValueError listing every layer that cannot run on integers, with every layer
    back on fake quantization."""
    tracker = _tracker(model)
    if tracker.mode is not Mode.CONVERTED:
        raise RuntimeError(f"set_execution() needs a converted model (model is {tracker.mode.value})")
    if mode not in ("fake", "integer"):
        raise ValueError(f"execution must be 'fake' or 'integer', got {mode!r}")
    layers = [layer for layer in model.modules() if isinstance(layer, QuantizedLayer)]
    failures = []
    for layer in layers:
        try:
            layer.set_execution(mode)
        except ValueError as exc:
            failures.append(str(exc))
    if failures:
        for layer in layers:
            layer.set_execution("fake")
        raise ValueError(f"{len(failures)} layers cannot run on integer kernels:\n  " + "\n  ".join(failures))
    return model


def state_bytes(model: nn.Module) -> int:
    """Memory held right now by the trajectory state (â, ô and cached block outputs)."""
    return _tracker(model).cache_bytes()


def block_skips(model: nn.Module) -> tuple[int, int]:
    """(skipped, total) calls of the cached blocks since `prepare`."""
    counts = [member.counts for member in _tracker(model).members if isinstance(member, BlockCache)]
    return sum(skipped for skipped, _ in counts), sum(total for _, total in counts)


def reset(model: nn.Module) -> None:
    """Forget all trajectory state, of every thread; the next call starts a new trajectory."""
    _tracker(model).reset()


def restart(model: nn.Module) -> None:
    """Forget the calling thread's trajectory state: a sampling run of this thread begins or ends."""
    _tracker(model).restart()


@contextmanager
def branch(model: nn.Module, key: Hashable) -> Iterator[nn.Module]:
    """Calls inside belong to CFG branch `key` (e.g. "cond"/"uncond"), overriding the automatic
    detection, for pipelines whose branches do not repeat the step's timestep."""
    tracker = _tracker(model)
    previous, tracker.branch = tracker.branch, key
    try:
        yield model
    finally:
        tracker.branch = previous


def set_branch(model: nn.Module, key: Hashable | None) -> None:
    """Calls from now on belong to CFG branch `key` (None: detect branches automatically); for
    integrations that are told the branch, such as diffusers' `cache_context`."""
    _tracker(model).branch = key


def needs_calibration(model: nn.Module) -> bool:
    """True when `convert` needs the sampling loop run inside `calibrate` first."""
    return any(layer.needs_calibration for layer in model.modules() if isinstance(layer, QuantizedLayer))


def bind_deferred(model: nn.Module) -> bool:
    """Prepare `model` from layers marked by torchao's `quantize_(..., MoDiffConfig(...))`, and
    convert it at once when none of them needs calibration data."""
    recipe = take_marks(model)
    if recipe is None:
        return False
    prepare(model, recipe)
    if not needs_calibration(model):
        convert(model)
    return True


def bind_on_call(model: nn.Module, args: tuple[Any, ...]) -> bool:
    """Bind `model` during its call and give the tracker that call (its hook was not yet
    installed when the call began; keyword arguments are not visible to the global hook)."""
    if not bind_deferred(model):
        return False
    _tracker(model).on_model_call(model, args, {})
    return True


def _tracker(model: nn.Module) -> Tracker:
    bind_deferred(model)
    tracker = getattr(model, _TRACKER, None)
    if tracker is None:
        raise RuntimeError("model is not prepared: call modiff_quant.prepare(model, recipe) first")
    return tracker


set_binder(bind_on_call)  # layers marked by torchao's quantize_ bind through this on their first call
