"""Models by name: the paper's CIFAR-10 DDPM UNet built from config, or a local diffusers folder.

Nothing is downloaded: named models are built from their config (random weights, seeded), and a
path must be a diffusers model folder on disk.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from .registry import did_you_mean

CIFAR10_DDPM_CONFIG: dict[str, Any] = {
    # google/ddpm-cifar10-32 = the DDPM CIFAR-10 network of Q-Diffusion and MoDiff: 35,746,307 parameters,
    # 113 Conv2d/Linear layers, attention at 16x16, concatenated skips in the up path.
    "sample_size": 32,
    "in_channels": 3,
    "out_channels": 3,
    "block_out_channels": (128, 256, 256, 256),
    "layers_per_block": 2,
    "down_block_types": ("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    "norm_eps": 1e-6,
    "norm_num_groups": 32,
    "freq_shift": 1,
    "flip_sin_to_cos": False,
    "downsample_padding": 0,
    "time_embedding_type": "positional",
    "attention_head_dim": None,
    "act_fn": "silu",
}

BUILTIN_MODELS: dict[str, dict[str, Any]] = {"cifar10-ddpm": CIFAR10_DDPM_CONFIG}


def load_model(name_or_path: str, *, seed: int = 0) -> nn.Module:
    """A built-in model by name (random weights from `seed`) or a diffusers model folder."""
    from diffusers import AutoModel, UNet2DModel

    if name_or_path in BUILTIN_MODELS:
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            return UNet2DModel(**BUILTIN_MODELS[name_or_path]).eval()
    path = Path(name_or_path)
    if (path / "config.json").is_file():
        return AutoModel.from_pretrained(path).eval()
    names = sorted(BUILTIN_MODELS)
    raise FileNotFoundError(f"model {name_or_path!r} is neither a built-in model{did_you_mean(name_or_path, names)} ({', '.join(names)}) nor a diffusers model folder")
