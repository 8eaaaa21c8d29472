"""Which recorded samples calibration uses: every step, uniformly spaced steps (Q-Diffusion's
time-step-aware set) or normally distributed timesteps (PTQ4DM's NDTC)."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import torch
from torch import Tensor

from .record import CalibrationRecord, RecordedCall


@dataclass(frozen=True)
class Pick:
    """Some batch rows of one recorded call (rows may repeat)."""

    call: RecordedCall
    rows: Tensor


def all_steps(record: CalibrationRecord) -> list[Pick]:
    """Every row of every recorded call."""
    return [Pick(call, torch.arange(call.rows)) for call in record.calls]


def uniform_steps(record: CalibrationRecord, steps: int, samples_per_step: int) -> list[Pick]:
    """Q-Diffusion's set: `steps` steps evenly spaced over the trajectory (0, 5, ..., 95 for 20 of
    100, the first step included; every step of a shorter trajectory) and up to `samples_per_step`
    rows of each, across trajectories."""
    if steps < 1 or samples_per_step < 1:
        raise ValueError(f"steps and samples_per_step must be >= 1, got {steps} and {samples_per_step}")
    length = max(call.step for call in record.calls) + 1
    count = min(steps, length)  # spacing by `steps` itself would crowd a short trajectory's picks into its first steps
    chosen = sorted({i * length // count for i in range(count)})
    picks = []
    for step in chosen:
        remaining = samples_per_step
        for call in (c for c in record.calls if c.step == step):
            if remaining <= 0:
                break
            take = min(remaining, call.rows)
            picks.append(Pick(call, torch.arange(take)))
            remaining -= take
    return picks


def draw_ndtc_timesteps(count: int, mean: float, std: float, num_train_timesteps: int, seed: int = 0) -> Tensor:
    """t_i = ⌊N(mean·T, std·T)⌋ clamped to [0, T−1]: PTQ4DM's normally distributed timesteps, in
    noise-level units (small t = close to the clean image)."""
    if count < 1 or std <= 0 or num_train_timesteps < 1:
        raise ValueError(f"NDTC needs count >= 1, std > 0 and T >= 1, got {count}, {std}, {num_train_timesteps}")
    draws = torch.randn(count, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * std + mean
    return (draws * num_train_timesteps).floor().clamp(0, num_train_timesteps - 1).long()


def ndtc(
    record: CalibrationRecord, samples: int, mean: float, std: float, num_train_timesteps: int, seed: int = 0
) -> list[Pick]:
    """PTQ4DM's NDTC set as its paper describes it: for each of `samples` draws t_i, one
    denoising chain (a recorded trajectory row, taken in turn) at its step whose timestep is
    nearest to t_i, kept with its true timestep.

    The released PTQ4DM code instead pairs the sample after t_i denoising steps with timestep t_i,
    i.e. a noisy input labelled as nearly clean; that contradicts the paper and is not reproduced.
    """
    chains = [(calls, row) for calls in record.chains().values() for row in range(calls[0].rows)]
    if any(call.timestep is None for calls, _ in chains for call in calls):
        raise ValueError("NDTC needs the timestep of every recorded model call; the calibration loop passed none")
    rows: dict[int, list[int]] = defaultdict(list)
    calls_by_id: dict[int, RecordedCall] = {}
    for i, t in enumerate(draw_ndtc_timesteps(samples, mean, std, num_train_timesteps, seed).tolist()):
        calls, row = chains[i % len(chains)]
        call = min(calls, key=lambda c: (abs(c.timestep - t), c.step))
        rows[id(call)].append(row)
        calls_by_id[id(call)] = call
    return [Pick(calls_by_id[key], torch.tensor(picked)) for key, picked in rows.items()]
