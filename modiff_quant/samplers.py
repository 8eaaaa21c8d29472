"""Sampling loops over diffusers schedulers. The sampler is the only caller of the model, so a
prepared model sees exactly the call sequence (timesteps, batch) a user's pipeline produces."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from .registry import did_you_mean

SAMPLERS = ("ddim", "ddpm", "dpm-solver")


def make_scheduler(name: str, *, num_train_timesteps: int = 1000, beta_schedule: str = "linear") -> Any:
    """A diffusers scheduler for the DDPM training setup (epsilon prediction, linear betas)."""
    from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler

    classes = dict(zip(SAMPLERS, (DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler)))
    if name not in classes:
        raise ValueError(f"unknown sampler {name!r}{did_you_mean(name, list(classes))} (known: {', '.join(classes)})")
    return classes[name](num_train_timesteps=num_train_timesteps, beta_schedule=beta_schedule, prediction_type="epsilon")


@torch.no_grad()
def sample(model: nn.Module, noise: Tensor, scheduler: Any, steps: int, *, seed: int = 0, desc: str = "sampling", progress: bool = True) -> Tensor:
    """Denoise `noise` in `steps` steps; `seed` drives the noise stochastic samplers add."""
    generator = torch.Generator(device=noise.device).manual_seed(seed)
    scheduler.set_timesteps(steps)
    x = noise * scheduler.init_noise_sigma
    for t in tqdm(scheduler.timesteps, desc=desc, disable=not progress, leave=False):
        out = model(scheduler.scale_model_input(x, t), t)
        eps = out.sample if hasattr(out, "sample") else out
        x = scheduler.step(eps, t, x, generator=generator).prev_sample
    return x
