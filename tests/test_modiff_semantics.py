"""The per-layer semantics of DESIGN §3: identity limit, MoDiff vs plain, error compensation,
first-step policies, bias handling and 0-bit skipping."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import ddim_inputs, tiny_unet
from torch import nn

import modiff_quant as mq
from modiff_quant.trajectory import StaleCacheError

pytestmark = pytest.mark.usefixtures("no_grad")


def outputs_along(model: nn.Module, inputs: list[tuple[torch.Tensor, torch.Tensor]]) -> list[torch.Tensor]:
    if not hasattr(model, "_modiff_tracker"):
        return [model(x, t).sample for x, t in inputs]
    with mq.sampling(model):
        return [model(x, t).sample for x, t in inputs]


def worst_relative_error(reference: list[torch.Tensor], outputs: list[torch.Tensor]) -> float:
    return max(float((o - r).norm() / r.norm()) for r, o in zip(reference, outputs))


@pytest.mark.slow
@pytest.mark.parametrize(
    ("settings", "tolerance"),
    [
        ("w_bits: float\n  a_bits: float", 1e-4),  # identity quantizer: pure modulated float arithmetic
        ("w_bits: 16\n  a_bits: 16\n  a_granularity: sample", 1e-3),  # 16-bit: quantization error near float rounding
    ],
    ids=["identity", "16-bit"],
)
def test_modulated_model_matches_float_over_100_steps(write_recipe, settings, tolerance):
    """Acceptance: with an identity (or 16-bit) quantizer, MoDiff reproduces the float model at
    every step of a 100-step DDIM trajectory (o_t = ô + A(Δ) telescopes to A(a_t) + b)."""
    model = tiny_unet()
    inputs = ddim_inputs(model, steps=100)
    reference = outputs_along(model, inputs)
    recipe = write_recipe(f"version: 1\ndefaults:\n  scheme: modiff\n  {settings}\n")
    quantized = mq.convert(mq.prepare(copy.deepcopy(model), recipe))
    error = worst_relative_error(reference, outputs_along(quantized, inputs))
    assert error < tolerance


def smooth_trajectory(steps: int, shape: tuple[int, ...], seed: int = 0) -> list[torch.Tensor]:
    """Slowly drifting, heavy-tailed inputs: consecutive steps are close, single values are large."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g) ** 3
    directions = torch.randn((3, *shape), generator=g)
    return [
        base + sum(torch.sin(torch.tensor(0.05 * k * (i + 1))) * d for i, d in enumerate(directions)) * 0.3
        for k in range(steps)
    ]


def layer_errors(layer: nn.Module, trajectory: list[torch.Tensor], recipe_text: str, write_recipe) -> float:
    """Mean relative output error of the prepared layer vs the float layer along the trajectory."""
    model = nn.Sequential(copy.deepcopy(layer))
    quantized = mq.convert(mq.prepare(copy.deepcopy(model), write_recipe(recipe_text)))
    errors = []
    with mq.sampling(quantized):
        for a in trajectory:
            reference = model(a)
            errors.append(float((quantized(a) - reference).norm() / reference.norm()))
    return sum(errors[1:]) / (len(errors) - 1)


LAYERS = {
    "linear": (nn.Linear(64, 32), (8, 64)),
    "conv2d": (nn.Conv2d(8, 16, 3, padding=1), (2, 8, 12, 12)),
    "conv1d": (nn.Conv1d(8, 16, 3, padding=1), (2, 8, 20)),
}


@pytest.mark.parametrize("kind", sorted(LAYERS))
def test_modiff_beats_plain_5x_and_compensation_beats_ablation_at_4_bits(kind, write_recipe):
    """Acceptance: on a smooth trajectory at A4, MoDiff's output error is at least 5x smaller than
    plain quantization's, and error compensation beats modulation without it."""
    torch.manual_seed(0)
    layer, shape = LAYERS[kind]
    trajectory = smooth_trajectory(60, shape)
    base = "version: 1\ndefaults:\n  w_bits: float\n  a_bits: 4\n  a_granularity: tensor\n"
    plain = layer_errors(layer, trajectory, base + "  scheme: plain\n", write_recipe)
    modiff = layer_errors(layer, trajectory, base + "  scheme: modiff\n", write_recipe)
    no_ec = layer_errors(layer, trajectory, base + "  scheme: modiff\n  error_compensation: false\n", write_recipe)
    assert modiff * 5 <= plain, (modiff, plain)
    assert modiff < no_ec, (modiff, no_ec)


def single_linear() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 8))


def test_bias_is_added_once(write_recipe):
    """With a constant input every difference is zero, so the output must stay A(a) + b: a bias
    re-added on each step would make it drift by b per step."""
    model = single_linear()
    nn.init.constant_(model[0].bias, 5.0)
    x = torch.randn(4, 16)
    quantized = mq.convert(
        mq.prepare(copy.deepcopy(model), write_recipe("version: 1\ndefaults:\n  a_bits: 4\n  w_bits: float\n"))
    )
    with mq.sampling(quantized):
        outputs = [quantized(x) for _ in range(10)]
    assert all(torch.equal(o, outputs[0]) for o in outputs)
    torch.testing.assert_close(outputs[0], model(x))


@pytest.mark.parametrize("scheme", ["modiff", "plain"])
def test_zero_bit_step_skips_the_layer_and_returns_the_cached_output(write_recipe, scheme):
    """Acceptance: on a 0-bit step the wrapped layer's operation is not run and the output is
    exactly the cached ô; the step after it computes again."""
    model = single_linear()
    recipe = write_recipe(
        f"version: 1\ndefaults:\n  scheme: {scheme}\n  a_bits: 4\n"
        "rules:\n  - match: '0'\n    a_bits: 0\n    steps: [2, 3]\n"
    )
    quantized = mq.convert(mq.prepare(model, recipe))
    layer = quantized[0]
    calls = []
    original = layer.apply_op
    layer.apply_op = lambda x, *, bias: calls.append(1) or original(x, bias=bias)
    inputs = [torch.randn(4, 16) for _ in range(5)]
    with mq.sampling(quantized):
        outputs = []
        for step, x in enumerate(inputs):
            before = len(calls)
            outputs.append(quantized(x))
            assert (len(calls) == before) == (step in (2, 3)), step
    assert torch.equal(outputs[2], outputs[1]) and torch.equal(outputs[3], outputs[1])
    assert not torch.equal(outputs[4], outputs[1])


def test_a_bits_zero_everywhere_is_pure_caching(write_recipe):
    """a_bits: 0 without a schedule: the first call computes, every later call reuses it."""
    quantized = mq.convert(mq.prepare(single_linear(), write_recipe("version: 1\ndefaults:\n  a_bits: 0\n")))
    with mq.sampling(quantized):
        first = quantized(torch.randn(4, 16))
        later = [quantized(torch.randn(4, 16)) for _ in range(3)]
    assert all(torch.equal(o, first) for o in later)


def test_in_place_change_of_a_cached_output_is_detected(write_recipe):
    """MoDiff reuses outputs across steps; a consumer that mutates one must fail loudly, not corrupt ô."""
    quantized = mq.convert(mq.prepare(single_linear(), write_recipe("version: 1\ndefaults:\n  a_bits: 4\n")))
    with mq.sampling(quantized):
        quantized(torch.randn(4, 16)).add_(1.0)
        with pytest.raises(StaleCacheError, match="modified in place"):
            quantized(torch.randn(4, 16))


def test_first_step_policies(write_recipe):
    """fp: the first output is the float layer (quantized weights, float input); quantized: the raw
    input through the raw quantizer; warmup:N: refinement rounds bring it back toward float."""
    model = single_linear()
    x = torch.randn(8, 16) * torch.linspace(0.1, 3.0, 16)
    base = "version: 1\ndefaults:\n  w_bits: float\n  a_bits: 3\n  a_granularity: tensor\n  first_step: "
    first = {}
    for policy in ("fp", "quantized", "warmup:1", "warmup:4"):
        quantized = mq.convert(mq.prepare(copy.deepcopy(model), write_recipe(base + policy + "\n")))
        with mq.sampling(quantized):
            first[policy] = float((quantized(x) - model(x)).norm() / model(x).norm())
    assert first["fp"] < 1e-6
    assert first["quantized"] > 0.05
    assert first["warmup:4"] < first["warmup:1"] < first["quantized"]


def test_quantized_first_step_uses_the_raw_quantizer(write_recipe):
    """`quantized` is exactly A(Q_raw(a)) + b with the base quantizer's raw activation quantizer."""
    model = single_linear()
    quantized = mq.convert(
        mq.prepare(
            copy.deepcopy(model),
            write_recipe("version: 1\ndefaults:\n  w_bits: float\n  a_bits: 4\n  first_step: quantized\n"),
        )
    )
    layer = quantized[0]
    x = torch.randn(4, 16)
    with mq.sampling(quantized):
        out = quantized(x)
    torch.testing.assert_close(out, model[0](layer.act_quantizers["raw"][0](x)), rtol=0, atol=1e-6)


def test_weights_are_quantized_once_at_convert(write_recipe):
    """Calibration sees float weights; convert() quantizes them in place once (W4: at most 16
    levels per output channel), so the state_dict holds one weight per layer."""
    model = single_linear()
    original = model[0].weight.detach().clone()
    quantized = mq.prepare(model, write_recipe("version: 1\ndefaults:\n  w_bits: 4\n  a_bits: 8\n"))
    layer = quantized[0]
    assert torch.equal(layer.weight, original)
    mq.convert(quantized)
    assert not torch.equal(layer.weight, original)
    assert all(len(row.unique()) <= 16 for row in layer.weight)
    assert (layer.weight - original).abs().max() <= original.abs().amax(1).max() / 7 / 2 + 1e-6
    assert isinstance(layer, nn.Linear) and type(layer).__name__ == "QuantLinear"
    assert set(quantized.state_dict()) == {"0.weight", "0.bias"}
