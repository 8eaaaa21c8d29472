"""Bit-operation accounting: the paper's Table 1 on the CIFAR-10 UNet, and every convention."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

import modiff_quant as mq
from modiff_quant.bops import PAPER_CONVENTIONS, BopsConventions, count_bops, count_macs
from modiff_quant.cli import main
from modiff_quant.models import load_model

PAPER_TABLE_1 = {
    (8, 32): 1636,
    (8, 8): 409,
    (8, 6): 307,
    (8, 4): 205,
    (8, 3): 153,
    (4, 8): 204,
}  # GBops per image-step


@pytest.fixture(scope="module")
def cifar():
    model = load_model("cifar10-ddpm")
    return model, count_macs(model, torch.zeros(1, 3, 32, 32), torch.tensor(500))


def _bits(w_bits: int, a_bits: int) -> mq.Recipe:
    recipe = mq.load_recipe("w8a8-modiff")
    return dataclasses.replace(recipe, defaults=recipe.defaults.updated({"w_bits": w_bits, "a_bits": a_bits}))


def test_macs_of_the_cifar_unet_layers_and_attention_matmuls(cifar):
    """113 Conv/Linear layers do 6.054 GMACs per image-step; QKᵀ and softmax·V of the six
    attentions 0.168, one entry per product."""
    _, entries = cifar
    layers = [e for e in entries if e.kind == "layer"]
    attention = {e.name: e for e in entries if e.kind == "attention"}
    assert len(layers) == 113 and sum(e.macs for e in layers) / 1e9 == pytest.approx(6.054, abs=1e-3)
    assert len(attention) == 12 and sum(e.macs for e in attention.values()) / 1e9 == pytest.approx(0.168, abs=1e-3)
    owners = {name.rpartition(".")[0] for name in attention}
    assert set(attention) == {f"{owner}.{product}" for owner in owners for product in ("qk", "pv")}
    assert all(
        attention[f"{owner}.qk"].macs == attention[f"{owner}.pv"].macs for owner in owners
    )  # head dim = value dim
    assert {e.charged_as for e in attention.values()} == {f"{owner}.to_q" for owner in owners}


@pytest.mark.parametrize(("w_bits", "a_bits"), list(PAPER_TABLE_1))
def test_paper_conventions_reproduce_table_1_within_5_percent(cifar, w_bits, a_bits):
    model, entries = cifar
    gbops = count_bops(entries, _bits(w_bits, a_bits).resolve(model), 100, PAPER_CONVENTIONS).gbops_per_step
    assert gbops == pytest.approx(PAPER_TABLE_1[w_bits, a_bits], rel=0.05)
    assert gbops == pytest.approx(6.222 * w_bits * a_bits, rel=1e-3)


def test_conventions_are_explicit(cifar):
    model, entries = cifar
    plan = _bits(8, 8).resolve(model)
    excluded = count_bops(entries, plan, 100, BopsConventions(attention="exclude"))
    floated = count_bops(entries, plan, 100, BopsConventions(attention="float"))
    assert excluded.gbops_per_step == pytest.approx(387.5, abs=0.1)  # the 113-layer count
    assert floated.gbops_per_step == pytest.approx(387.5 + 0.168 * 32 * 32, abs=0.2)
    # by default what runs: no rule quantizes the attention operands, so the products are float
    assert count_bops(entries, plan, 100).gbops_per_step == floated.gbops_per_step
    assert count_bops(entries, None, 10, BopsConventions(float_bits=16)).gbops_per_step == pytest.approx(
        6.222 * 256, rel=1e-3
    )


def test_amortized_counts_the_first_step_and_zero_bit_steps(cifar):
    model, entries = cifar
    w8a8 = count_bops(entries, mq.load_recipe("w8a8-modiff").resolve(model), 100, PAPER_CONVENTIONS)
    assert w8a8.per_step[0] == pytest.approx(6.222 * 8 * 32, rel=1e-3)  # full-precision first step: A32
    assert w8a8.gbops_per_step_amortized == pytest.approx(
        (w8a8.per_step[0] + 99 * w8a8.gbops_per_step) / 100, rel=1e-6
    )
    cached = count_bops(entries, mq.load_recipe("w8a8-modiff-deepcache").resolve(model), 100, PAPER_CONVENTIONS)
    assert cached.gbops_per_step == w8a8.gbops_per_step  # nominal: every layer at its bits
    assert (
        cached.per_step[1] < cached.per_step[2] == pytest.approx(w8a8.gbops_per_step)
    )  # deep blocks skipped on odd steps
    skipped = {row["name"] for row in cached.per_entry if row["zero_steps"] == 50}
    assert {"mid_block.attentions.0.qk", "mid_block.attentions.0.pv"} <= skipped and "conv_in" not in skipped


def test_attention_matmuls_are_counted_with_the_older_bmm_processor(cifar):
    """Processors that call baddbmm/bmm instead of scaled_dot_product_attention count the same."""
    from diffusers.models.attention_processor import Attention, AttnProcessor

    model, entries = cifar
    older = load_model("cifar10-ddpm")
    for module in older.modules():
        if isinstance(module, Attention):
            module.set_processor(AttnProcessor())
    again = count_macs(older, torch.zeros(1, 3, 32, 32), torch.tensor(500))
    assert {(e.name, e.macs) for e in again} == {(e.name, e.macs) for e in entries}


def test_bops_command_writes_per_layer_and_per_step_json(tmp_path):
    out = tmp_path / "bops.json"
    assert (
        main(
            [
                "bops",
                "--model",
                "digits16",
                "--recipe",
                "w8a4-modiff",
                "--steps",
                "20",
                "--bops-attention",
                "float",
                "--json",
                str(out),
            ]
        )
        == 0
    )
    result = json.loads(out.read_text())
    assert result["conventions"] == {"attention": "float", "float_bits": 32}
    assert len(result["per_step"]) == 20 and result["per_step"][0] > result["per_step"][1]
    assert sum(row["gbops"] for row in result["per_layer"]) == pytest.approx(result["gbops_per_step"])
    assert {row["kind"] for row in result["per_layer"]} == {"layer", "attention"}
