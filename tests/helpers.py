"""Small models built from config and real trajectories for the tests."""

from __future__ import annotations

import torch
from torch import nn


def tiny_unet(seed: int = 0) -> nn.Module:
    """A 2-level diffusers UNet with attention and concatenated skips, like the paper's, but tiny."""
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    return UNet2DModel(
        sample_size=8,
        in_channels=1,
        out_channels=1,
        block_out_channels=(16, 32),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
        attention_head_dim=8,
    ).eval()


def ddim_inputs(model: nn.Module, steps: int, batch: int = 2, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The (x_t, t) a 100-step-style DDIM run of the float model feeds it: a real trajectory."""
    from modiff_quant.samplers import make_scheduler

    scheduler = make_scheduler("ddim")
    scheduler.set_timesteps(steps)
    x = torch.randn(batch, model.config.in_channels, model.config.sample_size, model.config.sample_size, generator=torch.Generator().manual_seed(seed))
    inputs = []
    with torch.no_grad():
        for t in scheduler.timesteps:
            inputs.append((x, t))
            x = scheduler.step(model(x, t).sample, t, x).prev_sample
    return inputs
