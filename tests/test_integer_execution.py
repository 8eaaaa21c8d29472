"""Integer execution: quantized products on int8 codes with int32 accumulation (oneDNN)."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from helpers import ddim_inputs, tiny_unet

import modiff_quant as mq
from modiff_quant.integer_kernels import unavailable_reason
from modiff_quant.layers import QuantizedLayer
from modiff_quant.models import load_model

pytestmark = [
    pytest.mark.usefixtures("no_grad"),
    pytest.mark.skipif(unavailable_reason() is not None, reason=str(unavailable_reason())),
]


def _variant(**values: object) -> mq.Recipe:
    recipe = mq.load_recipe("w8a4-modiff")
    return dataclasses.replace(recipe, defaults=recipe.defaults.updated(values))


@pytest.mark.parametrize(
    "recipe",
    ["w8a4-modiff", "w8a8-plain", "w4a4-modiff", _variant(w_symmetric=False)],
    ids=["w8a4-modiff", "w8a8-plain", "w4a4-modiff", "w8a4-modiff-asymmetric-weights"],
)
def test_every_integer_product_matches_the_float_product_of_the_same_codes(recipe, monkeypatch):
    """Over a digits16 trajectory, each layer call's integer A(q) (+ô, +bias) is within 1e-5
    relative of the float layer on the dequantized codes; asymmetric weights included."""
    model = mq.set_execution(mq.convert(mq.prepare(load_model("digits16"), recipe)), "integer")
    original = QuantizedLayer.apply_quantized
    worst, calls = [0.0], [0]

    def both(layer, q, codes, *, bias, accumulate=None):
        out = original(layer, q, codes, bias=bias, accumulate=accumulate)
        if codes is not None:
            expected = original(layer, q, None, bias=bias, accumulate=accumulate)
            worst[0] = max(worst[0], ((out - expected).norm() / expected.norm().clamp_min(1e-12)).item())
            calls[0] += 1
        return out

    monkeypatch.setattr(QuantizedLayer, "apply_quantized", both)
    with mq.sampling(model):
        for x, t in ddim_inputs(load_model("digits16"), steps=6, batch=3):
            model(x, t)
    assert calls[0] > 5 * 60 and worst[0] < 1e-5, (calls[0], worst[0])


def test_integer_and_fake_execution_switch_back_and_forth():
    model = tiny_unet()
    inputs = ddim_inputs(model, steps=4)
    quantized = mq.convert(mq.prepare(copy.deepcopy(model), "w8a8-modiff"))

    def run() -> list[torch.Tensor]:
        with mq.sampling(quantized):
            return [quantized(x, t).sample for x, t in inputs]

    fake = run()
    mq.set_execution(quantized, "integer")
    assert all(layer.integer is not None for layer in quantized.modules() if isinstance(layer, QuantizedLayer))
    integer = run()
    mq.set_execution(quantized, "fake")
    assert all(torch.equal(a, b) for a, b in zip(fake, run()))
    assert ((integer[1] - fake[1]).norm() / fake[1].norm()) < 1e-3


@pytest.mark.parametrize(
    ("recipe", "message"),
    [
        (_variant(a_granularity=mq.Granularity.parse("channel")), "activation scales per tensor or per sample"),
        (_variant(input_cache="int8"), "input_cache: full"),
        (_variant(w_granularity=mq.Granularity.parse("group:1")), "whole-input-channel group. weights of 2-8 bits"),
    ],
)
def test_layers_that_cannot_run_on_integers_are_all_named_and_nothing_changes(recipe, message):
    model = mq.convert(mq.prepare(tiny_unet(), recipe))
    with pytest.raises(ValueError, match=message) as error:
        mq.set_execution(model, "integer")
    assert "conv_in: integer execution needs" in str(error.value)
    assert all(layer.integer is None for layer in model.modules() if isinstance(layer, QuantizedLayer))


def test_integer_execution_needs_a_converted_model_and_a_known_mode():
    model = mq.prepare(tiny_unet(), "w8a4-modiff")
    with pytest.raises(RuntimeError, match="needs a converted model"):
        mq.set_execution(model, "integer")
    with pytest.raises(ValueError, match="'fake' or 'integer'"):
        mq.set_execution(mq.convert(model), "int8")


def test_integer_execution_on_another_device_is_refused_by_layer():
    """oneDNN's int8 kernels are CPU kernels: a model elsewhere is refused, naming the layers."""
    model = mq.convert(mq.prepare(tiny_unet(), "w8a4-modiff")).to("meta")
    with pytest.raises(ValueError, match="conv_in: integer execution needs the model on the CPU .* on meta"):
        mq.set_execution(model, "integer")


def test_weight_scales_per_input_channel_run_on_integers(write_recipe, monkeypatch):
    """`conv_out` at w_granularity group:9 (a scale per input channel of its 3×3 kernel: its one
    output channel) runs on the integer kernels, each call within 1e-5 of the float product of
    the same codes."""
    from modiff_quant.integer_kernels import InputGroupedWeights

    recipe = write_recipe(
        "version: 1\nextends: w8a4-modiff\nrules:\n  - match: conv_out\n    w_granularity: group:9\n"
    )
    model = mq.set_execution(mq.convert(mq.prepare(load_model("digits16"), recipe)), "integer")
    assert isinstance(model.conv_out.integer, InputGroupedWeights)
    original = QuantizedLayer.apply_quantized
    errors = []

    def both(layer, q, codes, *, bias, accumulate=None):
        out = original(layer, q, codes, bias=bias, accumulate=accumulate)
        if codes is not None and layer is model.conv_out:
            expected = original(layer, q, None, bias=bias, accumulate=accumulate)
            errors.append(((out - expected).norm() / expected.norm().clamp_min(1e-12)).item())
        return out

    monkeypatch.setattr(QuantizedLayer, "apply_quantized", both)
    with mq.sampling(model):
        for x, t in ddim_inputs(load_model("digits16"), steps=4, batch=2):
            model(x, t)
    assert len(errors) == 3 and max(errors) < 1e-5, errors
