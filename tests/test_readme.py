"""The README's examples stay true: its recipe resolves on the CIFAR-10 UNet, its own-loop
quickstart runs (on a tiny UNet in place of the elided constructor arguments), and its diffusers
quickstart runs on a tiny StableDiffusionPipeline in place of the local model."""

from __future__ import annotations

import pytest
import torch
from helpers import README, code_blocks, readme_example, tiny_sd_pipeline

import modiff_quant as mq
from modiff_quant.models import load_model


def test_readme_recipe_resolves_on_the_cifar_unet(tmp_path):
    (recipe,) = code_blocks("yaml")
    path = tmp_path / "readme.yaml"
    path.write_text(recipe, encoding="utf-8")
    plan = mq.load_recipe(path).resolve(load_model("cifar10-ddpm"))
    assert plan.layers["conv_in"].settings.a_bits == 8 and plan.layers["conv_in"].rules
    assert plan.layers["up_blocks.3.resnets.0.conv1"].settings.a_bits == 4
    assert set(plan.blocks) == {"up_blocks.0", "up_blocks.1", "mid_block"}


def test_readme_own_loop_quickstart_runs():
    quickstart = (
        readme_example("your own sampling loop")
        .replace("UNet2DModel(...)", "tiny_unet()")
        .replace("randn(4, 3, 32, 32)", "randn(4, 1, 8, 8)")
    )
    from helpers import tiny_unet

    namespace = {"tiny_unet": tiny_unet}
    exec(compile(quickstart, str(README), "exec"), namespace)  # noqa: S102 - our own documentation
    assert torch.isfinite(namespace["x"]).all()


@pytest.mark.slow
def test_readme_diffusers_quickstart_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the example saves to a relative folder
    tokenizer_folder = tmp_path / "tokenizer"
    tokenizer_folder.mkdir()

    def run(marker: str, namespace: dict) -> dict:
        code = readme_example(marker).replace(
            'StableDiffusionPipeline.from_pretrained("path/to/local/model")', "tiny_pipeline()"
        )
        code = code.replace("num_inference_steps=50", "num_inference_steps=8").replace(
            "w8a4-modiff-qdiffusion", "w8a4-modiff-ptq4dm"
        )  # the same flow, 10x faster to calibrate
        exec(compile(code, str(README), "exec"), namespace)  # noqa: S102 - our own documentation
        return namespace

    def seeded(pipe) -> torch.Tensor:
        return pipe(
            "a watercolor fox", num_inference_steps=8, generator=torch.Generator().manual_seed(0), output_type="pt"
        ).images

    base = {
        "tiny_pipeline": lambda: tiny_sd_pipeline(tokenizer_folder),
        "calibration_prompts": ["a cat", "a dog"],
        "mq": mq,
        "torch": torch,
    }
    quantized = run("diffusers pipeline", dict(base))
    assert quantized["image"].size == (8, 8) and mq.api.is_converted(quantized["pipe"].unet)
    calibrated = run("calibrated pipeline", dict(base, pipe=tiny_sd_pipeline(tokenizer_folder)))
    assert mq.api.is_converted(calibrated["unet"])
    expected = seeded(calibrated["pipe"])
    shipped = run("save and load", calibrated)
    assert shipped["pipe"] is not calibrated["unet"] and torch.equal(seeded(shipped["pipe"]), expected)
    one_call = run("oneshot", dict(base, pipe=tiny_sd_pipeline(tokenizer_folder)))
    assert mq.api.is_converted(one_call["unet"]) and (tmp_path / "unet-w8a4" / "config.json").is_file()
