"""Sampling loops over diffusers schedulers. The sampler is the only caller of the model, so a
prepared model sees exactly the call sequence (timesteps, batch) a user's pipeline produces."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from .quoting import shown
from .registry import did_you_mean

SAMPLERS = ("ddim", "ddim-quad", "ddpm", "dpm-solver")


@functools.cache
def _quad_ddim_class() -> type:
    from diffusers import DDIMScheduler
    from diffusers.schedulers.scheduling_ddim import DDIMSchedulerOutput

    class QuadDDIMScheduler(DDIMScheduler):
        """DDIM (η = 0) on the quadratic sequence t_i = ⌊(i·√(0.8T)/(S−1))²⌋ of the DDIM code that
        Q-Diffusion and MoDiff sample CIFAR-10 with: dense near t = 0, first call at t = 0.8T,
        repeated t values kept. diffusers' DDIM assumes uniform spacing, so steps go by index."""

        def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None) -> None:
            sequence = (
                np.linspace(0, np.sqrt(0.8 * self.config.num_train_timesteps), num_inference_steps) ** 2
            ).astype(np.int64)[::-1]
            self.num_inference_steps = num_inference_steps
            self.timesteps = torch.from_numpy(sequence.copy()).to(device)
            self._previous = [*sequence[1:].tolist(), -1]
            self._index = 0

        def step(
            self, model_output: Tensor, timestep: Tensor | int, sample: Tensor, return_dict: bool = True, **_: Any
        ) -> DDIMSchedulerOutput | tuple[Tensor, Tensor]:
            previous = self._previous[self._index]
            self._index += 1
            alpha = self.alphas_cumprod[int(timestep)]
            alpha_prev = self.alphas_cumprod[previous] if previous >= 0 else torch.tensor(1.0)
            x0 = (sample - (1 - alpha).sqrt() * model_output) / alpha.sqrt()  # not clipped, as in the reference loop
            prev_sample = alpha_prev.sqrt() * x0 + (1 - alpha_prev).sqrt() * model_output
            return (
                DDIMSchedulerOutput(prev_sample=prev_sample, pred_original_sample=x0)
                if return_dict
                else (prev_sample, x0)
            )

    return QuadDDIMScheduler


DDPM_TRAINING = {"num_train_timesteps": 1000, "beta_schedule": "linear", "prediction_type": "epsilon"}
"""The noise schedule of the DDPM models (digits16, CIFAR-10): 1000 steps, linear betas, ε-prediction."""


def make_scheduler(name: str, training: dict[str, Any] | None = None) -> Any:
    """A diffusers sampler for a model trained with the `training` noise schedule (default DDPM)."""
    from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler

    classes = dict(zip(SAMPLERS, (DDIMScheduler, _quad_ddim_class(), DDPMScheduler, DPMSolverMultistepScheduler)))
    if name not in classes:
        raise ValueError(f"unknown sampler {name!r}{did_you_mean(name, list(classes))} (known: {', '.join(classes)})")
    try:
        return classes[name].from_config({**DDPM_TRAINING, **(training or {})})
    except (
        ValueError,
        TypeError,
        NotImplementedError,
        RuntimeError,
    ) as exc:  # a model folder's scheduler_config.json is data from anywhere
        first = next(iter(str(exc).splitlines()), "")
        raise ValueError(f"the {name} sampler cannot use the noise schedule {shown(training)}: {first}") from exc


def check_steps(name: str, training: dict[str, Any] | None, steps: int) -> None:
    """Fail before any sampling unless `steps` is 1 to the schedule's training timesteps: more
    would repeat timesteps (DDIM and DDPM refuse them; the quadratic DDIM and DPM-Solver would
    silently repeat them)."""
    limit = make_scheduler(name, training).config.num_train_timesteps
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= limit:
        raise ValueError(f"steps must be an integer from 1 to {limit} (the model's training timesteps), got {steps!r}")


@torch.no_grad()
def sample(
    model: nn.Module,
    noise: Tensor,
    scheduler: Any,
    steps: int,
    *,
    seed: int = 0,
    desc: str = "sampling",
    progress: bool = True,
    on_step: Callable[[int, Tensor], None] | None = None,
) -> Tensor:
    """Denoise `noise` in `steps` steps; `seed` drives the noise stochastic samplers add (give
    each batch its own seed, and the same one to every model compared on that batch).
    `on_step(i, eps)` sees the model's prediction at every step."""
    generator = torch.Generator(device=noise.device).manual_seed(seed)
    scheduler.set_timesteps(steps)
    x = noise * scheduler.init_noise_sigma
    for i, t in enumerate(tqdm(scheduler.timesteps, desc=desc, disable=not progress, leave=False)):
        out = model(scheduler.scale_model_input(x, t), t)
        eps = out.sample if hasattr(out, "sample") else out
        if on_step is not None:
            on_step(i, eps)
        x = scheduler.step(eps, t, x, generator=generator).prev_sample
    return x
