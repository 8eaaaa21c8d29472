"""The README's examples stay true: its recipe resolves on the CIFAR-10 UNet and its Python
quickstart runs (on a tiny UNet in place of the elided constructor arguments)."""

from __future__ import annotations

import re
from pathlib import Path

import torch

import modiff_quant as mq
from modiff_quant.models import load_model

README = Path(__file__).resolve().parents[1] / "README.md"


def code_blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)


def test_readme_recipe_resolves_on_the_cifar_unet(tmp_path):
    (recipe,) = code_blocks("yaml")
    path = tmp_path / "readme.yaml"
    path.write_text(recipe, encoding="utf-8")
    plan = mq.load_recipe(path).resolve(load_model("cifar10-ddpm"))
    assert plan.layers["conv_in"].settings.a_bits == 8 and plan.layers["conv_in"].rules
    assert plan.layers["up_blocks.3.resnets.0.conv1"].settings.a_bits == 4
    assert set(plan.blocks) == {"up_blocks.0", "up_blocks.1", "mid_block"}


def test_readme_quickstart_runs():
    quickstart = code_blocks("python")[0].replace("UNet2DModel(...)", "tiny_unet()").replace("randn(4, 3, 32, 32)", "randn(4, 1, 8, 8)")
    from helpers import tiny_unet

    namespace = {"tiny_unet": tiny_unet}
    exec(compile(quickstart, str(README), "exec"), namespace)  # noqa: S102 - our own documentation
    assert torch.isfinite(namespace["x"]).all()
