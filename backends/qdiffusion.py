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

from modiff_quant import distributed
from modiff_quant.base_quantizer import ObservedActivationQuantizer, SplitActivationQuantizer
from modiff_quant.calibration import CalibrationRecord, Pick, uniform_steps
from modiff_quant.calibration.reconstruction import DEFAULT_BLOCK_TYPES, Reconstruction, Unit, random_batches
from modiff_quant.layers import QuantizedLayer
from modiff_quant.registry import register_base_quantizer
from modiff_quant.trajectory import Mode

from .adaround import RoundingSchedule, learn_roundings, reconstruction_loss
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
        if min(calibration_steps, samples_per_step) < 1 or act_iters < 0 or p <= 0:
            raise ValueError("calibration_steps and samples_per_step must be >= 1, act_iters >= 0 and p > 0")
        self.rounding = RoundingSchedule(
            weight_iters, batch_size, weight_lr, round_weight, tuple(map(float, beta)), warmup, seed
        )
        self.calibration_steps, self.samples_per_step = calibration_steps, samples_per_step
        self.act_iters, self.batch_size, self.act_lr, self.p, self.seed = act_iters, batch_size, act_lr, p, seed
        self.blocks = tuple(blocks) if blocks is not None else DEFAULT_BLOCK_TYPES
        self.log: list[dict[str, Any]] = []  # per unit and phase: reconstruction loss before/after

    def calibration_picks(self, record: CalibrationRecord) -> list[Pick]:
        return uniform_steps(record, self.calibration_steps, self.samples_per_step)

    def reconstruct(self, reconstruction: Reconstruction) -> None:
        units = reconstruction.units(self.blocks)
        if self.rounding.iters:
            self.log += learn_roundings(
                reconstruction, units, self.weight_qparams, self.rounding, "qdiffusion: AdaRound weights"
            )
        with torch.enable_grad():
            if self.act_iters:
                for unit in tqdm(units, desc="qdiffusion: activation step sizes", leave=False):
                    self._learn_step_sizes(reconstruction, unit)

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
        before = reconstruction_loss(reconstruction, unit, samples, self.p, quantized_activations=True)
        initial = [q.scale.detach() for q in quantizers]
        logs = [torch.zeros_like(scale, requires_grad=True) for scale in initial]
        optimizer = torch.optim.Adam(logs, lr=self.act_lr)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=self.act_iters, eta_min=0.0)
        try:
            for sample, rows in random_batches(samples, self.act_iters, self.batch_size, self.seed):
                for quantizer, scale, log in zip(quantizers, initial, logs):
                    quantizer.scale = scale * log.exp()
                loss = reconstruction.loss(unit, sample, rows, self.p, quantized_activations=True)
                if (
                    not loss.requires_grad
                ):  # the output ignores the step sizes (e.g. a 0-bit layer reuses its cached output)
                    break
                optimizer.zero_grad()
                loss.backward()
                distributed.sum_gradients(logs)
                optimizer.step()
                schedule.step()
            distributed.same_as_main(logs)
        finally:
            reconstruction.tracker.reset()
            for quantizer, scale, log in zip(quantizers, initial, logs):
                quantizer.scale = (scale * log.exp()).detach()
        after = reconstruction_loss(reconstruction, unit, samples, self.p, quantized_activations=True)
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


def _static_quantizers(layer: QuantizedLayer) -> list[ObservedActivationQuantizer]:
    """The layer's frozen static activation quantizers, split parts included."""
    found: list[ObservedActivationQuantizer] = []
    for quantizer in layer.all_quantizers():
        parts = [quantizer.first, quantizer.second] if isinstance(quantizer, SplitActivationQuantizer) else [quantizer]
        found += [q for q in parts if isinstance(q, ObservedActivationQuantizer) and q.scale is not None]
    return found
