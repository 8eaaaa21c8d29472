"""Block-level 0-bit skipping: a recipe rule on any module with a step schedule returns the
block's cached output on those steps without calling it (DeepCache in the recipe language)."""

from __future__ import annotations

import pytest
import torch
from helpers import ddim_inputs, tiny_unet

import modiff_quant as mq
from modiff_quant.models import load_model

pytestmark = pytest.mark.usefixtures("no_grad")


def count_calls(module: torch.nn.Module) -> list[int]:
    """Counts real executions through the block's first conv (hooks on the block itself fire even
    when it is skipped, because only its forward is replaced)."""
    calls: list[int] = []
    conv = next(m for m in module.modules() if isinstance(m, torch.nn.Conv2d))
    conv.register_forward_hook(lambda *_: calls.append(1))
    return calls


def test_block_is_skipped_on_its_steps_and_returns_the_cached_output(write_recipe):
    model = tiny_unet()
    recipe = write_recipe("version: 1\nstrict: true\nrules:\n  - match: re:up_blocks\\.0|mid_block\n    a_bits: 0\n    steps: {start: 1, every: 2}\n")
    mq.convert(mq.prepare(model, recipe))
    up0 = model.up_blocks[0]
    calls = count_calls(up0)
    outputs: list[torch.Tensor] = []
    up0.register_forward_hook(lambda _m, _a, out: outputs.append(out))
    with mq.sampling(model):
        for step, (x, t) in enumerate(ddim_inputs(tiny_unet(), steps=6)):
            before = len(calls)
            model(x, t)
            assert (len(calls) == before) == (step % 2 == 1), step
    assert outputs[1] is outputs[0] and outputs[3] is outputs[2] and outputs[2] is not outputs[0]
    assert type(up0).__name__ == "AttnUpBlock2D" and hasattr(up0, "attentions")  # class and attributes kept


def test_shipped_caching_recipe_skips_deep_cifar_blocks_on_odd_steps():
    """`w8a8-modiff-deepcache` on the paper's CIFAR-10 UNet: deep blocks run on even steps only,
    shallow ones every step, and the result is finite."""
    model = load_model("cifar10-ddpm")
    mq.convert(mq.prepare(model, "w8a8-modiff-deepcache"))
    deep, shallow = count_calls(model.up_blocks[1]), count_calls(model.up_blocks[3])
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with mq.sampling(model):
        outputs = [model(x * (1 - 0.01 * k), 900 - 10 * k).sample for k in range(4)]
    assert (len(deep), len(shallow)) == (2, 4)
    assert all(torch.isfinite(o).all() for o in outputs)


def test_block_rules_are_listed_by_explain(write_recipe):
    recipe = mq.load_recipe(write_recipe("version: 1\nrules:\n  - match: mid_block\n    a_bits: 0\n    steps: [1, 2]\n"))
    text = recipe.explain(tiny_unet())
    assert "cached blocks" in text
    row = next(line for line in text.splitlines() if line.startswith("mid_block "))
    assert "[1, 2]" in row and "recipe.yaml:3" in row


@pytest.mark.parametrize(("steps", "runs"), [("[0]", 3), ("all", 1)])
def test_first_step_always_runs_the_block(write_recipe, steps, runs):
    """There is nothing to reuse on a trajectory's first call, so a block always runs then."""
    model = tiny_unet()
    mq.convert(mq.prepare(model, write_recipe(f"version: 1\nrules:\n  - match: mid_block\n    a_bits: 0\n    steps: {steps}\n")))
    calls = count_calls(model.mid_block)
    with mq.sampling(model):
        for x, t in ddim_inputs(tiny_unet(), steps=3):
            model(x, t)
    assert len(calls) == runs
