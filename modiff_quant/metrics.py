"""Paired quality metrics against the full-precision model run on the same inputs."""

from __future__ import annotations

from torch import Tensor


def relative_error(reference: Tensor, x: Tensor) -> float:
    """‖x − reference‖ / ‖reference‖ over the whole batch."""
    return float((x - reference).norm() / reference.norm().clamp_min(1e-12))
