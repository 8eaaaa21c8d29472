"""Bit-operation accounting as in the paper: per image and step, Σ MACs × w_bits × a_bits over the
Linear/Conv layers (float counts as 32 bits).

`nominal` charges every layer at its recipe bits; `amortized` follows a whole trajectory: the
first step at its real precision (a full-precision first step is A32), 0-bit steps and layers
inside skipped blocks at 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .layer_parts import CHANNEL_DIMS
from .quant import FLOAT_BITS
from .recipe import LayerPlan, Plan


@torch.no_grad()
def layer_macs(model: nn.Module, *inputs: Any) -> dict[str, int]:
    """MACs of each Linear/Conv layer for one call of the float `model` on one image's `inputs`."""
    macs: dict[str, int] = {}

    def record(name: str, module: nn.Module, output: torch.Tensor) -> None:
        per_output = module.in_features if isinstance(module, nn.Linear) else module.in_channels // module.groups * math.prod(module.kernel_size)
        macs[name] = macs.get(name, 0) + output.numel() * per_output

    hooks = [m.register_forward_hook(lambda mod, _args, out, name=name: record(name, mod, out)) for name, m in model.named_modules() if isinstance(m, tuple(CHANNEL_DIMS))]
    try:
        model(*inputs)
    finally:
        for hook in hooks:
            hook.remove()
    return macs


@dataclass(frozen=True)
class Bops:
    gbops_per_step: float
    gbops_per_step_amortized: float


def count_bops(macs: dict[str, int], plan: Plan | None, steps: int) -> Bops:
    """GBops per image and step of a trajectory of `steps` model calls (plan None: float model)."""
    nominal = sum(m * _step_bits(plan, name, None) for name, m in macs.items())
    amortized = sum(m * _step_bits(plan, name, step) for step in range(steps) for name, m in macs.items()) / steps
    return Bops(nominal / 1e9, amortized / 1e9)


def _step_bits(plan: Plan | None, name: str, step: int | None) -> int:
    """w_bits × a_bits a layer is charged at `step` (None: nominal)."""
    # a block always runs on the first call: there is no cached output to reuse yet
    if plan and step and any(_inside(name, block) and plan.blocks[block].schedule.contains(step) for block in plan.blocks):
        return 0
    layer = plan.layers.get(name) if plan else None
    if layer is None:  # float model, or a layer the recipe leaves float
        return FLOAT_BITS * FLOAT_BITS
    return layer.settings.w_bits * _activation_bits(layer, step)


def _activation_bits(layer: LayerPlan, step: int | None) -> int:
    s = layer.settings
    if step == 0:
        if (s.scheme == "modiff" and s.first_step.kind == "fp") or s.a_bits == 0:
            return FLOAT_BITS  # the first call runs on the float input
        refinements = s.first_step.rounds if s.scheme == "modiff" else 0
        return s.a_bits * (1 + refinements)  # warm-up repeats the layer on the same input
    skipped = layer.skips(step) if step is not None else s.a_bits == 0
    return 0 if skipped else s.a_bits


def _inside(name: str, block: str) -> bool:
    return name.startswith(block + ".")
