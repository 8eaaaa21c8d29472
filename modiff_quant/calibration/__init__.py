"""Calibration data: recording the user's sampling loop, choosing calibration samples from it,
replaying them through the model, and the reconstruction machinery base quantizers build on."""

from .record import CalibrationRecord, Inputs, RecordedCall
from .selection import Pick, all_steps, draw_ndtc_timesteps, ndtc, uniform_steps

__all__ = [
    "CalibrationRecord",
    "Inputs",
    "Pick",
    "RecordedCall",
    "all_steps",
    "draw_ndtc_timesteps",
    "ndtc",
    "uniform_steps",
]
