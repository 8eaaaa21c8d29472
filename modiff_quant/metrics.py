"""Paired quality metrics against the full-precision model run on the same inputs."""

from __future__ import annotations

import torch
from torch import Tensor


def to_unit_range(x: Tensor) -> Tensor:
    """Model space [-1, 1] -> image space [0, 1], clamped as saved images are."""
    return ((x + 1) / 2).clamp(0, 1)


def psnr_vs(reference: Tensor, images: Tensor) -> float:
    """Mean over samples of the PSNR (dB) of images against the reference, both in [0, 1]
    (identical images count as 100 dB so the mean stays finite)."""
    mse = (to_unit_range(images) - to_unit_range(reference)).pow(2).flatten(1).mean(1)
    return float((10 * torch.log10(1 / mse.clamp_min(1e-10))).mean())


def relative_error(reference: Tensor, x: Tensor) -> float:
    """‖x − reference‖ / ‖reference‖ over the whole batch."""
    return float((x - reference).norm() / reference.norm().clamp_min(1e-12))
