"""Dynamic activations with weights learned on calibration data: what `adaround` and `gptq` share.

Their activations stay `dynamic` (min-max of every call, raw or MoDiff differences), so one
calibration serves any activation width or schedule and no activation scale is calibrated; the
calibration data (Q-Diffusion's time-step-aware set) is for the quantized weights alone.
"""

from __future__ import annotations

from typing import Any

from modiff_quant.calibration import CalibrationRecord, Pick, uniform_steps

from .dynamic import DynamicQuantizer


class DynamicWeightReconstruction(DynamicQuantizer):
    """`dynamic` with a weights-only `reconstruct` on `calibration_steps` steps of
    `samples_per_step` rows each; `log` keeps what each reconstruction reports."""

    reconstructs = True
    reconstructs_weights_only = True

    def __init__(
        self,
        weight_observer: str = "minmax",
        weight_observer_options: dict[str, Any] | None = None,
        calibration_steps: int = 20,
        samples_per_step: int = 256,
    ) -> None:
        super().__init__(weight_observer, weight_observer_options)
        if min(calibration_steps, samples_per_step) < 1:
            raise ValueError(
                f"calibration_steps and samples_per_step must be >= 1, got {calibration_steps}, {samples_per_step}"
            )
        self.calibration_steps, self.samples_per_step = calibration_steps, samples_per_step
        self.log: list[dict[str, Any]] = []

    def calibration_picks(self, record: CalibrationRecord) -> list[Pick]:
        return uniform_steps(record, self.calibration_steps, self.samples_per_step)
