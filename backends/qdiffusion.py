"""`qdiffusion`: Q-Diffusion (Li et al., ICCV 2023) as a base quantizer.

- Calibration samples: the time-step-aware set, `calibration_steps` steps spread uniformly over
  the recorded trajectories (the first included), `samples_per_step` rows each.
- Weights: per-channel grid from the observer (min-max by default, as Q-Diffusion's CIFAR run),
  rounding learned by AdaRound inside BRECQ-style block reconstruction: each unit (ResNet block,
  attention block, or lone layer) in execution order, with the full-precision unit output as
  target and the unit input taken from the model quantized so far.
- Activations: static per-tensor step sizes initialised by the observer, then learned (LSQ
  style) per unit with weights and activations quantized, against the full-precision output
  with an L_p loss (p = 2.4). Under `modiff` the unit first runs the previous step exactly, so
  the learned step sizes are those of temporal differences.
- Shortcut split: convolutions fed by a concatenation get separate activation and weight
  quantizers for the two parts (on by default; `split: false` in a recipe rule turns it off).

Iteration counts default to CPU-sized values (`weight_iters` 300, `act_iters` 100) where the
paper uses 20000 and 5000, with learning rates raised to match (AdaRound 3e-2 instead of 1e-3,
so that the rounding variables still settle at 0 or 1); every other default is the paper's.
Step sizes are learned in log space, so a single learning rate serves raw-activation and (much
smaller) temporal-difference scales alike, and are kept only where they lower the unit's
calibration loss.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from modiff_quant.base_quantizer import ObservedActivationQuantizer, SplitActivationQuantizer
from modiff_quant.calibration import CalibrationRecord, Pick, uniform_steps
from modiff_quant.calibration.reconstruction import (
    DEFAULT_BLOCK_TYPES,
    Reconstruction,
    Unit,
    UnitSample,
    random_batches,
)
from modiff_quant.layers import QuantizedLayer, join_weight_parts
from modiff_quant.registry import register_base_quantizer
from modiff_quant.trajectory import Mode

from .adaround import AdaRound
from .static import StaticQuantizer


@register_base_quantizer("qdiffusion")
class QDiffusionQuantizer(StaticQuantizer):
    """Q-Diffusion: time-step-aware calibration, AdaRound block reconstruction, learned step sizes."""

    split_shortcuts = True
    reconstructs = True

    def __init__(
        self,
        observer: str = "minmax",
        observer_options: dict[str, Any] | None = None,
        calibration_steps: int = 20,
        samples_per_step: int = 256,
        weight_iters: int = 300,
        act_iters: int = 100,
        batch_size: int = 32,
        weight_lr: float = 3e-2,
        act_lr: float = 1e-2,
        round_weight: float = 0.01,
        beta: Sequence[float] = (20.0, 2.0),
        warmup: float = 0.2,
        p: float = 2.4,
        blocks: Sequence[str] | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__(observer, observer_options)
        if min(calibration_steps, samples_per_step, batch_size) < 1 or min(weight_iters, act_iters) < 0:
            raise ValueError("calibration_steps, samples_per_step and batch_size must be >= 1, iteration counts >= 0")
        if len(beta) != 2 or not 0 <= warmup < 1 or p <= 0:
            raise ValueError(f"expected beta [start, end], 0 <= warmup < 1 and p > 0, got {beta}, {warmup}, {p}")
        self.calibration_steps, self.samples_per_step = calibration_steps, samples_per_step
        self.weight_iters, self.act_iters, self.batch_size = weight_iters, act_iters, batch_size
        self.weight_lr, self.act_lr, self.round_weight = weight_lr, act_lr, round_weight
        self.beta, self.warmup, self.p, self.seed = (float(beta[0]), float(beta[1])), warmup, p, seed
        self.blocks = tuple(blocks) if blocks is not None else DEFAULT_BLOCK_TYPES
        self.log: list[dict[str, Any]] = []  # per unit and phase: reconstruction loss before/after

    def calibration_picks(self, record: CalibrationRecord) -> list[Pick]:
        return uniform_steps(record, self.calibration_steps, self.samples_per_step)

    def reconstruct(self, reconstruction: Reconstruction) -> None:
        units = reconstruction.units(self.blocks)
        with torch.enable_grad():
            if self.weight_iters:
                for unit in tqdm(units, desc="qdiffusion: AdaRound weights", leave=False):
                    self._round_weights(reconstruction, unit)
            if self.act_iters:
                for unit in tqdm(units, desc="qdiffusion: activation step sizes", leave=False):
                    self._learn_step_sizes(reconstruction, unit)

    def _round_weights(self, reconstruction: Reconstruction, unit: Unit) -> None:
        """AdaRound every quantized weight of the unit together (BRECQ block reconstruction)."""
        roundings = {
            layer: self._roundings(layer) for layer in unit.layers if not layer.plan.settings.weight_spec().is_float
        }
        if not roundings:
            return
        samples = reconstruction.capture(unit, inputs_from=Mode.WEIGHTS_ONLY)
        self._set_weights(roundings, hard=True)
        nearest = _loss(
            reconstruction, unit, samples, 2.0, quantized_activations=False
        )  # at the start, hard = round to nearest
        optimizer = torch.optim.Adam([r.v for parts in roundings.values() for r in parts], lr=self.weight_lr)
        start_decay = int(self.warmup * self.weight_iters)
        for step, (sample, rows) in enumerate(random_batches(samples, self.weight_iters, self.batch_size, self.seed)):
            self._set_weights(roundings, hard=False)
            output = reconstruction.forward(unit, sample, rows, quantized_activations=False)
            loss = (output - sample.target[rows]).pow(2).sum(1).mean()
            if step >= start_decay:
                beta = self.beta[1] + (self.beta[0] - self.beta[1]) * (
                    1 - (step - start_decay) / max(self.weight_iters - start_decay, 1)
                )
                loss = loss + self.round_weight * sum(
                    r.regularizer(beta) for parts in roundings.values() for r in parts
                )
            if (
                not loss.requires_grad
            ):  # the unit's output ignores its weights (e.g. a 0-bit layer reuses its cached output)
                break
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        self._set_weights(roundings, hard=True)
        undecided = max(r.undecided() for parts in roundings.values() for r in parts)
        self.log.append(
            {
                "unit": unit.name,
                "phase": "weights",
                "loss_nearest": nearest,
                "loss": _loss(reconstruction, unit, samples, 2.0, quantized_activations=False),
                "undecided": undecided,
            }
        )

    @staticmethod
    def _set_weights(roundings: dict[QuantizedLayer, list[AdaRound]], *, hard: bool) -> None:
        for layer, parts in roundings.items():
            layer.staged_weight = join_weight_parts([r.hard_weight() if hard else r.soft_weight() for r in parts])

    def _roundings(self, layer: QuantizedLayer) -> list[AdaRound]:
        spec = layer.plan.settings.weight_spec()
        return [AdaRound(part, *self.weight_qparams(part, spec), spec) for part in layer.weight_parts()]

    def _learn_step_sizes(self, reconstruction: Reconstruction, unit: Unit) -> None:
        """Learn the unit's static activation step sizes against its full-precision output."""
        quantizers = [q for layer in unit.layers for q in _static_quantizers(layer)]
        if not quantizers:
            return
        samples = reconstruction.capture(
            unit, inputs_from=Mode.REFERENCE, previous=any(layer.scheme.needs_previous_step for layer in unit.layers)
        )
        if not samples:
            return
        before = _loss(reconstruction, unit, samples, self.p, quantized_activations=True)
        initial = [q.scale.detach() for q in quantizers]
        logs = [torch.zeros_like(scale, requires_grad=True) for scale in initial]
        optimizer = torch.optim.Adam(logs, lr=self.act_lr)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=self.act_iters, eta_min=0.0)
        try:
            for sample, rows in random_batches(samples, self.act_iters, self.batch_size, self.seed):
                for quantizer, scale, log in zip(quantizers, initial, logs):
                    quantizer.scale = scale * log.exp()
                output = reconstruction.forward(unit, sample, rows, quantized_activations=True)
                loss = (output - sample.target[rows]).abs().pow(self.p).sum(1).mean()
                if (
                    not loss.requires_grad
                ):  # the output ignores the step sizes (e.g. a 0-bit layer reuses its cached output)
                    break
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                schedule.step()
        finally:
            reconstruction.tracker.reset()
            for quantizer, scale, log in zip(quantizers, initial, logs):
                quantizer.scale = (scale * log.exp()).detach()
        after = _loss(reconstruction, unit, samples, self.p, quantized_activations=True)
        if after > before:  # learning did not help on the calibration data: keep the observer's step sizes
            for quantizer, scale in zip(quantizers, initial):
                quantizer.scale = scale
        self.log.append(
            {
                "unit": unit.name,
                "phase": "activations",
                "loss_initial": before,
                "loss": min(before, after),
                "learned": after <= before,
            }
        )


@torch.no_grad()
def _loss(
    reconstruction: Reconstruction, unit: Unit, samples: Sequence[UnitSample], p: float, *, quantized_activations: bool
) -> float:
    """Mean L_p reconstruction error of the unit over all calibration samples."""
    total = 0.0
    for sample in samples:
        rows = torch.arange(sample.inputs.rows)
        total += float(
            (reconstruction.forward(unit, sample, rows, quantized_activations=quantized_activations) - sample.target)
            .abs()
            .pow(p)
            .sum(1)
            .mean()
        )
    reconstruction.tracker.reset()
    return total / len(samples)


def _static_quantizers(layer: QuantizedLayer) -> list[ObservedActivationQuantizer]:
    """The layer's frozen static activation quantizers, split parts included."""
    found: list[ObservedActivationQuantizer] = []
    for quantizer in layer.all_quantizers():
        parts = [quantizer.first, quantizer.second] if isinstance(quantizer, SplitActivationQuantizer) else [quantizer]
        found += [q for q in parts if isinstance(q, ObservedActivationQuantizer) and q.scale is not None]
    return found
