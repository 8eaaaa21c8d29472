"""Conformance: every registered base quantizer (the shipped ones and any installed plugin)
honours the contract the schemes and recipes rely on, on a tiny diffusers UNet.

A plugin is tested with its default options; `FAST` only shortens the shipped calibrated
methods' optimisation so the suite stays quick.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from helpers import ddim_inputs, tiny_unet

import modiff_quant as mq
from modiff_quant.layers import QuantizedLayer
from modiff_quant.registry import BASE_QUANTIZERS

FAST = {
    "qdiffusion": "{name: qdiffusion, weight_iters: 10, act_iters: 5, calibration_steps: 8, samples_per_step: 2}",
    "ptq4dm": "{name: ptq4dm, samples: 256, std: 1.0}",
}
"""Options of the shipped calibrated methods for the tests: calibration sees every step of the
test trajectory (the premise of the identity limit) and the optimisation is short."""

CALIBRATED = {"qdiffusion", "ptq4dm", "brevitas"}
"""Base quantizers whose conformance runs calibrate (5-25 s a test on 2 shared cores): the slow tier."""
STEPS = 8
SQNR_FLOOR_DB = 20.0  # torchao's test threshold for its own int8 paths
IDENTITY_LIMIT = 1e-3  # relative error with 16-bit activations and float weights


def recipe(base: str, scheme: str = "modiff", w_bits: int | str = 8, a_bits: int | str = 8, rules: str = "") -> str:
    return (
        f"version: 1\ndefaults:\n  base_quantizer: {FAST.get(base, base)}\n  scheme: {scheme}\n"
        f"  w_bits: {w_bits}\n  a_bits: {a_bits}\n"
        f"  w_granularity: channel\n  a_granularity: tensor\n  a_symmetric: false\n{rules}"
    )


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return tiny_unet()


@pytest.fixture(scope="module")
def inputs(model: torch.nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return ddim_inputs(model, steps=STEPS)


def quantize(model, recipe_path, inputs, cache_dir=None) -> torch.nn.Module:
    """prepare -> calibrate (on the float model's trajectory) -> convert: every base takes it."""
    quantized = mq.prepare(copy.deepcopy(model), recipe_path)
    with mq.calibrate(quantized), torch.no_grad():
        for x, t in inputs:
            quantized(x, t)
    return mq.convert(quantized, cache_dir=cache_dir)


def outputs(model, inputs) -> torch.Tensor:
    with mq.sampling(model), torch.no_grad():
        return float_outputs(model, inputs)


def float_outputs(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return torch.stack([model(x, t).sample for x, t in inputs])


def sqnr_db(reference: torch.Tensor, test: torch.Tensor) -> float:
    return 10 * math.log10(reference.pow(2).sum().item() / (reference - test).pow(2).sum().clamp_min(1e-30).item())


def dequantized_weight(layer: QuantizedLayer) -> torch.Tensor:
    """The weight's values, also for packed tensor subclasses (a Linear applied to the identity)."""
    if not layer.packed:
        return layer.weight.detach()
    return F.linear(torch.eye(layer.in_features), layer.weight).T.detach()


def layers(model) -> list[QuantizedLayer]:
    return [m for m in model.modules() if isinstance(m, QuantizedLayer)]


@pytest.mark.parametrize(
    "base",
    [pytest.param(name, marks=pytest.mark.slow) if name in CALIBRATED else name for name in BASE_QUANTIZERS.names()],
)
class TestBaseQuantizerConformance:
    def test_bits_are_honoured(self, base, model, inputs, write_recipe):
        """W4A4: at most 16 weight levels per output channel (per part of a split layer); an activation
        quantizer's output (per-tensor) takes at most 16 values."""
        quantized = quantize(model, write_recipe(recipe(base, w_bits=4, a_bits=4)), inputs)
        for layer in layers(quantized):
            weight = dequantized_weight(layer)
            parts = (
                [weight]
                if layer.split_at is None
                else weight.split([layer.split_at, weight.shape[1] - layer.split_at], dim=1)
            )
            levels = max(
                len(torch.unique(row)) for part in parts for row in part.flatten(1)
            )  # split parts have scales of their own
            assert levels <= 16, f"{layer.plan.name}: {levels} weight levels in one output channel at w_bits 4"
            quantizer = layer.all_quantizers()[0]
            width = layer.in_features if isinstance(layer, torch.nn.Linear) else layer.in_channels
            shape = (4, width) if isinstance(layer, torch.nn.Linear) else (2, width, 3, 3)
            values = quantizer(torch.randn(shape, generator=torch.Generator().manual_seed(0)))
            parts = (
                [values] if layer.split_at is None else values.split([layer.split_at, width - layer.split_at], dim=1)
            )
            counts = [len(torch.unique(part)) for part in parts]
            assert max(counts) <= 16, f"{layer.plan.name}: activation quantizer gives {counts} values at a_bits 4"

    def test_zero_bit_layer_reuses_its_output_exactly(self, base, model, inputs, write_recipe):
        rules = "rules:\n  - match: mid_block.resnets.0.conv2\n    a_bits: 0\n"
        quantized = quantize(model, write_recipe(recipe(base, rules=rules)), inputs)
        seen: list[torch.Tensor] = []
        layer = dict(quantized.named_modules())["mid_block.resnets.0.conv2"]
        handle = layer.register_forward_hook(lambda module, args, output: seen.append(output.clone()))
        outputs(quantized, inputs)
        handle.remove()
        assert len(seen) == STEPS
        assert all(torch.equal(seen[0], later) for later in seen[1:])

    @pytest.mark.parametrize("scheme", ["plain", "modiff"])
    def test_identity_limit(self, base, model, inputs, write_recipe, scheme):
        """Float weights and 16-bit activations compute the float model."""
        quantized = quantize(model, write_recipe(recipe(base, scheme, w_bits="float", a_bits=16)), inputs)
        reference, test = float_outputs(model, inputs), outputs(quantized, inputs)
        error = ((test - reference).norm() / reference.norm()).item()
        assert error < IDENTITY_LIMIT, f"{base} {scheme}: relative error {error:.2e} at float weights and A16"

    @pytest.mark.parametrize("scheme", ["plain", "modiff"])
    def test_sqnr_floor_at_w8a8(self, base, model, inputs, write_recipe, scheme):
        quantized = quantize(model, write_recipe(recipe(base, scheme)), inputs)
        sqnr = sqnr_db(float_outputs(model, inputs), outputs(quantized, inputs))
        assert sqnr > SQNR_FLOOR_DB, f"{base} {scheme} W8A8: SQNR {sqnr:.1f} dB"

    def test_state_resets_between_runs(self, base, model, inputs, write_recipe):
        quantized = quantize(model, write_recipe(recipe(base, a_bits=6)), inputs)
        first = outputs(quantized, inputs)
        assert mq.api.state_bytes(quantized) == 0  # sampling() reset on exit
        with torch.no_grad():
            quantized(*inputs[0])
        assert mq.api.state_bytes(quantized) > 0
        mq.reset(quantized)
        assert mq.api.state_bytes(quantized) == 0
        assert torch.equal(first, outputs(quantized, inputs))

    def test_save_load_round_trip(self, base, model, inputs, write_recipe, tmp_path):
        """The calibration outcome saved by convert(cache_dir=...) restores a fresh model to the
        same quantized model: bit-identical outputs."""
        path = write_recipe(recipe(base, w_bits=4, a_bits=6))
        saved = quantize(model, path, inputs, cache_dir=tmp_path)
        assert len(list(tmp_path.glob("*.safetensors"))) == 1
        loaded = quantize(model, path, inputs, cache_dir=tmp_path)
        assert torch.equal(outputs(saved, inputs), outputs(loaded, inputs))

    def test_unsupported_settings_fail_at_the_recipe_line(self, base, model, write_recipe):
        """Every bit-width a base refuses is refused when the recipe is resolved, naming the
        layer, the recipe line and the key; a rule that gives a normalisation layer weight bits
        is refused for every base."""
        for bits in (2, 3, 5, 7, 8, 12, 16):
            path = write_recipe(recipe(base, w_bits=bits), name=f"w{bits}.yaml")
            try:
                mq.load_recipe(path).resolve(model)
            except mq.RecipeError as exc:
                assert f"w{bits}.yaml:5" in str(exc) and "layer '" in str(exc) and "w_bits" in str(exc), str(exc)
        rules = "rules:\n  - match: mid_block.resnets.0.norm1\n    w_bits: 4\n"
        with pytest.raises(mq.RecipeError, match=r"recipe.yaml:11: rule 'mid_block.resnets.0.norm1' matches blocks"):
            mq.load_recipe(write_recipe(recipe(base, rules=rules))).resolve(model)
