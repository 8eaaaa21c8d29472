"""AdaRound (Nagel et al., 2020): learn, per weight, whether to round down or up.

Used inside block reconstruction by the `qdiffusion` base quantizer. Each weight gets a
continuous variable V; the soft weight uses the rectified sigmoid h(V) ∈ [0, 1] as its rounding
offset, a regulariser pushes h(V) to 0 or 1 as β anneals, and the final weight rounds up
exactly where V ≥ 0.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from modiff_quant.quant import QuantSpec, stats_view

GAMMA, ZETA = -0.1, 1.1  # stretch of the rectified sigmoid, so that h reaches 0 and 1 exactly


class AdaRound(nn.Module):
    """Learnable rounding of one weight tensor on a fixed grid (scale, zero point)."""

    def __init__(self, weight: Tensor, scale: Tensor, zero_point: Tensor, spec: QuantSpec) -> None:
        super().__init__()
        self.shape, self.spec = weight.shape, spec
        view, _ = stats_view(weight.detach(), spec.granularity, weight=True)
        self.register_buffer("scale", scale)
        self.register_buffer("zero_point", zero_point)
        scaled = view / scale
        self.register_buffer("floor", scaled.floor())
        fraction = (scaled - self.floor).clamp(1e-4, 1 - 1e-4)
        self.v = nn.Parameter(-torch.log((ZETA - GAMMA) / (fraction - GAMMA) - 1))  # h(V) = fraction at the start

    def h(self) -> Tensor:
        """Rounding offsets in [0, 1]."""
        return (torch.sigmoid(self.v) * (ZETA - GAMMA) + GAMMA).clamp(0, 1)

    def soft_weight(self) -> Tensor:
        return self._weight(self.h())

    def hard_weight(self) -> Tensor:
        return self._weight((self.v >= 0).to(self.v.dtype)).detach()

    def _weight(self, offset: Tensor) -> Tensor:
        codes = (self.floor + offset + self.zero_point).clamp(self.spec.qmin, self.spec.qmax)
        return ((codes - self.zero_point) * self.scale).reshape(self.shape)

    def regularizer(self, beta: float) -> Tensor:
        """Σ 1 − |2h − 1|^β: zero only when every offset is exactly 0 or 1."""
        return (1 - (2 * self.h() - 1).abs().pow(beta)).sum()

    def undecided(self, tolerance: float = 1e-3) -> float:
        """Fraction of offsets not yet within `tolerance` of 0 or 1."""
        h = self.h()
        return float(((h > tolerance) & (h < 1 - tolerance)).float().mean())
