"""`adaround`: dynamic activations with AdaRound weights, for low-bit weights (W4) without
static activation scales.

Round-to-nearest W4 weights limit a dynamic W4A4 recipe more than its activations do (digits16,
symmetric weights: FD 73 at W4A4, 74 at W4A32), and a tighter clipping range (`mse`) makes it worse by clipping the
outlier weights that matter. Rounding learned against each block's output (Q-Diffusion's weight
phase: BRECQ blocks in execution order, inputs from the model quantized so far, float
activations) fixes what the grid cannot. Activations stay `dynamic` (per tensor or per sample,
plain or MoDiff differences), so the learned rounding serves every activation recipe and no
activation scale is calibrated; calibration data is needed for the weights alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from modiff_quant.calibration.reconstruction import DEFAULT_BLOCK_TYPES, Reconstruction
from modiff_quant.registry import register_base_quantizer

from .adaround import RoundingSchedule, learn_roundings
from .weight_reconstruction import DynamicWeightReconstruction


@register_base_quantizer("adaround")
class DynamicAdaRoundQuantizer(DynamicWeightReconstruction):
    """Dynamic min-max activations; weights on the `weight_observer` grid with AdaRound rounding.

    Calibration samples are Q-Diffusion's time-step-aware set (`calibration_steps` steps,
    `samples_per_step` rows each); `iters`, `batch_size`, `lr`, `round_weight`, `beta`, `warmup`
    and `seed` set AdaRound as in `qdiffusion` (its `weight_*` options); `blocks` names the
    reconstruction units. `log`: per unit, the reconstruction loss at nearest and at learned
    rounding.
    """

    def __init__(
        self,
        weight_observer: str = "minmax",
        weight_observer_options: dict[str, Any] | None = None,
        calibration_steps: int = 20,
        samples_per_step: int = 256,
        iters: int = 300,
        batch_size: int = 32,
        lr: float = 3e-2,
        round_weight: float = 0.01,
        beta: Sequence[float] = (20.0, 2.0),
        warmup: float = 0.2,
        blocks: Sequence[str] | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__(weight_observer, weight_observer_options, calibration_steps, samples_per_step)
        self.rounding = RoundingSchedule(iters, batch_size, lr, round_weight, tuple(map(float, beta)), warmup, seed)
        self.blocks = tuple(blocks) if blocks is not None else DEFAULT_BLOCK_TYPES

    def reconstruct(self, reconstruction: Reconstruction) -> None:
        units = reconstruction.units(self.blocks)
        self.log += learn_roundings(reconstruction, units, self.weight_qparams, self.rounding, "adaround: weights")
