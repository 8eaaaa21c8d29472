"""What `convert()` does with the calibration record: detect shortcut splits, replay each base
quantizer's calibration samples to its observers, freeze, reconstruct, correct biases, quantize
the weights."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from .. import distributed
from ..blocks import BlockCache
from ..calibration.concat import detect_concat_inputs
from ..calibration.reconstruction import Reconstruction
from ..calibration.record import CalibrationRecord, RecordedCall
from ..calibration.selection import Pick
from ..layers import QuantizedLayer
from ..observers import observation_stream
from ..quoting import first_few
from ..schemes import RAW
from ..tensors import device_of
from ..trajectory import Mode, Tracker
from .bias_correction import correct_biases
from .cache import CalibrationCache


def convert_layers(
    model: nn.Module, tracker: Tracker, layers: Sequence[QuantizedLayer], cache_dir: str | Path | None = None
) -> None:
    """Calibrate (when the record and the layers call for it), freeze and quantize every layer."""
    record = tracker.record
    assert record is None or isinstance(record, CalibrationRecord), "calibrate() records into a CalibrationRecord"
    waiting = [layer.plan.name for layer in layers if layer.needs_calibration]
    if waiting and not record:
        several = len(waiting) > 1
        raise RuntimeError(
            f"{len(waiting)} layer{'s' if several else ''} ({first_few(waiting)}) need{'' if several else 's'} "
            "calibration data (static scales, a reconstruction, a bias correction or a shortcut split to detect): "
            "run the sampling loop inside modiff_quant.calibrate(model) before convert(model)"
        )
    blocks = [(m.plan.name, m.plan.schedule) for m in tracker.members if isinstance(m, BlockCache)]
    cache = CalibrationCache(cache_dir, model, layers, blocks, record) if cache_dir is not None and record else None
    if cache is not None and cache.load():
        return
    groups: dict[str, list[QuantizedLayer]] = {}
    if record and waiting:
        _detect_splits(model, tracker, record, [layer for layer in layers if layer.split_enabled])
        groups = _groups([layer for layer in layers if layer.calibrates])
    picks = {key: group[0].base_quantizer.calibration_picks(record) for key, group in groups.items()}
    for key, group in groups.items():
        _observe(model, tracker, record, group, picks[key])
    for layer in layers:
        layer.freeze()
        layer.stage_weight()
    for key, group in groups.items():
        group[0].base_quantizer.reconstruct(Reconstruction(model, tracker, record, group, picks[key]))
    correcting = [layer for layer in layers if layer.corrects_bias]
    if correcting:
        correct_biases(model, tracker, record, correcting)
    for layer in layers:
        layer.commit_weight()
    if cache is not None and distributed.is_main():  # every process holds the same model: one writes
        cache.save()


def _groups(layers: Sequence[QuantizedLayer]) -> dict[str, list[QuantizedLayer]]:
    """Layers sharing a base quantizer and its options calibrate together, on that method's picks."""
    groups: dict[str, list[QuantizedLayer]] = {}
    for layer in layers:
        settings = layer.plan.settings
        groups.setdefault(f"{settings.base_quantizer}{sorted(settings.base_quantizer_options.items())}", []).append(
            layer
        )
    return groups


def _detect_splits(
    model: nn.Module, tracker: Tracker, record: CalibrationRecord, layers: Sequence[QuantizedLayer]
) -> None:
    if not layers:
        return
    call = record.calls[0]
    inputs = call.inputs.select(torch.arange(1))
    previous, tracker.mode = tracker.mode, Mode.REFERENCE
    try:
        with tracker.pinned(call.branch, call.step, call.timestep):
            found = detect_concat_inputs(model, inputs.args, inputs.kwargs)
    finally:
        tracker.mode = previous
    for layer in layers:
        layer.set_split(found.get(layer.plan.name))


def _observe(
    model: nn.Module,
    tracker: Tracker,
    record: CalibrationRecord,
    layers: Sequence[QuantizedLayer],
    picks: Sequence[Pick],
) -> None:
    """Replay the picks with these layers' observers on. A layer under a scheme that quantizes
    temporal differences sees each pick after the step before it; a quantized first step is
    calibrated on the first steps of all recorded trajectories."""
    previous_step = any(layer.scheme.needs_previous_step for layer in layers)
    first_steps = previous_step and any(
        RAW in layer.act_quantizers and layer.scheme.needs_previous_step for layer in layers
    )
    chains: list[list[tuple[RecordedCall, bool]]] = []
    for pick in picks:
        prior = record.previous(pick.call) if previous_step else None
        chains.append([(prior, False), (pick.call, True)] if prior is not None else [(pick.call, True)])
    name = layers[0].plan.settings.base_quantizer
    if previous_step and not any(len(chain) == 2 for chain in chains):
        steps = sorted({pick.call.step for pick in picks})
        raise ValueError(
            f"{name}: MoDiff calibrates on temporal differences a_t - a_t+1, which need a picked step after a "
            f"trajectory's first, but the calibration picks hold only steps {steps}: record trajectories of 2 or more "
            "steps inside calibrate() (and keep the base quantizer's calibration_steps at 2 or more)"
        )
    rows = [pick.rows for pick in picks]
    if first_steps:
        picked = {id(pick.call) for pick in picks}
        for call in (c for c in record.calls if c.step == 0 and id(c) not in picked):
            chains.append([(call, True)])
            rows.append(torch.arange(call.rows))
    quantizers = [quantizer for layer in layers for quantizer in layer.all_quantizers()]
    # in a torch.distributed job each process observes its share when every quantizer can combine
    sharded = distributed.world_size() > 1 and all(quantizer.combines for quantizer in quantizers)
    streams = distributed.share(len(chains)) if sharded else range(len(chains))
    observing = frozenset(layers)
    previous_mode, tracker.mode = tracker.mode, Mode.OBSERVING
    try:
        with torch.no_grad():
            for stream in tqdm(streams, desc=f"calibrating {name}", leave=False):
                tracker.reset()
                for call, observe in chains[stream]:
                    tracker.observing = observing if observe else frozenset()
                    inputs = call.inputs.select(rows[stream])
                    with tracker.pinned(call.branch, call.step, call.timestep), observation_stream(stream):
                        model(*inputs.args, **inputs.kwargs)
    finally:
        tracker.mode, tracker.observing = previous_mode, frozenset()
        tracker.reset()
    if sharded:
        parts = distributed.gathered([[quantizer.statistics() for quantizer in quantizers]])
        for index, quantizer in enumerate(quantizers):
            quantizer.combine([part[index] for part in parts], device_of(model))
