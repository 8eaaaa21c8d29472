"""Observers calibrate on temporal differences: calibrate() runs the user's loop in float and
each modulated layer shows its delta observer Δ_t = a_t − a_{t+1} (and a_T to the raw observer
under a quantized first step); convert() freezes the parameters."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import ddim_inputs, tiny_unet
from torch import nn

import modiff_quant as mq
from modiff_quant.quant import Granularity, QuantSpec, qparams

pytestmark = pytest.mark.usefixtures("no_grad")

STATIC = (
    "version: 1\ndefaults:\n  base_quantizer: {{name: static, observer: {observer}}}\n"
    "  w_bits: float\n  a_bits: 4\n  a_granularity: tensor\n  scheme: {scheme}\n"
)


def trajectory(steps: int = 12, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    base, drift = torch.randn(4, 16, generator=g) * 3, torch.randn(4, 16, generator=g)
    return [base + 0.1 * k * drift for k in range(steps)]


def calibrated(recipe, runs: list[list[torch.Tensor]]) -> nn.Sequential:
    torch.manual_seed(0)
    model = mq.prepare(nn.Sequential(nn.Linear(16, 8)), recipe)
    with mq.calibrate(model):
        for run in runs:
            mq.reset(model)
            for a in run:
                model(a)
    return model


def frozen(model: nn.Sequential) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Scale and zero point of each activation role after convert()."""
    mq.convert(model)
    return {role: (group[0].scale, group[0].zero_point) for role, group in model[0].act_quantizers.items()}


def expected(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A4 asymmetric min-max parameters of exactly these values."""
    return qparams(values.min().reshape(1), values.max().reshape(1), QuantSpec(4, False, Granularity("tensor")))


def test_delta_observer_sees_temporal_differences(write_recipe):
    """The modiff delta scale comes exactly from the range of a_t − a_{t−1} over the calibration
    runs (not of the raw inputs), and the raw scale from each run's first input only."""
    runs = [trajectory(seed=0), trajectory(seed=1)]
    recipe = write_recipe(STATIC.format(observer="minmax", scheme="modiff") + "  first_step: quantized\n")
    params = frozen(calibrated(recipe, runs))
    deltas = torch.stack([b - a for run in runs for a, b in zip(run, run[1:])])
    firsts = torch.stack([run[0] for run in runs])
    for role, values in (("delta", deltas), ("raw", firsts)):
        for got, want in zip(params[role], expected(values)):
            torch.testing.assert_close(got.reshape(1), want.reshape(1), rtol=0, atol=0)


def test_plain_observer_sees_raw_inputs(write_recipe):
    """Under `plain`, the same observer sees the raw activations of every step."""
    runs = [trajectory()]
    params = frozen(calibrated(write_recipe(STATIC.format(observer="minmax", scheme="plain")), runs))
    for got, want in zip(params["raw"], expected(torch.stack(runs[0]))):
        torch.testing.assert_close(got.reshape(1), want.reshape(1), rtol=0, atol=0)


@pytest.mark.parametrize("observer", ["minmax", "ema_minmax", "mse"])
def test_calibrated_modiff_beats_calibrated_plain(write_recipe, observer):
    """With static scales from the same observer, scales calibrated on differences make MoDiff at
    A4 far more accurate than plain A4 on a held-out trajectory of the same kind."""
    errors = {}
    for scheme in ("plain", "modiff"):
        model = calibrated(
            write_recipe(STATIC.format(observer=observer, scheme=scheme)), [trajectory(seed=s) for s in range(3)]
        )
        mq.convert(model)
        test = trajectory(seed=7)
        reference = [nn.functional.linear(a, model[0].weight, model[0].bias) for a in test]
        with mq.sampling(model):
            outputs = [model(a) for a in test]
        errors[scheme] = sum(float((o - r).norm() / r.norm()) for o, r in zip(outputs[1:], reference[1:])) / (
            len(test) - 1
        )
    assert errors["modiff"] * 5 < errors["plain"], errors


def test_convert_without_calibration_names_the_layer(write_recipe):
    """A calibrated base quantizer that saw no data cannot be converted: the error names the layer
    and what to do."""
    model = mq.prepare(
        nn.Sequential(nn.Linear(16, 8)), write_recipe(STATIC.format(observer="minmax", scheme="modiff"))
    )
    with mq.calibrate(model):
        pass
    with pytest.raises(
        RuntimeError,
        match=r"^1 layer \(0\) needs calibration data .*run the sampling loop inside modiff_quant.calibrate\(model\)",
    ):
        mq.convert(model)


@pytest.mark.slow
def test_calibrating_a_unet_with_cfg_like_calls(write_recipe):
    """Calibration through a diffusers UNet with the L_p-search observer, two branches per step:
    every delta observer gets data, and the converted model runs and stays finite."""
    model = tiny_unet()
    recipe = write_recipe(STATIC.format(observer="mse", scheme="modiff").replace("w_bits: float", "w_bits: 8"))
    quantized = mq.prepare(copy.deepcopy(model), recipe)
    inputs = ddim_inputs(model, steps=8)
    with mq.calibrate(quantized):
        for x, t in inputs:
            quantized(x, t)
            quantized(-x, t)
    delta_quantizers = [m.act_quantizers["delta"][0] for m in quantized.modules() if hasattr(m, "act_quantizers")]
    mq.convert(quantized)
    assert delta_quantizers and all(
        q.observer is None and q.scale is not None for q in delta_quantizers
    )  # statistics released
    with mq.sampling(quantized):
        assert all(torch.isfinite(quantized(x, t).sample).all() for x, t in inputs)


class TimeScaled(nn.Module):
    """A denoiser whose layer input grows with the timestep, as raw activations do with noise."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(16, 8)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.fc(x * (1 + float(t) / 50))


def run_time_scaled(model: nn.Module, timesteps: list[int], seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(reference, output) per call; the reference uses the model's float layer."""
    g = torch.Generator().manual_seed(seed)
    pairs = []
    for t in timesteps:
        x = torch.randn(4, 16, generator=g)
        out = model(x, torch.tensor(t))
        pairs.append((nn.functional.linear(x * (1 + t / 50), model.fc.weight, model.fc.bias), out))
    return pairs


def test_timestep_groups_follow_shifting_ranges(write_recipe):
    """With 4 timestep groups, static plain scales follow the noise level: each group's scale
    differs, and a 50-step run is far more accurate than with one scale for all timesteps, after
    calibrating on 20 steps (groups are keyed by timestep value, not step index)."""
    errors = {}
    for groups in (1, 4):
        recipe = write_recipe(
            STATIC.format(observer="minmax", scheme="plain") + f"  timestep_groups: {groups}\n", f"g{groups}.yaml"
        )
        model = mq.prepare(TimeScaled(), recipe)
        with mq.calibrate(model):
            run_time_scaled(model, list(range(999, 0, -50)), seed=0)
        mq.convert(model)
        with mq.sampling(model):
            pairs = run_time_scaled(model, list(range(999, 0, -20)), seed=1)
        errors[groups] = sum(float((o - r).norm() / r.norm()) for r, o in pairs) / len(pairs)
        scales = [float(q.scale) for q in model.fc.act_quantizers["raw"]]
        assert len(scales) == groups and scales == sorted(scales)
    assert errors[4] * 2 < errors[1], errors


def test_timestep_group_without_calibration_data_names_the_group(write_recipe):
    recipe = write_recipe(STATIC.format(observer="minmax", scheme="plain") + "  timestep_groups: 4\n")
    model = mq.prepare(TimeScaled(), recipe)
    with mq.calibrate(model):
        run_time_scaled(model, [400, 300, 200, 100], seed=0)
    with pytest.raises(
        RuntimeError, match=r"fc: raw quantizer, timestep group 2 \(t in \[500, 750\)\): no data observed"
    ):
        mq.convert(model)


def test_timestep_groups_need_calibrated_scales(write_recipe):
    recipe = write_recipe("version: 1\ndefaults:\n  base_quantizer: dynamic\n  timestep_groups: 4\n")
    with pytest.raises(
        mq.RecipeError,
        match=r"recipe.yaml:4: layer 'fc' \(Linear\): base quantizer 'dynamic' computes scales per call",
    ):
        mq.prepare(TimeScaled(), recipe)


def test_timestep_group_ranges_for_other_timestep_conventions():
    """`{count, range}` covers models whose timesteps are not 0-1000 (e.g. sigmas or t in [0, 1])."""
    from modiff_quant.recipe import TimestepGroups

    groups = TimestepGroups.parse({"count": 4, "range": [0, 1]})
    assert [groups.index(t) for t in (0.0, 0.3, 0.5, 0.99, 1.0, 7.0, -1.0, None)] == [0, 1, 2, 3, 3, 3, 0, 0]
    assert TimestepGroups.parse(2).index(999) == 1
    for bad in (0, -1, True, 2.5, {"count": 2}, {"count": 2, "range": [1, 0]}, {"count": 2, "range": [0, "x"]}):
        with pytest.raises(ValueError, match="group count"):
            TimestepGroups.parse(bad)


@pytest.mark.parametrize("scheme", ["modiff", "plain"])
def test_observers_see_only_the_chosen_steps(write_recipe, monkeypatch, scheme):
    """When a base quantizer picks some steps (here 0, 4 and 8 of 12), `modiff` observers see
    exactly those steps' differences to the step before (step 0 has none) and `plain` ones the
    raw inputs of those steps."""
    from modiff_quant.backends.static import StaticQuantizer

    from modiff_quant.calibration import uniform_steps

    monkeypatch.setattr(StaticQuantizer, "calibration_picks", lambda self, record: uniform_steps(record, 3, 100))
    runs = [trajectory(seed=0), trajectory(seed=1)]
    params = frozen(calibrated(write_recipe(STATIC.format(observer="minmax", scheme=scheme)), runs))
    if scheme == "modiff":
        values, role = torch.stack([run[k] - run[k - 1] for run in runs for k in (4, 8)]), "delta"
    else:
        values, role = torch.stack([run[k] for run in runs for k in (0, 4, 8)]), "raw"
    for got, want in zip(params[role], expected(values)):
        torch.testing.assert_close(got.reshape(1), want.reshape(1), rtol=0, atol=0)


def test_uniform_steps_of_a_short_trajectory_are_all_its_steps():
    """Q-Diffusion asks for 20 steps: a 4-step trajectory gives all 4 (not step 0 four times), a
    10-step one all 10 (not its first half)."""
    from modiff_quant.calibration import CalibrationRecord, uniform_steps

    for length in (1, 4, 10, 20):
        record = CalibrationRecord()
        for step in range(length):
            record.add(0, (0, step), float(999 - step), (torch.zeros(2, 1),), {})
        assert [pick.call.step for pick in uniform_steps(record, 20, 2)] == list(range(length))


@pytest.mark.slow
@pytest.mark.parametrize("steps", [2, 4])
def test_qdiffusion_modiff_calibrates_on_a_few_steps(write_recipe, steps):
    """MoDiff learns from temporal differences, so calibration needs picks after the first step;
    a 2- or 4-step trajectory has them (it used to fail in convert with 'no data observed')."""
    recipe = write_recipe(
        "version: 1\nextends: w8a4-modiff-qdiffusion\ndefaults:\n"
        "  base_quantizer: {name: qdiffusion, weight_iters: 1, act_iters: 1, samples_per_step: 2}\n"
    )
    model = tiny_unet()
    inputs = ddim_inputs(model, steps)
    quantized = mq.prepare(copy.deepcopy(model), recipe)
    with mq.calibrate(quantized):
        for x, t in inputs:
            quantized(x, t)
    mq.convert(quantized)
    with torch.no_grad(), mq.sampling(quantized):
        outputs = [quantized(x, t).sample for x, t in inputs]
    assert all(torch.isfinite(out).all() for out in outputs)


def test_modiff_calibration_on_one_step_says_what_it_needs(write_recipe):
    """A one-step calibration has no temporal difference to observe: a clear error before the
    replay, not 'no data observed' after it."""
    recipe = write_recipe(
        "version: 1\nextends: w8a4-modiff-qdiffusion\ndefaults:\n"
        "  base_quantizer: {name: qdiffusion, weight_iters: 1, act_iters: 1, samples_per_step: 2}\n"
    )
    model = tiny_unet()
    quantized = mq.prepare(copy.deepcopy(model), recipe)
    with mq.calibrate(quantized):
        quantized(*ddim_inputs(model, 1)[0])
    with pytest.raises(
        ValueError,
        match=r"qdiffusion: MoDiff calibrates on temporal differences .* only steps \[0\]: "
        r"record trajectories of 2 or more steps",
    ):
        mq.convert(quantized)
