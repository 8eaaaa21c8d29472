"""Train `digits16`: a DDPM (epsilon prediction, 1000 steps, linear betas) on the digits data.

The UNet has, like the paper's CIFAR-10 UNet, attention blocks and concatenated skip
connections. Seeded and CPU-sized; `python -m modiff_quant.training.digits16 --out DIR` writes a
diffusers model folder (config.json + safetensors) and a training log.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from tqdm.auto import tqdm

from ..data import DIGITS_SIZE, load_digits16
from ..samplers import DDPM_TRAINING

UNET_CONFIG = {
    "sample_size": DIGITS_SIZE,
    "in_channels": 1,
    "out_channels": 1,
    "block_out_channels": (32, 64, 64),
    "layers_per_block": 1,
    "down_block_types": ("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    "norm_num_groups": 8,
}
DEEP_UNET_CONFIG = {
    **UNET_CONFIG,
    "block_out_channels": (32, 64),
    "layers_per_block": 2,
    "down_block_types": ("DownBlock2D", "AttnDownBlock2D"),
    "up_block_types": ("AttnUpBlock2D", "UpBlock2D"),
    "resnet_time_scale_shift": "scale_shift",
}
"""A second model for measurements that must hold beyond one network (not shipped): two levels
instead of three, two ResNet blocks per level, timestep scale-and-shift in the ResNet blocks."""
ARCHITECTURES = {"digits16": UNET_CONFIG, "digits16-deep": DEEP_UNET_CONFIG}
SCHEDULER_CONFIG = DDPM_TRAINING


def train(
    steps: int, batch_size: int, lr: float, ema_decay: float, seed: int, architecture: str = "digits16"
) -> tuple[torch.nn.Module, list[dict[str, float]]]:
    """EMA weights of a UNet trained with the DDPM epsilon loss, and the loss log."""
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    train_set, _ = load_digits16()
    model = UNet2DModel(**ARCHITECTURES[architecture])
    ema = copy.deepcopy(model).requires_grad_(False)
    scheduler = DDPMScheduler(**SCHEDULER_CONFIG)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    warmup = max(1, steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))
    )
    generator = torch.Generator().manual_seed(seed)
    log, smoothed = [], None
    for step in tqdm(range(steps), desc=f"training {architecture}"):
        x0 = train_set.images[torch.randint(len(train_set.images), (batch_size,), generator=generator)]
        noise = torch.randn(x0.shape, generator=generator)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (batch_size,), generator=generator)
        loss = F.mse_loss(model(scheduler.add_noise(x0, noise, t), t).sample, noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        decay = min(ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for target, source in zip(ema.parameters(), model.parameters()):
                target.lerp_(source, 1 - decay)
        smoothed = loss.item() if smoothed is None else 0.98 * smoothed + 0.02 * loss.item()
        if (step + 1) % 100 == 0 or step + 1 == steps:
            log.append({"step": step + 1, "loss_ema": round(smoothed, 5)})
    return ema.eval(), log


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=1600)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--ema-decay", type=float, default=0.998)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--architecture", choices=sorted(ARCHITECTURES), default="digits16")
    args = parser.parse_args()
    torch.set_num_threads(2)
    start = time.perf_counter()
    model, log = train(args.steps, args.batch_size, args.lr, args.ema_decay, args.seed, args.architecture)
    model.save_pretrained(args.out, safe_serialization=True)
    DDPMScheduler(**SCHEDULER_CONFIG).save_pretrained(args.out)  # samplers read the training schedule from here
    record = {
        **{k: v for k, v in vars(args).items() if k != "out"},
        "scheduler": SCHEDULER_CONFIG,
        "minutes": round((time.perf_counter() - start) / 60, 2),
        "loss": log,
    }
    (args.out / "training_log.json").write_text(json.dumps(record, indent=1), encoding="utf-8")
    print(f"wrote {args.out} after {record['minutes']} min, final smoothed loss {log[-1]['loss_ema']}")


if __name__ == "__main__":
    main()
