"""The Q-Diffusion and PTQ4DM base quantizers: calibration sets, AdaRound, shortcut split,
calibration cache, and MoDiff on top of each."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from helpers import ddim_inputs, tiny_unet

import modiff_quant as mq
from modiff_quant.calibration import (
    CalibrationRecord,
    draw_ndtc_timesteps,
    ndtc,
    uniform_steps,
)
from modiff_quant.calibration.concat import detect_concat_inputs
from modiff_quant.layers import QuantizedLayer
from modiff_quant.models import load_model

FAST_QDIFFUSION = "{name: qdiffusion, weight_iters: 60, act_iters: 30, calibration_steps: 4, samples_per_step: 4}"


def recipe_text(base: str, scheme: str = "modiff", w_bits: int = 4, a_bits: int | str = 4, extra: str = "") -> str:
    return (
        f"version: 1\ndefaults:\n  base_quantizer: {base}\n  scheme: {scheme}\n"
        f"  w_bits: {w_bits}\n  a_bits: {a_bits}\n"
        f"  a_granularity: tensor\n  w_granularity: channel\n{extra}"
    )


def record_of(steps: int, trajectories: int = 2, rows: int = 3) -> CalibrationRecord:
    """A record of DDIM-like calls: timesteps 999 → 0 in `steps` steps."""
    record = CalibrationRecord()
    timesteps = torch.linspace(999, 0, steps).round()
    for trajectory in range(trajectories):
        for step, t in enumerate(timesteps):
            record.add(trajectory, (0, step), float(t), (torch.full((rows, 2), float(step)), t), {})
    return record


def quantize(model: torch.nn.Module, recipe, inputs, cache_dir=None) -> torch.nn.Module:
    quantized = mq.prepare(copy.deepcopy(model), recipe)
    with mq.calibrate(quantized), torch.no_grad():
        for x, t in inputs:
            quantized(x, t)
    return mq.convert(quantized, cache_dir=cache_dir)


def sample_outputs(model: torch.nn.Module, inputs) -> list[torch.Tensor]:
    with mq.sampling(model), torch.no_grad():
        return [model(x, t).sample for x, t in inputs]


def test_uniform_steps_spread_over_the_trajectory():
    """Q-Diffusion's set: 20 of 100 steps are 0, 5, ..., 95, with at most n rows per step."""
    picks = uniform_steps(record_of(100), steps=20, samples_per_step=4)
    assert sorted({p.call.step for p in picks}) == list(range(0, 100, 5))
    per_step = {}
    for pick in picks:
        per_step[pick.call.step] = per_step.get(pick.call.step, 0) + len(pick.rows)
    assert set(per_step.values()) == {4}  # 3 rows of the first trajectory, 1 of the second


def test_ndtc_timesteps_follow_their_normal_distribution():
    """t = ⌊N(μT, σT)⌋ clamped to [0, T−1]: the histogram in 10 bins matches the distribution's
    probabilities (the clamped tails land in the end bins)."""
    mean, std, total, count = 0.4, 0.4, 1000, 40_000
    t = draw_ndtc_timesteps(count, mean, std, total, seed=3)
    assert t.min() >= 0 and t.max() <= total - 1
    histogram = torch.histc(t.double(), bins=10, min=0, max=total) / count

    def cdf(x: float) -> float:
        return 0.5 * (1 + math.erf((x / total - mean) / (std * math.sqrt(2))))

    edges = [0.0, *[100.0 * i for i in range(1, 10)], math.inf]
    expected = torch.tensor(
        [cdf(hi) - (0.0 if i == 0 else cdf(lo)) for i, (lo, hi) in enumerate(zip(edges, edges[1:]))],
        dtype=torch.float64,
    )
    torch.testing.assert_close(histogram, expected, atol=0.006, rtol=0)


def test_ndtc_picks_nearest_steps_with_their_true_timesteps():
    """Each draw takes a recorded chain at the step whose timestep is nearest (paper semantics:
    the sample and its label agree), rows spread over the chains."""
    record = record_of(50, trajectories=2, rows=3)
    picks = ndtc(record, samples=600, mean=0.3, std=0.2, num_train_timesteps=1000, seed=0)
    assert sum(len(p.rows) for p in picks) == 600
    grid = sorted({c.timestep for c in record.calls})
    draws = draw_ndtc_timesteps(600, 0.3, 0.2, 1000, seed=0).tolist()
    nearest = sorted(min(grid, key=lambda g: (abs(g - t), -g)) for t in draws)  # ties: the earlier step
    assert sorted(p.call.timestep for p in picks for _ in p.rows) == nearest
    assert {(p.call.trajectory, int(r)) for p in picks for r in p.rows} == {
        (tr, r) for tr in range(2) for r in range(3)
    }


def test_shortcut_split_finds_the_concatenating_convolutions_of_the_cifar10_unet():
    """Exactly the 12 up-path skip convolutions consume a concatenation; the split is at the
    channels of the upsampled path."""
    model = load_model("cifar10-ddpm")
    found = detect_concat_inputs(model, (torch.randn(1, 3, 32, 32), torch.tensor(500)))
    expected = {f"up_blocks.{i}.resnets.{j}.conv_shortcut" for i in range(4) for j in range(3)}
    assert set(found) == expected
    for name, split in found.items():
        conv = model.get_submodule(name)
        assert 0 < split < conv.in_channels
    assert found["up_blocks.0.resnets.0.conv_shortcut"] == 256 and found["up_blocks.3.resnets.2.conv_shortcut"] == 128


@pytest.mark.slow
def test_qdiffusion_splits_by_default_and_a_rule_turns_it_off(write_recipe):
    model = tiny_unet()
    inputs = ddim_inputs(model, steps=6)
    expected = set(detect_concat_inputs(model, inputs[0]))
    assert expected
    split = quantize(model, write_recipe(recipe_text(FAST_QDIFFUSION)), inputs)
    assert {
        m.plan.name for m in split.modules() if isinstance(m, QuantizedLayer) and m.split_at is not None
    } == expected
    off = quantize(
        model,
        write_recipe(
            recipe_text(FAST_QDIFFUSION, extra="rules:\n  - match: re:.*conv_shortcut\n    split: false\n"), "off.yaml"
        ),
        inputs,
    )
    assert all(m.split_at is None for m in off.modules() if isinstance(m, QuantizedLayer))


@pytest.mark.slow
def test_split_quantizers_quantize_each_part_on_its_own_scale(write_recipe):
    """A split layer's two input parts get different static scales and the quantized model runs."""
    model = tiny_unet()
    inputs = ddim_inputs(model, steps=6)
    quantized = quantize(model, write_recipe(recipe_text(FAST_QDIFFUSION, scheme="plain")), inputs)
    layer = next(m for m in quantized.modules() if isinstance(m, QuantizedLayer) and m.split_at is not None)
    quantizer = layer.act_quantizers["raw"][0]
    assert quantizer.first.scale is not None and quantizer.second.scale is not None
    assert not torch.equal(quantizer.first.scale, quantizer.second.scale)
    assert all(torch.isfinite(o).all() for o in sample_outputs(quantized, inputs))


@pytest.mark.slow
def test_adaround_rounding_converges_and_beats_nearest(write_recipe):
    """After reconstruction almost every rounding variable is decided (h(V) within 1e-3 of 0 or 1;
    the rest is rounded at V ≥ 0) and, on the calibration data, the learned rounding
    reconstructs each unit at least as well as rounding to nearest."""
    model = tiny_unet()
    inputs = ddim_inputs(model, steps=6)
    recipe = write_recipe(
        recipe_text(
            "{name: qdiffusion, weight_iters: 300, act_iters: 0, calibration_steps: 3, samples_per_step: 8}", a_bits=8
        )
    )
    quantized = quantize(model, recipe, inputs)
    log = next(
        m.base_quantizer.log for m in quantized.modules() if isinstance(m, QuantizedLayer) and m.base_quantizer.log
    )
    weights = [entry for entry in log if entry["phase"] == "weights"]
    assert len(weights) >= 5
    assert max(entry["undecided"] for entry in weights) < 0.1  # of h(V), within 1e-3 of neither 0 nor 1
    assert sum(entry["undecided"] for entry in weights) / len(weights) < 0.02
    assert all(entry["loss"] <= entry["loss_nearest"] * 1.05 for entry in weights), weights
    assert sum(entry["loss"] for entry in weights) < sum(entry["loss_nearest"] for entry in weights)


@pytest.mark.slow
@pytest.mark.parametrize("base", [FAST_QDIFFUSION, "{name: ptq4dm, samples: 64}"])
def test_modiff_improves_the_base_quantizer_at_a4(write_recipe, base):
    """On the bundled model's 50-step DDIM trajectories, MoDiff over each base quantizer tracks
    the float model's ε predictions far better than the base quantizer alone at W8A4."""
    model = load_model("digits16")
    calibration, held_out = (
        ddim_inputs(model, steps=50, batch=4, seed=1),
        ddim_inputs(model, steps=50, batch=4, seed=2),
    )
    reference = sample_outputs_float(model, held_out)
    errors = {}
    for scheme in ("plain", "modiff"):
        quantized = quantize(
            model, write_recipe(recipe_text(base, scheme=scheme, w_bits=8), f"{scheme}.yaml"), calibration
        )
        outputs = sample_outputs(quantized, held_out)
        errors[scheme] = sum(float((o - r).norm() / r.norm()) for o, r in zip(outputs[1:], reference[1:])) / (
            len(outputs) - 1
        )
    assert errors["modiff"] * 2 < errors["plain"], errors


def sample_outputs_float(model: torch.nn.Module, inputs) -> list[torch.Tensor]:
    with torch.no_grad():
        return [model(x, t).sample for x, t in inputs]


@pytest.mark.slow
def test_calibration_cache_round_trips(write_recipe, tmp_path, monkeypatch):
    """The second convert with the same model, recipe and calibration data loads the first one's
    outcome (no reconstruction runs) and samples bit-identically; other data misses the cache."""
    from modiff_quant.backends.qdiffusion import QDiffusionQuantizer

    model = tiny_unet()
    inputs = ddim_inputs(model, steps=6)
    recipe = write_recipe(recipe_text(FAST_QDIFFUSION))
    first = quantize(model, recipe, inputs, cache_dir=tmp_path)
    assert len(list(tmp_path.glob("*.safetensors"))) == 1

    def refuse(*_):
        raise AssertionError("reconstruction ran despite a cached calibration")

    monkeypatch.setattr(QDiffusionQuantizer, "reconstruct", refuse)
    second = quantize(model, recipe, inputs, cache_dir=tmp_path)
    for a, b in zip(sample_outputs(first, inputs), sample_outputs(second, inputs)):
        assert torch.equal(a, b)
    with pytest.raises(AssertionError, match="reconstruction ran"):
        quantize(model, recipe, ddim_inputs(model, steps=6, seed=5), cache_dir=tmp_path)


@pytest.mark.slow
def test_a_damaged_calibration_cache_is_a_warned_miss(write_recipe, tmp_path):
    """A cache file that is truncated, or whose scale was tampered with, is checked in full before
    any layer takes it: a warning, a fresh calibration, and the same outputs as a clean run."""
    from safetensors.torch import load_file, save_file

    model = tiny_unet()
    inputs = ddim_inputs(model, steps=6)
    recipe = write_recipe(recipe_text("{name: static, observer: minmax}"))
    clean = sample_outputs(quantize(model, recipe, inputs, cache_dir=tmp_path), inputs)
    (path,) = tmp_path.glob("*.safetensors")
    tensors = load_file(path)
    key = next(k for k in tensors if k.endswith(".scale"))
    save_file({**tensors, key: -tensors[key]}, path)
    damages = {"negative scale": path.read_bytes(), "truncated": path.read_bytes()[:100]}
    for damage, content in damages.items():
        path.write_bytes(content)
        with pytest.warns(RuntimeWarning, match=r"calibration cache .* is damaged .*calibrating again"):
            again = quantize(model, recipe, inputs, cache_dir=tmp_path)
        assert all(torch.equal(a, b) for a, b in zip(sample_outputs(again, inputs), clean)), damage


def test_base_quantizer_options_are_validated_at_load(write_recipe):
    with pytest.raises(
        mq.RecipeError, match=r"recipe.yaml:3: base quantizer 'qdiffusion' rejects its options .*weight_iterz"
    ):
        mq.load_recipe(write_recipe(recipe_text("{name: qdiffusion, weight_iterz: 5}")))
    with pytest.raises(mq.RecipeError, match=r"ptq4dm.yaml:3: base quantizer 'ptq4dm' rejects its options .*std > 0"):
        mq.load_recipe(write_recipe(recipe_text("{name: ptq4dm, std: 0}"), "ptq4dm.yaml"))


def test_dynamic_split_needs_calibration(write_recipe):
    """A split requested for a base quantizer without calibration still needs one recorded call
    to find the concatenations: convert() says so instead of silently not splitting."""
    quantized = mq.prepare(tiny_unet(), write_recipe(recipe_text("dynamic", extra="  split: true\n")))
    with pytest.raises(
        RuntimeError,
        match=r"needs? calibration data \(static scales, a reconstruction, a bias correction or a shortcut split to "
        r"detect\)",
    ):
        mq.convert(quantized)


@pytest.mark.slow
def test_adaround_runs_with_float_activations(write_recipe):
    """Weight-only Q-Diffusion (float activations, no static scale anywhere) still needs and
    uses calibration data: its weights are reconstructed."""
    model = tiny_unet()
    recipe = write_recipe(
        recipe_text(
            "{name: qdiffusion, weight_iters: 5, act_iters: 5, calibration_steps: 2, samples_per_step: 2}",
            a_bits="float",
        )
    )
    with pytest.raises(RuntimeError, match="needs? calibration data"):
        mq.convert(mq.prepare(copy.deepcopy(model), recipe))
    quantized = quantize(model, recipe, ddim_inputs(model, steps=4))
    log = next(
        m.base_quantizer.log for m in quantized.modules() if isinstance(m, QuantizedLayer) and m.base_quantizer.log
    )
    assert {entry["phase"] for entry in log} == {"weights"}


@pytest.mark.parametrize("bits", [4, 8])
def test_dynamic_mse_weight_search_beats_min_max_scales(bits, write_recipe):
    """`weight_observer: mse` searches each output channel's clipping range: on heavy-tailed
    weights its squared error is at most min-max scaling's in every channel (min-max is one of
    the candidates) and below it in total, by a fifth at 4 bits."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(256, 16))
    with torch.no_grad():
        model[0].weight.copy_(torch.distributions.StudentT(2.0).sample(model[0].weight.shape))
    float_weight = model[0].weight.detach().clone()
    errors = {}
    for observer in ("minmax", "mse"):
        recipe = write_recipe(
            f"version: 1\ndefaults:\n  base_quantizer: {{name: dynamic, weight_observer: {observer}}}\n"
            f"  w_bits: {bits}\n  a_bits: float\n",
            f"{observer}.yaml",
        )
        quantized = mq.convert(mq.prepare(copy.deepcopy(model), recipe))
        errors[observer] = (quantized[0].weight.detach() - float_weight).pow(2).sum(dim=1)
    assert bool((errors["mse"] <= errors["minmax"]).all()), errors
    assert float(errors["mse"].sum() / errors["minmax"].sum()) < {4: 0.8, 8: 1.0}[bits]


def test_dynamic_weight_observer_is_validated_at_load(write_recipe):
    with pytest.raises(mq.RecipeError, match=r"recipe.yaml:3: .*unknown observer 'mes'.*mse"):
        mq.load_recipe(write_recipe(recipe_text("{name: dynamic, weight_observer: mes}")))


@pytest.mark.slow
def test_adaround_weights_with_dynamic_activations(write_recipe):
    """`adaround` keeps dynamic activation quantizers (nothing static is calibrated), learns W4
    rounding that reconstructs every unit at least as well as nearest rounding, and tracks the
    float model's ε on held-out inputs better than `dynamic` with the same grid; it needs
    calibration data, and its weights run on the integer kernels."""
    fast = "{name: adaround, iters: 200, calibration_steps: 3, samples_per_step: 8}"
    log = weights_only_log(write_recipe, fast)
    assert len(log) >= 5 and all(entry["loss"] <= entry["loss_nearest"] * 1.05 for entry in log), log
    assert sum(entry["loss"] for entry in log) < 0.9 * sum(entry["loss_nearest"] for entry in log)


def weights_only_log(write_recipe, base: str) -> list[dict]:
    """Checks a weights-only calibrated base quantizer (`base`, W4A8 MoDiff on the tiny UNet):
    convert() without calibration data refuses; with it, every activation quantizer stays
    dynamic, the model tracks the float model's ε on held-out inputs at least 10 % better than
    `dynamic` on the same grid, and its weights run on the integer kernels where they are
    available. Returns the base quantizer's log."""
    from modiff_quant.base_quantizer import DynamicActivationQuantizer
    from modiff_quant.integer_kernels import unavailable_reason

    model = tiny_unet()
    calibration, held_out = ddim_inputs(model, steps=6, seed=1), ddim_inputs(model, steps=6, seed=2)
    recipe = write_recipe(recipe_text(base, a_bits=8), "weights-only.yaml")
    with pytest.raises(RuntimeError, match="need calibration data .static scales, a reconstruction"):
        mq.convert(mq.prepare(copy.deepcopy(model), recipe))
    learned = quantize(model, recipe, calibration)
    layers = [m for m in learned.modules() if isinstance(m, QuantizedLayer)]
    assert all(isinstance(q, DynamicActivationQuantizer) for m in layers for q in m.all_quantizers())
    reference = sample_outputs_float(model, held_out)

    def error(quantized: torch.nn.Module) -> float:
        outputs = sample_outputs(quantized, held_out)
        return sum(float((o - r).norm() / r.norm()) for o, r in zip(outputs, reference)) / len(outputs)

    assert error(learned) < 0.9 * error(quantize(model, write_recipe(recipe_text("dynamic", a_bits=8)), []))
    if unavailable_reason() is None:
        mq.set_execution(learned, "integer")
        assert all(m.integer is not None for m in layers)
    return next(m.base_quantizer.log for m in layers if m.base_quantizer.log)
