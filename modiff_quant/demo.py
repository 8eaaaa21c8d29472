"""The main job: what a plain recipe and its MoDiff twin do to a diffusion model's predictions.

The model is called along a fixed forward-diffusion path x_t = √ᾱ_t·x_0 + √(1−ᾱ_t)·ε over the
sampler's timesteps (teacher forcing), so every recipe sees exactly the inputs the full-precision
model saw and the per-step ε-prediction error isolates what quantization does. Closed-loop image
quality needs trained weights (the bundled digits16 model).
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from .api import convert, prepare, sampling
from .metrics import relative_error
from .models import load_model
from .samplers import make_scheduler


@dataclass(frozen=True)
class DemoRow:
    recipe: str
    mean_error: float
    final_error: float
    seconds: float


def forward_path(scheduler: object, steps: int, x0: Tensor, noise: Tensor) -> list[tuple[Tensor, Tensor]]:
    """(x_t, t) along the sampler's timesteps for a fixed clean image and noise."""
    scheduler.set_timesteps(steps)
    alphas = scheduler.alphas_cumprod
    return [(alphas[t].sqrt() * x0 + (1 - alphas[t]).sqrt() * noise, t) for t in scheduler.timesteps]


@torch.no_grad()
def predictions(model: nn.Module, path: list[tuple[Tensor, Tensor]], desc: str) -> list[Tensor]:
    outputs = (model(x, t) for x, t in tqdm(path, desc=desc, leave=False))
    return [out.sample if hasattr(out, "sample") else out for out in outputs]


def run_demo(model_name: str, recipes: list[str], *, steps: int, samples: int, seed: int, sampler: str = "ddim") -> list[DemoRow]:
    """Per-step relative ε error of each recipe against full precision on the same path."""
    model = load_model(model_name, seed=seed)
    config = model.config
    generator = torch.Generator().manual_seed(seed)
    shape = (samples, config.in_channels, config.sample_size, config.sample_size)
    x0 = F.avg_pool2d(torch.randn(shape, generator=generator), 5, 1, 2).mul(3).clamp(-1, 1)  # smooth stand-in image
    path = forward_path(make_scheduler(sampler), steps, x0, torch.randn(shape, generator=generator))
    start = time.perf_counter()
    reference = predictions(model, path, "full precision")
    rows = [DemoRow("full precision", 0.0, 0.0, time.perf_counter() - start)]
    for recipe in recipes:
        start = time.perf_counter()
        quantized = convert(prepare(copy.deepcopy(model), recipe))
        with sampling(quantized):
            outputs = predictions(quantized, path, recipe)
        errors = [relative_error(r, o) for r, o in zip(reference, outputs)]
        rows.append(DemoRow(recipe, sum(errors) / len(errors), errors[-1], time.perf_counter() - start))
    return rows


def format_rows(rows: list[DemoRow]) -> str:
    lines = [f"{'recipe':<16} {'mean ε error':>13} {'last-step ε error':>18} {'seconds':>8}"]
    lines += [f"{r.recipe:<16} {r.mean_error:>13.4f} {r.final_error:>18.4f} {r.seconds:>8.1f}" for r in rows]
    return "\n".join(lines)
