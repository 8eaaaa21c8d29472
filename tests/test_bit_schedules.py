"""Bit schedules over steps: `steps` rules set a layer's activation bits per step range, each
width with its own activation quantizers (and calibrated scales)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from helpers import tiny_unet
from torch import nn

import modiff_quant as mq
from modiff_quant.bops import PAPER_CONVENTIONS, count_bops, count_macs
from modiff_quant.quant import Granularity, QuantSpec, quantize_minmax

pytestmark = pytest.mark.usefixtures("no_grad")

SCHEDULE = """\
version: 1
defaults:
  a_bits: 4
rules:
  - match: '0'
    a_bits: 8
    steps: {start: 0, stop: 10}
  - match: '0'
    a_bits: 0
    steps: {start: 90}
  - match: '0'
    a_bits: 6
    steps: [5, 95]
"""


def single_linear() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 8))


def test_steps_rules_set_bits_per_step_and_a_skip_is_never_undone(write_recipe):
    plan = mq.load_recipe(write_recipe(SCHEDULE)).resolve(single_linear()).layers["0"]
    assert [plan.a_bits_at(step) for step in (0, 5, 9, 10, 89, 90, 95)] == [8, 6, 8, 4, 4, 0, 0]
    assert plan.activation_widths == (4, 8, 6)
    assert plan.describe_steps() == "90..: 0, 0..9: 8, [5, 95]: 6"
    explained = mq.load_recipe(write_recipe(SCHEDULE)).resolve(single_linear()).explain()
    assert "A by step" in explained and "90..: 0, 0..9: 8, [5, 95]: 6" in explained


def layer_inputs(steps: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    start, drift = torch.randn(4, 16, generator=generator), torch.randn(steps, 4, 16, generator=generator)
    return [start + 0.2 * drift[: k + 1].sum(0) for k in range(steps)]


def run(model: nn.Module, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    with mq.sampling(model):
        return [model(x) for x in inputs]


def test_scheduled_steps_run_at_their_width_and_later_steps_continue_from_their_state(write_recipe):
    """Steps 0-2 at 8 bits equal an all-8-bit run; step 3 is that run's state plus one 3-bit
    modulated update: o_3 = ô_2 + W·Q₃(a_3 − â_2)."""
    inputs = layer_inputs(5)
    scheduled = mq.convert(
        mq.prepare(
            single_linear(),
            write_recipe(
                "version: 1\ndefaults:\n  a_bits: 3\nrules:\n  - match: '0'\n    a_bits: 8\n    steps: {stop: 3}\n"
            ),
        )
    )
    eight = mq.convert(mq.prepare(single_linear(), write_recipe("version: 1\ndefaults:\n  a_bits: 8\n", "w8.yaml")))
    with mq.sampling(eight):
        reference = [eight(x) for x in inputs[:3]]
        (state,) = eight[0].states().values()
        a_hat = state.a_hat.clone()
    outputs = run(scheduled, inputs)
    assert all(torch.equal(o, r) for o, r in zip(outputs[:3], reference))
    spec = QuantSpec(3, False, Granularity("tensor"))  # the library defaults
    expected = reference[2] + F.linear(quantize_minmax(inputs[3] - a_hat, spec), scheduled[0].weight)
    torch.testing.assert_close(outputs[3], expected, rtol=1e-5, atol=1e-6)
    assert not torch.equal(outputs[3], eight(inputs[3]))


def test_each_width_calibrates_its_own_static_scales_on_its_own_steps(write_recipe):
    """Large temporal differences on steps 1-2 (8 bits), small ones later (4 bits): each width's
    frozen range is that of its own steps."""
    generator = torch.Generator().manual_seed(2)
    amplitudes = [0.0, 10.0, 10.0, 0.5, 0.5, 0.5]
    x, inputs = torch.zeros(4, 16), []
    for amplitude in amplitudes:
        x = x + amplitude * torch.randn(4, 16, generator=generator)
        inputs.append(x)
    recipe = write_recipe(
        "version: 1\ndefaults:\n  base_quantizer: static\n  a_bits: 4\n  a_granularity: tensor\n"
        "rules:\n  - match: '0'\n    a_bits: 8\n    steps: {start: 1, stop: 3}\n"
    )
    model = mq.prepare(single_linear(), recipe)
    with mq.calibrate(model):
        run(model, inputs)
    mq.convert(model)
    four, eight = model[0].act_quantizers["delta"]
    range_four = float(four.scale) * four.spec.qmax
    range_eight = float(eight.scale) * eight.spec.qmax
    assert (four.spec.bits, eight.spec.bits) == (4, 8)
    assert range_eight > 8 * range_four, (range_eight, range_four)


def test_a_width_whose_steps_calibration_never_reached_fails_convert_by_name(write_recipe):
    recipe = write_recipe(
        "version: 1\ndefaults:\n  base_quantizer: static\n  a_bits: 4\n  a_granularity: tensor\n"
        "rules:\n  - match: '0'\n    a_bits: 8\n    steps: {start: 50}\n"
    )
    model = mq.prepare(single_linear(), recipe)
    with mq.calibrate(model):
        run(model, layer_inputs(4))
    with pytest.raises(RuntimeError, match=r"0: delta quantizer, a_bits 8 \(its steps of the schedule\): no data"):
        mq.convert(model)


def test_bops_charge_each_step_at_its_scheduled_bits(write_recipe):
    model = tiny_unet()
    entries = count_macs(model, torch.zeros(1, 1, 8, 8), torch.tensor(500))
    recipe = write_recipe(  # the first rule puts the timestep embedding at A4 too
        "version: 1\nextends: w8a4-modiff\nrules:\n  - match: [Conv2d, Linear]\n    a_bits: 4\n"
        "  - match: [Conv2d, Linear]\n    a_bits: 8\n    steps: {start: 0, stop: 5}\n"
    )
    bops = count_bops(entries, mq.load_recipe(recipe).resolve(model), 10, PAPER_CONVENTIONS)  # products as layers
    assert bops.per_step[1] == pytest.approx(2 * bops.per_step[5], rel=1e-9)
    assert bops.gbops_per_step == pytest.approx(bops.per_step[5], rel=1e-9)  # nominal: the layers' a_bits


def test_a_float_step_runs_under_integer_execution(write_recipe):
    """Float steps of a schedule run in float while the other steps run on the int8 kernels."""
    recipe = write_recipe(
        "version: 1\ndefaults:\n  a_bits: 4\n  a_granularity: tensor\n"
        "rules:\n  - match: '0'\n    a_bits: float\n    steps: {start: 1, stop: 3}\n"
    )
    fake = mq.convert(mq.prepare(single_linear(), recipe))
    integer = mq.set_execution(copy.deepcopy(fake), "integer")
    inputs = layer_inputs(6)
    for got, expected in zip(run(integer, inputs), run(fake, inputs)):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_a_scheduled_model_saves_and_loads_bit_exactly(write_recipe, tmp_path):
    recipe = write_recipe(
        "version: 1\ndefaults:\n  base_quantizer: static\n  a_bits: 4\n  a_granularity: tensor\n"
        "rules:\n  - match: '0'\n    a_bits: 8\n    steps: {start: 1, stop: 3}\n"
    )
    model = mq.prepare(single_linear(), recipe)
    inputs = layer_inputs(6)
    with mq.calibrate(model):
        run(model, inputs)
    mq.convert(model)
    mq.save_quantized(model, tmp_path / "saved")
    loaded = mq.load_quantized(single_linear(), tmp_path / "saved")
    assert all(torch.equal(a, b) for a, b in zip(run(loaded, inputs), run(model, inputs)))
