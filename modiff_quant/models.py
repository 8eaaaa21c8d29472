"""Models by name: the bundled `digits16`, the paper's CIFAR-10 DDPM UNet built from config, or
a local diffusers folder.

Nothing is downloaded: `digits16` ships with the package, `cifar10-ddpm` has seeded random
weights unless `weights` names a local checkpoint, and a path must be a diffusers model folder.
"""

from __future__ import annotations

import json
from importlib.resources import files
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .imports import quiet_imports
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
BUNDLED_MODELS = ("digits16",)  # diffusers folders under modiff_quant/assets


def load_model(name_or_path: str, *, seed: int = 0, weights: str | Path | None = None) -> nn.Module:
    """A bundled model, a built-in architecture (seeded random weights, or `weights`: a
    safetensors/torch state dict or a diffusers folder), or a diffusers model folder."""
    with quiet_imports():
        from diffusers import AutoModel, UNet2DModel

    if name_or_path in BUNDLED_MODELS:
        return AutoModel.from_pretrained(str(files("modiff_quant") / "assets" / name_or_path), low_cpu_mem_usage=False).eval()
    if name_or_path in BUILTIN_MODELS:
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            model = UNet2DModel(**BUILTIN_MODELS[name_or_path]).eval()
        if weights is not None:
            model.load_state_dict(_state_dict(Path(weights)))
        return model
    path = Path(name_or_path)
    if (path / "config.json").is_file():
        return AutoModel.from_pretrained(path, low_cpu_mem_usage=False).eval()
    names = sorted((*BUNDLED_MODELS, *BUILTIN_MODELS))
    raise FileNotFoundError(f"model {name_or_path!r} is neither a built-in model{did_you_mean(name_or_path, names)} ({', '.join(names)}) nor a diffusers model folder")


def sample_shape(model: nn.Module) -> tuple[int, int, int]:
    """(channels, height, width) of one sample of a diffusers image model (sample_size may be an
    int or a pair)."""
    config = model.config
    size = config.sample_size if isinstance(config.sample_size, (tuple, list)) else (config.sample_size, config.sample_size)
    return (config.in_channels, *size)


def training_schedule(name_or_path: str) -> dict[str, Any] | None:
    """The noise schedule a model folder was trained with (its scheduler_config.json), if any."""
    folder = files("modiff_quant") / "assets" / name_or_path if name_or_path in BUNDLED_MODELS else Path(name_or_path)
    config = folder / "scheduler_config.json"
    return json.loads(config.read_text(encoding="utf-8")) if config.is_file() else None


def _state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Weights from a diffusers folder, a .safetensors file or a torch state-dict file."""
    from safetensors.torch import load_file

    with quiet_imports():
        from diffusers import UNet2DModel

    if path.is_dir():
        return UNet2DModel.from_pretrained(path).state_dict()
    if path.suffix == ".safetensors":
        return load_file(path)
    return torch.load(path, map_location="cpu", weights_only=True)
