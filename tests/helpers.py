"""Small models built from config and real trajectories for the tests."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

README = Path(__file__).resolve().parents[1] / "README.md"


def code_blocks(language: str) -> list[str]:
    """The README's fenced code blocks in `language`."""
    return re.findall(rf"```{language}\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)


def readme_example(marker: str) -> str:
    """The README's Python block whose first line is the comment `# <marker>`."""
    (block,) = [b for b in code_blocks("python") if b.startswith(f"# {marker}\n")]
    return block


TINY_UNET_SIZES = {
    "sample_size": 8,
    "block_out_channels": (16, 32),
    "layers_per_block": 1,
    "norm_num_groups": 8,
    "attention_head_dim": 8,
}


def tiny_unet(seed: int = 0) -> nn.Module:
    """A 2-level diffusers UNet with attention and concatenated skips, like the paper's, but tiny."""
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    return UNet2DModel(
        **TINY_UNET_SIZES,
        in_channels=1,
        out_channels=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
    ).eval()


def ddim_inputs(
    model: nn.Module, steps: int, batch: int = 2, seed: int = 0
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The (x_t, t) a 100-step-style DDIM run of the float model feeds it: a real trajectory."""
    from modiff_quant.samplers import make_scheduler

    scheduler = make_scheduler("ddim")
    scheduler.set_timesteps(steps)
    x = torch.randn(
        batch,
        model.config.in_channels,
        model.config.sample_size,
        model.config.sample_size,
        generator=torch.Generator().manual_seed(seed),
    )
    inputs = []
    with torch.no_grad():
        for t in scheduler.timesteps:
            inputs.append((x, t))
            x = scheduler.step(model(x, t).sample, t, x).prev_sample
    return inputs


def tiny_vae() -> nn.Module:
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(8,),
        down_block_types=("DownEncoderBlock2D",),
        up_block_types=("UpDecoderBlock2D",),
        latent_channels=4,
        norm_num_groups=8,
        sample_size=8,
    ).eval()


def _byte_symbols() -> list[str]:
    """The printable stand-in of each byte that byte-level BPE vocabularies (CLIP's) are written in."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    shifted = iter(range(256, 512))
    return [chr(b if b in printable else next(shifted)) for b in range(256)]


def tiny_clip_tokenizer(folder: Path) -> Any:
    """A CLIP tokenizer with a byte-level vocabulary and no merges, written to `folder` (no download)."""
    from transformers import CLIPTokenizer

    symbols = _byte_symbols()
    tokens = [*symbols, *(s + "</w>" for s in symbols), "<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({token: i for i, token in enumerate(tokens)}), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=16)


def tiny_sd_pipeline(folder: Path, seed: int = 0) -> Any:
    """A StableDiffusionPipeline built from config: a cross-attention UNet2DConditionModel, a
    2-layer CLIP text encoder, a one-level VAE; 8x8 images, no safety checker."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        **TINY_UNET_SIZES,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
    ).eval()
    text_config = CLIPTextConfig(
        vocab_size=514,
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=16,
        bos_token_id=512,
        eos_token_id=513,
        pad_token_id=513,
    )
    pipe = StableDiffusionPipeline(
        vae=tiny_vae(),
        text_encoder=CLIPTextModel(text_config).eval(),
        tokenizer=tiny_clip_tokenizer(folder),
        unet=unet,
        scheduler=DDIMScheduler(clip_sample=False, steps_offset=1),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_dit_pipeline(seed: int = 0) -> Any:
    """A class-conditional DiTPipeline built from config (its denoiser is a `transformer`)."""
    from diffusers import DDIMScheduler, DiTPipeline, DiTTransformer2DModel

    torch.manual_seed(seed)
    transformer = DiTTransformer2DModel(
        sample_size=4,
        patch_size=2,
        in_channels=4,
        out_channels=8,
        num_layers=1,
        attention_head_dim=8,
        num_attention_heads=2,
        num_embeds_ada_norm=1000,
        norm_num_groups=8,
    ).eval()
    pipe = DiTPipeline(
        transformer=transformer,
        vae=tiny_vae(),
        scheduler=DDIMScheduler(clip_sample=False),
        id2label={0: "zero", 1: "one"},
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe
