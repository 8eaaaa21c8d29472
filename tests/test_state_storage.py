"""Trajectory state formats: â and ô kept smaller between steps, with ô = A(â) + b kept exact."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from helpers import ddim_inputs, tiny_unet

import modiff_quant as mq
from modiff_quant.api import state_bytes
from modiff_quant.layers import QuantizedLayer
from modiff_quant.state_storage import STATE_FORMATS, store

pytestmark = pytest.mark.usefixtures("no_grad")


@pytest.mark.parametrize("fmt", STATE_FORMATS)
def test_store_round_trip_error_and_size(fmt):
    x = torch.randn(3, 8, 5, 5) * torch.tensor([1.0, 10.0, 100.0]).view(3, 1, 1, 1)
    stored = store(x, fmt)
    error = ((stored.unpack() - x).norm() / x.norm()).item()
    limit = {"full": 0.0, "float16": 1e-3, "bfloat16": 5e-3, "int16": 1e-4, "int8": 2e-2}[fmt]
    assert error <= limit and stored.unpack().dtype == x.dtype
    width = {"full": 4, "float16": 2, "bfloat16": 2, "int16": 2, "int8": 1}[fmt]
    assert stored.nbytes == x.numel() * width + (3 * 4 if fmt.startswith("int") else 0)
    assert (stored.data.data_ptr() == x.data_ptr()) == (fmt == "full")  # full: no copy


def _with_state(recipe: str, input_cache: str, output_cache: str) -> mq.Recipe:
    loaded = mq.load_recipe(recipe)
    return dataclasses.replace(
        loaded, defaults=loaded.defaults.updated({"input_cache": input_cache, "output_cache": output_cache})
    )


@pytest.mark.parametrize("fmt", ["float16", "bfloat16", "int8"])
def test_lossy_input_state_keeps_the_output_equal_to_the_layer_of_the_stored_input(fmt):
    """ô = A(â) + b holds exactly whatever format â is kept in: the layer is fed the increment
    the stored â made, so storage rounding is compensated at the next step."""
    model = mq.convert(mq.prepare(tiny_unet(), _with_state("w8a4-modiff", fmt, "full")))
    layer = model.down_blocks[0].resnets[0].conv1
    seen = []
    layer.register_forward_hook(lambda mod, _args, out: seen.append(out))
    with mq.sampling(model):
        for x, t in ddim_inputs(tiny_unet(), steps=5):
            model(x, t)
            state = next(iter(layer.states().values()))
            expected = layer.apply_op(state.a_hat, bias=True)
            assert ((seen[-1] - expected).norm() / expected.norm()) < 1e-5


def test_state_bytes_shrink_with_the_formats():
    model = tiny_unet()
    sizes = {}
    for input_cache, output_cache in (("full", "full"), ("float16", "float16"), ("int8", "int8")):
        quantized = mq.convert(mq.prepare(copy.deepcopy(model), _with_state("w8a4-modiff", input_cache, output_cache)))
        with mq.sampling(quantized):
            for x, t in ddim_inputs(model, steps=3):
                quantized(x, t)
            sizes[input_cache] = state_bytes(quantized)
    assert sizes["float16"] == sizes["full"] / 2
    assert sizes["full"] / 4 <= sizes["int8"] < sizes["full"] / 4 * 1.01  # plus one scale per sample and tensor


@pytest.mark.parametrize(("fmt", "limit"), [("float16", 5e-3), ("bfloat16", 3e-2)])
def test_half_precision_state_drifts_little(fmt, limit):
    """With 16-bit activations (so that rounding flips of the quantizer do not mask it), half
    precision â and ô change the model's outputs by less than `limit` over a trajectory."""
    model = tiny_unet()
    inputs = ddim_inputs(model, steps=8)
    outputs = []
    for state in ("full", fmt):
        recipe = _with_state("w8a8-modiff", state, state)
        recipe = dataclasses.replace(recipe, defaults=recipe.defaults.updated({"a_bits": 16}))
        quantized = mq.convert(mq.prepare(copy.deepcopy(model), recipe))
        with mq.sampling(quantized):
            outputs.append([quantized(x, t).sample for x, t in inputs])
    error = max(((a - b).norm() / a.norm()).item() for a, b in zip(*outputs))
    assert 0 < error < limit


def test_state_format_is_a_recipe_key(write_recipe):
    model = tiny_unet()
    with pytest.raises(mq.RecipeError, match=r"recipe.yaml:4.*output_cache.*expected one of full, float16"):
        mq.load_recipe(write_recipe("version: 1\nextends: w8a4-modiff\ndefaults:\n  output_cache: fp8\n"))
    assert all(
        layer.plan.settings.output_cache == "float16"
        for layer in mq.prepare(copy.deepcopy(model), "w8a4-modiff-lean").modules()
        if isinstance(layer, QuantizedLayer)
    )
