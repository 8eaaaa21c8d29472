"""AdaRound (Nagel et al., 2020): learn, per weight, whether to round down or up.

Used inside block reconstruction by the `qdiffusion` and `adaround` base quantizers. Each
weight gets a continuous variable V; the soft weight uses the rectified sigmoid h(V) ∈ [0, 1] as
its rounding offset, a regulariser pushes h(V) to 0 or 1 as β anneals, and the final weight
rounds up exactly where V ≥ 0. `learn_rounding` runs it for one reconstruction unit with float
activations (BRECQ's weight phase), so the rounding serves any activation quantizer after it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from modiff_quant import distributed
from modiff_quant.calibration.reconstruction import Reconstruction, Unit, UnitSample, lp_error, random_batches
from modiff_quant.layers import QuantizedLayer, join_weight_parts
from modiff_quant.quant import QuantSpec, stats_view
from modiff_quant.trajectory import Mode

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


@dataclass(frozen=True)
class RoundingSchedule:
    """How long and how hard AdaRound learns: Adam steps on mini-batches of the unit's samples,
    the regulariser weighted by `round_weight` after a `warmup` fraction, β annealed from
    beta[0] to beta[1]."""

    iters: int = 300
    batch_size: int = 32
    lr: float = 3e-2
    round_weight: float = 0.01
    beta: tuple[float, float] = (20.0, 2.0)
    warmup: float = 0.2
    seed: int = 0

    def __post_init__(self) -> None:
        if self.iters < 0 or self.batch_size < 1 or self.lr <= 0 or self.round_weight < 0:
            raise ValueError(
                f"AdaRound needs iters >= 0, batch_size >= 1, lr > 0 and round_weight >= 0, got {self.iters}, "
                f"{self.batch_size}, {self.lr}, {self.round_weight}"
            )
        if len(self.beta) != 2 or not 0 <= self.warmup < 1:
            raise ValueError(f"AdaRound needs beta [start, end] and 0 <= warmup < 1, got {self.beta}, {self.warmup}")

    def regularizer_beta(self, step: int) -> float | None:
        """β at `step`, or None during the warm-up (no regulariser yet)."""
        start = int(self.warmup * self.iters)
        if step < start:
            return None
        return self.beta[1] + (self.beta[0] - self.beta[1]) * (1 - (step - start) / max(self.iters - start, 1))


WeightGrid = Callable[[Tensor, QuantSpec], tuple[Tensor, Tensor]]
"""A base quantizer's weight scale and zero point for a weight and its spec."""


def learn_rounding(
    reconstruction: Reconstruction, unit: Unit, grid: WeightGrid, schedule: RoundingSchedule
) -> dict[str, Any] | None:
    """AdaRound every quantized weight of the unit together (each on the grid `grid` gives it)
    against the unit's full-precision output, with float activations and inputs from the model
    quantized so far; leaves the hard rounding staged in the layers and returns the unit's log
    (None when it has no quantized weight)."""
    roundings = {
        layer: [AdaRound(part, *grid(part, spec), spec) for part in layer.weight_parts()]
        for layer in unit.layers
        if not (spec := layer.plan.settings.weight_spec()).is_float
    }
    if not roundings:
        return None
    samples = reconstruction.capture(unit, inputs_from=Mode.WEIGHTS_ONLY)
    _stage(roundings, hard=True)
    nearest = reconstruction_loss(reconstruction, unit, samples, 2.0, quantized_activations=False)
    variables = [r.v for parts in roundings.values() for r in parts]
    optimizer = torch.optim.Adam(variables, lr=schedule.lr)
    batches = random_batches(samples, schedule.iters, schedule.batch_size, schedule.seed)
    for step, (sample, rows) in enumerate(batches):
        _stage(roundings, hard=False)
        loss = reconstruction.loss(unit, sample, rows, 2.0, quantized_activations=False)
        if not loss.requires_grad:  # the unit's output ignores its weights (a 0-bit layer reuses its cached output)
            break
        beta = schedule.regularizer_beta(step)
        if beta is not None and distributed.is_main():  # once in the gradients summed over processes
            loss = loss + schedule.round_weight * sum(
                r.regularizer(beta) for parts in roundings.values() for r in parts
            )
        optimizer.zero_grad()
        loss.backward()
        distributed.sum_gradients(variables)
        optimizer.step()
    distributed.same_as_main(variables)
    _stage(roundings, hard=True)
    return {
        "unit": unit.name,
        "phase": "weights",
        "loss_nearest": nearest,
        "loss": reconstruction_loss(reconstruction, unit, samples, 2.0, quantized_activations=False),
        "undecided": max(r.undecided() for parts in roundings.values() for r in parts),
    }


def learn_roundings(
    reconstruction: Reconstruction, units: Sequence[Unit], grid: WeightGrid, schedule: RoundingSchedule, desc: str
) -> list[dict[str, Any]]:
    """`learn_rounding` on each unit in execution order (each sees the units before it
    quantized), with a progress bar; the logs of the units that had quantized weights."""
    logs = []
    with torch.enable_grad():
        for unit in tqdm(units, desc=desc, leave=False):
            log = learn_rounding(reconstruction, unit, grid, schedule)
            logs += [log] if log else []
    return logs


def _stage(roundings: dict[QuantizedLayer, list[AdaRound]], *, hard: bool) -> None:
    for layer, parts in roundings.items():
        layer.staged_weight = join_weight_parts([r.hard_weight() if hard else r.soft_weight() for r in parts])


@torch.no_grad()
def reconstruction_loss(
    reconstruction: Reconstruction, unit: Unit, samples: Sequence[UnitSample], p: float, *, quantized_activations: bool
) -> float:
    """Mean L_p reconstruction error of the unit over all calibration samples (in a torch.distributed
    job each process's share, summed in sample order: one process's value exactly)."""
    losses = []
    for index in distributed.share(len(samples)):
        sample = samples[index]
        output = reconstruction.forward(
            unit, sample, torch.arange(sample.inputs.rows), quantized_activations=quantized_activations
        )
        losses.append(float(lp_error(output, sample.target, p)))
    reconstruction.tracker.reset()
    return sum(distributed.gathered(losses)) / len(samples)
