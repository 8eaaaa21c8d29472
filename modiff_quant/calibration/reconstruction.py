"""What a base quantizer's `reconstruct()` works with: its layers grouped into reconstruction
units (BRECQ-style blocks) in execution order, each unit's captured inputs and full-precision
outputs on the calibration samples, and a way to run a unit quantized.

The model is never copied: the float weight stays in place until `convert()` ends, so a
`REFERENCE` pass is the full-precision model, a `WEIGHTS_ONLY` pass the model with the weights
quantized so far, and a `CONVERTED` pass (after `PRIMING` on the previous step, for MoDiff) the
fully quantized model.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .. import distributed
from ..tensors import device_of
from ..trajectory import Mode, Tracker
from .record import CalibrationRecord, Inputs, RecordedCall
from .selection import Pick

DEFAULT_BLOCK_TYPES = (
    "ResnetBlock2D",
    "Attention",
    "BasicTransformerBlock",
    "ResnetBlock",
    "ResBlock",
    "AttnBlock",
    "AttentionBlock",
)
"""Class names of reconstruction units in diffusers and the DDPM/DDIM/guided-diffusion codebases."""


@dataclass(frozen=True)
class Unit:
    """A block (or a lone layer) reconstructed as one: its layers are optimised together."""

    name: str
    module: nn.Module
    layers: tuple[nn.Module, ...]


@dataclass(frozen=True)
class UnitSample:
    """A unit's inputs on one calibration pick, its full-precision output, and (MoDiff) its
    inputs one step earlier."""

    call: RecordedCall
    inputs: Inputs
    target: Tensor
    previous: Inputs | None = None
    previous_call: RecordedCall | None = None


class _Stop(Exception):
    """Ends a capture pass once the unit has been seen."""


class Reconstruction:
    """One base quantizer's layers and calibration samples, with the passes reconstruction needs.

    The layers are plain modules of `model` (the quantized layers of this base quantizer): the
    machinery needs only where they sit and how the model reaches them."""

    def __init__(
        self,
        model: nn.Module,
        tracker: Tracker,
        record: CalibrationRecord,
        layers: Sequence[nn.Module],
        picks: Sequence[Pick],
    ) -> None:
        self.model, self.tracker, self.record = model, tracker, record
        self.layers = tuple(layers)
        self.picks = tuple(picks)

    def units(self, block_types: Sequence[str] = DEFAULT_BLOCK_TYPES) -> list[Unit]:
        """Outermost modules of `block_types` holding some of the layers, and every other layer on
        its own, in the order a forward pass reaches them."""
        mine = set(self.layers)
        units: list[Unit] = []
        claimed: set[nn.Module] = set()
        for name, module in self.model.named_modules():
            if type(module).__name__ in block_types and not any(m in claimed for m in module.modules()):
                inside = tuple(m for m in module.modules() if m in mine)
                if inside:
                    units.append(Unit(name, module, inside))
                    claimed.update(inside)
        names = {module: name for name, module in self.model.named_modules()}
        units += [Unit(names[layer], layer, (layer,)) for layer in self.layers if layer not in claimed]
        return sorted(units, key=self._execution_order())

    def _execution_order(self) -> Any:
        order: dict[nn.Module, int] = {}

        def seen(module: nn.Module, _: Any) -> None:
            order.setdefault(module, len(order))

        handles = [m.register_forward_pre_hook(seen) for m in self.model.modules()]
        try:
            pick = self.picks[0]
            self._run_model(pick.call, pick.rows[:1], Mode.REFERENCE)
        finally:
            for handle in handles:
                handle.remove()
        return lambda unit: order.get(unit.module, len(order))

    def capture(self, unit: Unit, *, inputs_from: Mode, previous: bool = False) -> list[UnitSample]:
        """The unit's inputs on every pick (from a pass in mode `inputs_from`), the full-precision
        output as target, and with `previous` its inputs one step earlier (first steps excluded).
        In a torch.distributed job each process captures its share of the picks and every process
        gets them all: the picks are independent, so the samples are one process's exactly."""
        picks = [(pick, self.record.previous(pick.call) if previous else None) for pick in self.picks]
        picks = [(pick, prior) for pick, prior in picks if prior is not None or not previous]
        captured = []
        for index in distributed.share(len(picks)):
            pick, prior = picks[index]
            target_inputs, target = self._capture(unit, pick.call, pick.rows, Mode.REFERENCE, output=True)
            inputs = (
                target_inputs
                if inputs_from is Mode.REFERENCE
                else self._capture(unit, pick.call, pick.rows, inputs_from, output=False)[0]
            )
            earlier = (
                self._capture(unit, prior, pick.rows, inputs_from, output=False)[0] if prior is not None else None
            )
            captured.append((inputs, target, earlier))
        if distributed.world_size() > 1:
            gathered = distributed.gathered([_moved(part, torch.device("cpu")) for part in captured])
            captured = [_moved(part, device_of(self.model)) for part in gathered]
        return [
            UnitSample(pick.call, inputs, target, earlier, prior)
            for (pick, prior), (inputs, target, earlier) in zip(picks, captured, strict=True)
        ]

    def loss(self, unit: Unit, sample: UnitSample, rows: Tensor, p: float, *, quantized_activations: bool) -> Tensor:
        """The batch's mean L_p output error, or in a torch.distributed job this process's part of
        it (its share of the rows, weighted by their fraction), so that gradients summed over the
        processes (`distributed.sum_gradients`) are the whole batch's."""
        mine = distributed.share(len(rows))
        part, weight = (rows[mine.start : mine.stop], len(mine) / len(rows)) if mine else (rows[:1], 0.0)
        loss = lp_error(
            self.forward(unit, sample, part, quantized_activations=quantized_activations), sample.target[part], p
        )
        return loss if weight == 1.0 else loss * weight

    def _capture(
        self, unit: Unit, call: RecordedCall, rows: Tensor, mode: Mode, *, output: bool
    ) -> tuple[Inputs, Tensor | None]:
        seen: dict[str, Any] = {}

        def before(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            seen["inputs"] = Inputs.keep(args, kwargs, len(rows))
            if not output:
                raise _Stop

        def after(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], result: Any) -> None:
            seen["output"] = _tensor(result, unit.name).detach()
            raise _Stop

        handles = [
            unit.module.register_forward_pre_hook(before, with_kwargs=True),
            unit.module.register_forward_hook(after, with_kwargs=True),
        ]
        try:
            self._run_model(call, rows, mode)
        except _Stop:
            pass
        finally:
            for handle in handles:
                handle.remove()
        if "inputs" not in seen:
            raise RuntimeError(
                f"{unit.name}: not reached by a forward pass of the model, so it cannot be reconstructed"
            )
        return seen["inputs"], seen.get("output")

    def _run_model(self, call: RecordedCall, rows: Tensor, mode: Mode) -> None:
        inputs = call.inputs.select(rows)
        with torch.no_grad(), self.mode(mode), self.tracker.pinned(call.branch, call.step, call.timestep):
            self.model(*inputs.args, **inputs.kwargs)

    def forward(self, unit: Unit, sample: UnitSample, rows: Tensor, *, quantized_activations: bool) -> Tensor:
        """The unit's output on some rows of a sample: weights quantized (as staged), activations
        float or quantized; quantized MoDiff layers first run the previous step exactly (priming)."""
        inputs = sample.inputs.select(rows)
        if not quantized_activations:
            with self.mode(Mode.WEIGHTS_ONLY):
                return _tensor(unit.module(*inputs.args, **inputs.kwargs), unit.name)
        self.tracker.reset()
        if sample.previous is not None and sample.previous_call is not None:
            earlier, call = sample.previous.select(rows), sample.previous_call
            with torch.no_grad(), self.mode(Mode.PRIMING), self.tracker.pinned(call.branch, call.step, call.timestep):
                unit.module(*earlier.args, **earlier.kwargs)
        call = sample.call
        with self.mode(Mode.CONVERTED), self.tracker.pinned(call.branch, call.step, call.timestep):
            return _tensor(unit.module(*inputs.args, **inputs.kwargs), unit.name)

    @contextmanager
    def mode(self, mode: Mode) -> Iterator[None]:
        previous, self.tracker.mode = self.tracker.mode, mode
        try:
            yield
        finally:
            self.tracker.mode = previous


def lp_error(output: Tensor, target: Tensor, p: float) -> Tensor:
    """The mean over rows of each row's summed |output − target|^p: reconstruction's loss."""
    return (output - target).abs().pow(p).sum(1).mean()


def random_batches(
    samples: Sequence[UnitSample], count: int, batch_size: int, seed: int
) -> Iterator[tuple[UnitSample, Tensor]]:
    """`count` training batches: a random sample (one recorded step), then random rows of it."""
    generator = torch.Generator().manual_seed(seed)
    for _ in range(count):
        sample = samples[int(torch.randint(len(samples), (1,), generator=generator))]
        yield sample, torch.randperm(sample.inputs.rows, generator=generator)[:batch_size]


def _moved(
    captured: tuple[Inputs, Tensor | None, Inputs | None], device: torch.device
) -> tuple[Inputs, Tensor | None, Inputs | None]:
    """A captured sample's tensors on `device`."""
    inputs, target, earlier = captured
    return (
        inputs.moved(device),
        None if target is None else target.to(device),
        None if earlier is None else earlier.moved(device),
    )


def _tensor(value: Any, owner: str) -> Tensor:
    if isinstance(value, Tensor):
        return value
    if isinstance(value, (tuple, list)) and value and isinstance(value[0], Tensor):
        return value[0]
    raise TypeError(f"{owner}: reconstruction needs a module that returns a tensor, got {type(value).__name__}")
