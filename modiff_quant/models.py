"""Models by name: the bundled `digits16`, the paper's CIFAR-10 DDPM UNet built from config, or
a local diffusers folder.

Nothing is downloaded: `digits16` ships with the package, `cifar10-ddpm` has seeded random
weights unless `weights` names a local checkpoint, and a path must be a diffusers model folder.
"""

from __future__ import annotations

import inspect
import json
import pickle
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from importlib.resources import files
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .imports import quiet_imports
from .quoting import first_few
from .registry import did_you_mean
from .serialization import LoadError

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
    safetensors/torch state dict or a diffusers folder), or a diffusers model folder.

    Files are data from anywhere: whatever a loader makes of a broken one becomes a one-line
    `LoadError` naming the file (a missing model or weights file: `FileNotFoundError`)."""
    with quiet_imports():
        from diffusers import AutoModel, UNet2DModel

    if weights is not None and name_or_path not in BUILTIN_MODELS:
        raise ValueError(
            f"weights {str(weights)!r}: only the built-in architectures ({', '.join(BUILTIN_MODELS)}) "
            f"take a weights file; {name_or_path!r} brings its own"
        )
    if name_or_path in BUNDLED_MODELS:
        return AutoModel.from_pretrained(
            str(files("modiff_quant") / "assets" / name_or_path), low_cpu_mem_usage=False
        ).eval()
    if name_or_path in BUILTIN_MODELS:
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            model = UNet2DModel(**BUILTIN_MODELS[name_or_path]).eval()
        if weights is not None:
            _load_weights(model, Path(weights))
        return model
    path = Path(name_or_path)
    if (path / "config.json").is_file():
        with _as_load_error(path, "a diffusers model folder"):
            # str: diffusers 0.42 fails on a Path (its load id joins strings)
            model = AutoModel.from_pretrained(str(path), low_cpu_mem_usage=False).eval()
        _check_denoiser(model, path)
        return model
    names = sorted((*BUNDLED_MODELS, *BUILTIN_MODELS))
    suggestion = did_you_mean(name_or_path, names)
    raise FileNotFoundError(
        f"model {name_or_path!r} is neither a built-in model{suggestion} ({', '.join(names)}) "
        "nor a diffusers model folder"
    )


def sample_shape(model: nn.Module) -> tuple[int, int, int]:
    """(channels, height, width) of one sample of a diffusers image model (sample_size may be an
    int or a pair)."""
    config = model.config
    size = (
        config.sample_size
        if isinstance(config.sample_size, (tuple, list))
        else (config.sample_size, config.sample_size)
    )
    return (config.in_channels, *size)


def training_schedule(name_or_path: str) -> dict[str, Any] | None:
    """The noise schedule a model folder was trained with (its scheduler_config.json), if any."""
    folder = files("modiff_quant") / "assets" / name_or_path if name_or_path in BUNDLED_MODELS else Path(name_or_path)
    config = folder / "scheduler_config.json"
    if not config.is_file():
        return None
    with _as_load_error(Path(str(config)), "a scheduler config"):
        schedule = json.loads(config.read_text(encoding="utf-8"))
    if not isinstance(schedule, dict):
        raise LoadError(f"{config}: not a scheduler config (a JSON object), got a {type(schedule).__name__}")
    return schedule


@contextmanager
def _as_load_error(path: Path, what: str) -> Iterator[None]:
    """Whatever a third-party loader (diffusers, safetensors, torch.load) raises on a broken file,
    as a one-line LoadError naming the file: each has its own exception kinds, and a file from a
    stranger can trigger any of them."""
    try:
        yield
    except pickle.UnpicklingError as exc:  # torch's own text suggests weights_only=False, i.e. running the file's code
        raise LoadError(
            f"{path}: cannot be read as {what}: torch.load(weights_only=True) refuses it "
            "(not a torch file, or one holding objects besides tensors)"
        ) from exc
    except Exception as exc:
        first_line = next(iter(str(exc).strip().splitlines()), "")
        first_sentence = first_line.split(". ")[0][:300]
        raise LoadError(f"{path}: cannot be read as {what} ({type(exc).__name__}: {first_sentence})") from exc


def _load_weights(model: nn.Module, path: Path) -> None:
    """Load a state dict into `model` after checking that it is exactly the model's: same names,
    same shapes (load_state_dict's own report spans many lines)."""
    if not path.exists():
        raise FileNotFoundError(f"weights {str(path)!r}: no such file or folder")
    state = _state_dict(path)
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise LoadError(f"{path}: not a state dict (a mapping of parameter names to tensors)")
    expected = model.state_dict()
    missing, unexpected = sorted(expected.keys() - state.keys()), sorted(state.keys() - expected.keys())
    if missing or unexpected:
        listed = "; ".join(
            f"{what} {len(names)}: {first_few(names)}"
            for what, names in (("missing", missing), ("unexpected", unexpected))
            if names
        )
        raise LoadError(f"{path}: not a state dict of this model ({listed})")
    for name, tensor in state.items():
        if tensor.shape != expected[name].shape or tensor.is_floating_point() != expected[name].is_floating_point():
            raise LoadError(
                f"{path}: {name} is {tensor.dtype} {tuple(tensor.shape)}, "
                f"the model's is {expected[name].dtype} {tuple(expected[name].shape)}"
            )
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise LoadError(f"{path}: {name} holds non-finite values")
    model.load_state_dict(state)


def _state_dict(path: Path) -> Any:
    """Weights from a diffusers folder, a .safetensors file or a torch state-dict file."""
    from safetensors.torch import load_file

    with quiet_imports():
        from diffusers import UNet2DModel

    if path.is_dir():
        with _as_load_error(path, "a diffusers UNet2DModel folder"):
            return UNet2DModel.from_pretrained(str(path), low_cpu_mem_usage=False).state_dict()
    if path.suffix == ".safetensors":
        with _as_load_error(path, "a safetensors file"):
            return load_file(path)
    with _as_load_error(path, "a torch state dict"), warnings.catch_warnings():
        # torch's notes on a file's pickle protocol: it is loaded or refused either way
        warnings.simplefilter("ignore", UserWarning)
        return torch.load(path, map_location="cpu", weights_only=True)


def _check_denoiser(model: nn.Module, path: Path) -> None:
    """The harness calls `model(x_t, t)`: a folder holding another kind of model (a VAE, a
    conditional UNet) would fail or, worse, return something, later."""
    config = getattr(model, "config", None)
    parameters = list(inspect.signature(model.forward).parameters.values())
    required = [
        p.name
        for p in parameters[2:]
        if p.default is inspect.Parameter.empty and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    ]
    if (
        config is None
        or not all(hasattr(config, key) for key in ("in_channels", "sample_size"))
        or [p.name for p in parameters[1:2]] != ["timestep"]
        or required
    ):
        needs = f" (it also needs {', '.join(required)})" if required else ""
        raise LoadError(
            f"{path}: holds a {type(model).__name__}, "
            f"not an unconditional denoiser called as model(sample, timestep){needs}"
        )
