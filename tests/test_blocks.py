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
    recipe = write_recipe(
        "version: 1\nstrict: true\nrules:\n  - match: re:up_blocks\\.0|mid_block\n"
        "    a_bits: 0\n    steps: {start: 1, every: 2}\n"
    )
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
    recipe = mq.load_recipe(
        write_recipe("version: 1\nrules:\n  - match: mid_block\n    a_bits: 0\n    steps: [1, 2]\n")
    )
    text = recipe.explain(tiny_unet())
    assert "cached blocks" in text
    row = next(line for line in text.splitlines() if line.startswith("mid_block "))
    assert "[1, 2]" in row and "recipe.yaml:3" in row


@pytest.mark.parametrize(("steps", "runs"), [("[0]", 3), ("all", 1)])
def test_first_step_always_runs_the_block(write_recipe, steps, runs):
    """There is nothing to reuse on a trajectory's first call, so a block always runs then."""
    model = tiny_unet()
    mq.convert(
        mq.prepare(
            model, write_recipe(f"version: 1\nrules:\n  - match: mid_block\n    a_bits: 0\n    steps: {steps}\n")
        )
    )
    calls = count_calls(model.mid_block)
    with mq.sampling(model):
        for x, t in ddim_inputs(tiny_unet(), steps=3):
            model(x, t)
    assert len(calls) == runs


def test_refresh_every_runs_the_block_on_every_nth_step_only(write_recipe):
    """DeepCache's cache interval: `refresh_every: 3` computes steps 0, 3, 6 and skips the rest."""
    model = tiny_unet()
    mq.convert(
        mq.prepare(
            model,
            write_recipe("version: 1\nrules:\n  - match: mid_block\n    a_bits: 0\n    steps: {refresh_every: 3}\n"),
        )
    )
    calls = count_calls(model.mid_block)
    ran = []
    with mq.sampling(model):
        for x, t in ddim_inputs(tiny_unet(), steps=7):
            before = len(calls)
            model(x, t)
            ran.append(len(calls) > before)
    assert ran == [True, False, False, True, False, False, True]


def test_adaptive_skip_follows_the_relative_input_change(write_recipe):
    """`skip_threshold`: the block is skipped while its input moved less than the threshold since
    the call that computed its cache, and runs as soon as it moved more."""
    model = tiny_unet()
    mq.convert(
        mq.prepare(
            model, write_recipe("version: 1\nrules:\n  - match: mid_block\n    a_bits: 0\n    skip_threshold: 0.1\n")
        )
    )
    calls = count_calls(model.mid_block)
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    ran = []
    with mq.sampling(model):
        for k, scale in enumerate((1.0, 1.001, 1.002, 1.5, 1.501)):
            before = len(calls)
            model(x * scale, 900 - 10 * k)
            ran.append(len(calls) > before)
    assert ran == [True, False, False, True, False]
    assert mq.api.block_skips(model) == (3, 5)


def test_shipped_caching_recipes_leave_layers_untouched_and_skip_deep_blocks():
    """`deepcache` and `adaptive-cache` are caching alone: float layers stay plain nn modules."""
    model = load_model("digits16")
    mq.convert(mq.prepare(model, "deepcache"))
    assert type(model.conv_in) is torch.nn.Conv2d and type(model.up_blocks[1].resnets[0].conv1) is torch.nn.Conv2d
    deep, shallow = count_calls(model.up_blocks[1]), count_calls(model.up_blocks[2])
    x = torch.randn(1, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    with mq.sampling(model):
        for k in range(6):
            model(x, 900 - 10 * k)
    assert (len(deep), len(shallow)) == (2, 6)
    assert "change < 0.1" in mq.load_recipe("adaptive-cache").explain(load_model("digits16"))


@pytest.mark.parametrize(
    ("rule", "message"),
    [
        (
            "  - match: mid_block\n    a_bits: 0\n    skip_threshold: -1\n",
            "skip_threshold: expected a positive number",
        ),
        ("  - match: mid_block\n    a_bits: 4\n    skip_threshold: 0.1\n", "may only set a_bits: 0"),
        ("  - match: conv_in\n    a_bits: 0\n    skip_threshold: 0.1\n", "applies to blocks"),
        (
            "  - match: mid_block\n    a_bits: 0\n    steps: {refresh_every: 1}\n",
            r"refresh_every \(N >= 2\), got {.refresh_every.: 1}",
        ),
        ("  - match: mid_block\n    a_bits: 0\n    steps: {every: 2, refresh_every: 3}\n", "every or refresh_every"),
    ],
)
def test_caching_rule_errors_name_the_line(write_recipe, rule, message):
    path = write_recipe("version: 1\nrules:\n" + rule)
    with pytest.raises(mq.RecipeError, match=message) as error:
        mq.load_recipe(path).resolve(tiny_unet())
    assert "recipe.yaml:" in str(error.value)


CACHING = """version: 1
strict: true
defaults: {scheme: plain, w_bits: float, a_bits: float}  # float: cast-then-quantize differs by order
rules:
  - match: re:up_blocks\\.[01]
    a_bits: 0
    steps: {start: 1, every: 2}
"""


def cached_run(model: torch.nn.Module) -> tuple[list[torch.Tensor], tuple[int, int]]:
    with mq.sampling(model):
        outputs = [model(x, t).sample for x, t in ddim_inputs(tiny_unet(), steps=6)]
    return outputs, mq.api.block_skips(model)


def group_offloading(model: torch.nn.Module) -> None:
    cpu = torch.device("cpu")
    model.enable_group_offload(cpu, offload_device=cpu, offload_type="block_level", num_blocks_per_group=1)


def layerwise_casting(model: torch.nn.Module) -> None:
    model.enable_layerwise_casting(storage_dtype=torch.bfloat16, compute_dtype=torch.float32)


@pytest.mark.parametrize("enable", [group_offloading, layerwise_casting])
def test_block_caching_chains_with_diffusers_hooks_in_either_order(write_recipe, enable):
    """Group offloading and layerwise casting put diffusers hooks on the blocks and layers; a
    cached block joins them (cache first or hooks first) and computes as without the hooks
    (offloading to the CPU changes nothing; casting the same in both orders)."""
    recipe = write_recipe(CACHING)
    plain, plain_skips = cached_run(mq.convert(mq.prepare(tiny_unet(), recipe)))
    hooks_first = tiny_unet()
    enable(hooks_first)
    mq.convert(mq.prepare(hooks_first, recipe))
    cache_first = mq.convert(mq.prepare(tiny_unet(), recipe))
    enable(cache_first)
    runs = [cached_run(hooks_first), cached_run(cache_first)]
    assert all(skips == plain_skips and skips[0] > 0 for _, skips in runs)
    assert all(torch.equal(a, b) for a, b in zip(runs[0][0], runs[1][0]))
    if enable is group_offloading:
        assert all(torch.equal(a, b) for a, b in zip(runs[0][0], plain))
    else:  # bf16 storage: close to float, not equal
        assert all(0 < (a - b).abs().max() < 0.1 for a, b in zip(runs[0][0], plain))
