"""Attention products (QKᵀ, softmax·V): their operands as recipe-addressable layers, quantized
plain or modulated, calibrated, saved, and charged by `bops` at the widths they run at."""

from __future__ import annotations

import copy
import re

import pytest
import torch
from helpers import ddim_inputs, tiny_unet

import modiff_quant as mq
from modiff_quant.attention_products import (
    OPERANDS,
    AttentionOperand,
    OperandAttnProcessor,
    install_operands,
    is_attention,
)
from modiff_quant.bops import count_bops, count_macs
from modiff_quant.layers import QuantizedLayer
from modiff_quant.models import load_model

pytestmark = pytest.mark.usefixtures("no_grad")

STEPS = 12
OPERAND_RULE = """\
version: 1
extends: {base}
rules:
  - match: {match}
    scheme: {scheme}
    a_bits: {bits}
"""
FLOAT_LAYERS = "version: 1\ndefaults: {w_bits: float, a_bits: float}\n"


@pytest.fixture(scope="module")
def unet_and_inputs():
    model = tiny_unet()
    return model, ddim_inputs(model, STEPS)


def operand_recipe(write_recipe, scheme: str, bits: int | str, match: str = "AttentionOperand", base: str = "float"):
    if base == "float":
        write_recipe(FLOAT_LAYERS, "float.yaml")
        base = "float.yaml"
    text = OPERAND_RULE.format(base=base, match=match, scheme=scheme, bits=bits)
    return write_recipe(text, f"operands-{scheme}-{bits}.yaml")


def converted(model, recipe, inputs):
    quantized = mq.prepare(copy.deepcopy(model), recipe)
    with mq.calibrate(quantized):
        for x, t in inputs:
            quantized(x, t)
    return mq.convert(quantized)


def trajectory(model, inputs) -> list[torch.Tensor]:
    with mq.sampling(model):
        return [model(x, t).sample for x, t in inputs]


def error(outputs, reference) -> float:
    return sum(float((got - want).pow(2).mean()) for got, want in zip(outputs, reference, strict=True))


def test_the_operand_processor_computes_diffusers_attention(unet_and_inputs):
    model, inputs = unet_and_inputs
    explicit = copy.deepcopy(model)
    for module in explicit.modules():
        if is_attention(module):
            install_operands(module)
    for x, t in inputs[:3]:
        torch.testing.assert_close(explicit(x, t).sample, model(x, t).sample, rtol=1e-5, atol=1e-5)


def test_the_operand_processor_computes_masked_cross_attention():
    """Text-to-image attention: encoder states as keys and values, a padding mask."""
    from diffusers.models.attention_processor import Attention

    torch.manual_seed(0)
    attention = Attention(query_dim=16, cross_attention_dim=8, heads=2, dim_head=8).eval()
    hidden, context = torch.randn(3, 5, 16), torch.randn(3, 7, 8)
    mask = torch.ones(3, 7)
    mask[1, 4:] = 0  # the second prompt is padded
    expected = attention(hidden, context, attention_mask=mask)
    install_operands(attention)
    torch.testing.assert_close(attention(hidden, context, attention_mask=mask), expected, rtol=1e-5, atol=1e-5)


def test_operands_are_quantized_only_where_a_rule_names_them(unet_and_inputs, write_recipe):
    model, _ = unet_and_inputs
    untouched = mq.prepare(copy.deepcopy(model), "w8a4-modiff")
    assert not any(isinstance(m, AttentionOperand) for m in untouched.modules())
    assert not any(isinstance(m.processor, OperandAttnProcessor) for m in untouched.modules() if is_attention(m))

    recipe = operand_recipe(write_recipe, "plain", 8, match=r"re:.*\.attn_[qk]", base="w8a4-modiff")
    plan = mq.load_recipe(recipe).resolve(model)
    operands = sorted(name for name, layer in plan.layers.items() if not layer.has_weight)
    owners = sorted(name for name, m in model.named_modules() if is_attention(m))
    assert operands == sorted(f"{owner}.{operand}" for owner in owners for operand in ("attn_q", "attn_k"))
    explained = plan.explain()
    assert re.search(rf"{owners[0]}\.attn_q\s+AttentionOperand\s+plain\s+dynamic\s+-\s+8u", explained)
    prepared = mq.prepare(copy.deepcopy(model), recipe)
    attention = prepared.get_submodule(owners[0])
    assert isinstance(attention.processor, OperandAttnProcessor)
    assert all(isinstance(getattr(attention, name), AttentionOperand) for name in OPERANDS)
    kinds = {name: isinstance(getattr(attention, name), QuantizedLayer) for name in OPERANDS}
    assert kinds == {"attn_q": True, "attn_k": True, "attn_probs": False, "attn_v": False}


def test_float_modulated_operands_give_the_float_model(unet_and_inputs, write_recipe):
    model, inputs = unet_and_inputs
    quantized = converted(model, operand_recipe(write_recipe, "modiff", "float"), inputs)
    for got, (x, t) in zip(trajectory(quantized, inputs), inputs, strict=True):
        torch.testing.assert_close(got, model(x, t).sample, rtol=1e-4, atol=1e-5)


def test_modulated_operands_keep_the_error_that_plain_operands_lose(write_recipe):
    """At 4 bits, quantizing each operand's change against its reconstruction (MoDiff) keeps the
    bundled model's trajectory far closer to float than quantizing the operands themselves."""
    model = load_model("digits16")
    inputs = ddim_inputs(model, 50)
    reference = [model(x, t).sample for x, t in inputs]
    errors = {
        scheme: error(trajectory(converted(model, operand_recipe(write_recipe, scheme, 4), inputs), inputs), reference)
        for scheme in ("plain", "modiff")
    }
    assert 0 < errors["modiff"] < errors["plain"] / 2.5, errors


def test_calibrated_operands_are_saved_and_loaded_bit_exact(unet_and_inputs, write_recipe, tmp_path):
    model, inputs = unet_and_inputs
    recipe = operand_recipe(write_recipe, "plain", 8, base="w8a4-plain-ptq4dm")
    quantized = converted(model, recipe, inputs)
    operands = [m for m in quantized.modules() if isinstance(m, AttentionOperand)]
    assert operands and all(m.calibrates and m.frozen for m in operands)
    loaded = mq.load_quantized(tiny_unet(seed=1), mq.save_quantized(quantized, tmp_path / "saved"))
    assert all(torch.equal(a, b) for a, b in zip(trajectory(quantized, inputs), trajectory(loaded, inputs)))


QDIFFUSION_FAST = "{name: qdiffusion, weight_iters: 2, act_iters: 2, calibration_steps: 4, samples_per_step: 2}"


@pytest.mark.parametrize(
    "base",
    [
        "w8a4-modiff",
        "w8a4-modiff-ptq4dm",
        "w8a4-modiff-torchao",
        pytest.param("w8a4-modiff-brevitas", marks=pytest.mark.slow),
        pytest.param("w8a4-modiff-qdiffusion", marks=pytest.mark.slow),
    ],
)
@pytest.mark.parametrize("scheme", ["plain", "modiff"])
def test_every_shipped_base_quantizer_quantizes_the_operands(unet_and_inputs, write_recipe, base, scheme):
    model, inputs = unet_and_inputs
    text = operand_recipe(write_recipe, scheme, 4, base=base).read_text(encoding="utf-8")
    if base.endswith("qdiffusion"):
        text = text.replace("rules:", f"defaults:\n  base_quantizer: {QDIFFUSION_FAST}\nrules:")
    with_operands = converted(model, write_recipe(text, "with-operands.yaml"), inputs)
    operands = [m for m in with_operands.modules() if isinstance(m, QuantizedLayer) and not m.plan.has_weight]
    assert len(operands) == 4 * sum(is_attention(m) for m in model.modules())
    assert all(
        m.frozen and m.plan.settings.base_quantizer == operands[0].plan.settings.base_quantizer for m in operands
    )
    got = trajectory(with_operands, inputs)
    without = trajectory(converted(model, write_recipe(text.split("rules:")[0], "without.yaml"), inputs), inputs)
    assert all(bool(out.isfinite().all()) for out in got)
    assert not all(torch.equal(a, b) for a, b in zip(got, without, strict=True))  # the operands were quantized


@pytest.mark.parametrize(
    ("rule", "message"),
    [
        ("a_bits: 0", "an attention operand cannot be 0-bit"),
        ("a_bits: 0\n    steps: {start: 4}", "an attention operand cannot be 0-bit"),
        ("a_granularity: channel", "an attention operand takes a_granularity tensor or sample, got channel"),
        ("w_bits: 4", "sets w_bits, but matches attention operands only"),
    ],
)
def test_what_an_operand_cannot_do_is_refused_at_its_rule(unet_and_inputs, write_recipe, rule, message):
    model, _ = unet_and_inputs
    path = write_recipe(f"version: 1\nrules:\n  - match: AttentionOperand\n    {rule}\n")
    with pytest.raises(mq.RecipeError, match=rf"recipe\.yaml:\d+: .*{message}"):
        mq.prepare(model, path)
    assert not any(isinstance(m, (AttentionOperand, QuantizedLayer)) for m in model.modules())


def test_products_are_charged_at_the_widths_of_their_operands(unet_and_inputs, write_recipe):
    model, _ = unet_and_inputs
    entries = count_macs(model, torch.zeros(1, 1, 8, 8), torch.tensor(0))
    products = [e for e in entries if e.kind == "attention"]
    assert products and {e.name.rpartition(".")[2] for e in products} == {"qk", "pv"}

    def charged(recipe, key: str = "gbops") -> dict[str, float]:
        """Bits each product is charged at per MAC (nominal, or amortized over 4 steps)."""
        rows = count_bops(entries, mq.load_recipe(recipe).resolve(model), steps=4).per_entry
        macs = {e.name: e.macs for e in products}
        return {row["name"]: row[key] * 1e9 / macs[row["name"]] for row in rows if row["name"] in macs}

    assert set(charged("w8a4-modiff").values()) == {32 * 32}  # no rule names the operands: float
    assert set(charged(operand_recipe(write_recipe, "plain", 6)).values()) == {6 * 6}
    # two modulated operands: the incremental form, each 4-bit increment against a float reconstruction
    modulated = operand_recipe(write_recipe, "modiff", 4)
    assert set(charged(modulated).values()) == {(4 + 4) * 32}
    # amortized: the first step multiplies the float operands themselves
    assert list(charged(modulated, "gbops_amortized").values()) == pytest.approx(
        [(32 * 32 + 3 * 8 * 32) / 4] * len(products)
    )
    half = charged(operand_recipe(write_recipe, "plain", 4, match=r"re:.*\.attn_q"))
    assert {name.rpartition(".")[2]: bits for name, bits in half.items()} == {"qk": 4 * 32, "pv": 32 * 32}
