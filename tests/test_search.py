"""`modiff-quant search`: sensitivity, greedy allocation under a budget, the recipe it writes."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from helpers import tiny_unet

import modiff_quant as mq
from modiff_quant.bops import DEFAULT_CONVENTIONS, count_bops, count_model_macs
from modiff_quant.cli import main
from modiff_quant.search import (
    SearchError,
    Sensitivity,
    allocate,
    float_trajectory,
    load_cached,
    measure_sensitivity,
    recipe_text,
    searchable_layers,
    uniform_gbops,
)

pytestmark = pytest.mark.usefixtures("no_grad")
STEPS, WIDTHS = 10, (2, 4, 8)


@pytest.fixture(scope="module")
def setting():
    model = tiny_unet()
    plan = mq.load_recipe("w8a8-modiff").resolve(model)
    return model, plan, count_model_macs(model)


def synthetic(plan, sensitive: str) -> Sensitivity:
    """Every layer loses 4x per bit removed; `sensitive` 1000x more than the rest."""
    names = tuple(layer.name for layer in searchable_layers(plan, tiny_unet()))
    errors = np.array([[[4.0 ** (8 - w)] * STEPS for w in WIDTHS] for _ in names]) * 1e-6
    errors[names.index(sensitive)] *= 1000
    return Sensitivity(names, WIDTHS, errors)


def test_allocation_fits_the_budget_keeps_the_sensitive_layer_wide_and_costs_what_bops_counts(setting, tmp_path):
    model, plan, entries = setting
    budget = uniform_gbops(plan, entries, STEPS, 4, DEFAULT_CONVENTIONS, tuple(plan.layers))
    result = allocate(synthetic(plan, "conv_out"), plan, entries, STEPS, 2, budget)
    assert result.found.gbops <= budget
    assert result.found.bits["conv_out"] == (8, 8)  # the last layer to give up bits
    assert min(min(bits) for bits in result.found.bits.values()) == 2
    costs = [gbops for gbops, _ in result.frontier]
    assert costs == sorted(costs, reverse=True) and costs[-1] == pytest.approx(result.uniform[2][0])
    path = tmp_path / "found.yaml"
    path.write_text(recipe_text(result, "w8a8-modiff", budget, "test"), encoding="utf-8")
    counted = count_bops(entries, mq.load_recipe(path).resolve(model), STEPS).gbops_per_step_amortized
    assert counted == pytest.approx(result.found.gbops, rel=1e-9)
    layer = mq.load_recipe(path).resolve(model).layers["conv_in"]
    assert [layer.a_bits_at(step) for step in (1, 6)] == list(result.found.bits["conv_in"])


def test_a_budget_below_the_narrowest_widths_is_refused_and_one_equal_to_it_is_met(setting):
    _, plan, entries = setting
    with pytest.raises(SearchError, match="below .* every searched layer at 2 bits"):
        allocate(synthetic(plan, "conv_out"), plan, entries, STEPS, 2, budget=0.0)
    narrowest = uniform_gbops(plan, entries, STEPS, 2, DEFAULT_CONVENTIONS, tuple(plan.layers))
    result = allocate(synthetic(plan, "conv_out"), plan, entries, STEPS, 2, narrowest)
    assert set(result.found.bits.values()) == {(2, 2)}


def test_sensitivity_ranks_a_layer_quantized_at_fewer_bits_worse(setting):
    model, plan, _ = setting
    trajectory = float_trajectory(model, "ddim", None, 3, 1, seed=0)
    small = mq.load_recipe("w8a8-modiff").resolve(model)
    sensitivity = measure_sensitivity(model, small.recipe, searchable_layers(small, model), (2, 8), trajectory)
    mean = sensitivity.errors[:, :, 1:].mean(axis=2)  # step 0 runs in float (first_step: fp)
    assert bool((mean[:, 0] > mean[:, 1]).all())
    assert sensitivity.errors.shape == (len(plan.layers), 2, 3)


@pytest.mark.slow
def test_search_command_writes_a_recipe_a_plot_and_reuses_its_cache(tmp_path, capsys):
    args = [
        "search",
        "--model",
        "digits16",
        "--budget-recipe",
        "w8a4-modiff",
        "--bits",
        "2",
        "8",
        "--phases",
        "2",
        "--steps",
        "4",
        "--samples",
        "1",
        "--out",
        str(tmp_path / "found.yaml"),
        "--plot",
        str(tmp_path / "frontier.png"),
        "--cache-dir",
        str(tmp_path / "cache"),
    ]
    assert main(args) == 0
    assert "reused" not in capsys.readouterr().out
    assert (tmp_path / "frontier.png").stat().st_size > 0
    assert json.loads((tmp_path / "frontier.json").read_text())["found"]["gbops"] > 0
    assert main(["explain", "--model", "digits16", "--recipe", str(tmp_path / "found.yaml")]) == 0
    assert main(args) == 0
    assert "sensitivity: reused" in capsys.readouterr().out
    (cached,) = (tmp_path / "cache").iterdir()
    cached.write_text('{"format": 1, "layers": [], "widths": [], "errors": "x"}', encoding="utf-8")
    assert main(args) == 2
    assert f"{cached}: not a sensitivity table" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--budget-gbops", "0.001"], "below .* every searched layer at 2 bits"),
        (["--budget-gbops", "9", "--bits", "1", "8"], "--bits: expected widths in 2-16"),
        (["--budget-gbops", "9", "--recipe", "w8a8-modiff-deepcache"], "has steps rules or cached blocks"),
        (["--budget-gbops", "9", "--phases", "500"], "--phases: expected 1 to 100"),
        (["--budget-gbops", "nan"], "--budget-gbops: expected a positive number"),
        (["--budget-gbops", "9", "--recipe", "w8a4-modiff-ptq4dm"], "needs calibration data"),
    ],
)
def test_bad_searches_fail_before_the_sensitivity_pass(options, message, tmp_path, capsys):
    assert main(["search", "--model", "digits16", "--out", str(tmp_path / "r.yaml"), *options]) == 2
    assert re.search(message, capsys.readouterr().err)


def test_a_cached_table_of_another_shape_is_refused(tmp_path):
    path = tmp_path / "table.json"
    path.write_text(json.dumps({"format": 1, "layers": ["a"], "widths": [2], "errors": [[[0.1]]]}), encoding="utf-8")
    assert load_cached(path, ("a",), (2,), 1).errors.shape == (1, 1, 1)
    with pytest.raises(SearchError, match="another search or damaged"):
        load_cached(path, ("a",), (2,), 2)
    with pytest.raises(SearchError, match="not a sensitivity table"):
        path.write_text("[", encoding="utf-8")
        load_cached(path, ("a",), (2,), 1)


@pytest.mark.parametrize("base", ["gptq", "adaround"])
def test_weights_only_reconstruction_is_a_search_base(write_recipe, base):
    """A base recipe whose calibration touches quantized weights alone (with bias correction) can
    be searched: its passes run float weights, which need no data; its measured errors match
    `dynamic`'s, whose activations it shares."""
    model = tiny_unet()
    text = f"version: 1\nextends: w8a8-modiff\ndefaults:\n  base_quantizer: {base}\n  w_bias_correction: true\n"
    plan = mq.load_recipe(write_recipe(text, f"{base}.yaml")).resolve(model)
    layers = searchable_layers(plan, model)
    trajectory = float_trajectory(model, "ddim", None, 3, 2, seed=0)
    measured = measure_sensitivity(model, plan.recipe, layers[:3], (4,), trajectory)
    dynamic = mq.load_recipe("w8a8-modiff")
    reference = measure_sensitivity(
        model, dynamic, searchable_layers(dynamic.resolve(model), model)[:3], (4,), trajectory
    )
    np.testing.assert_allclose(measured.errors, reference.errors, rtol=1e-6)
    with pytest.raises(RuntimeError, match="need calibration data"):  # the recipe itself still does
        mq.convert(mq.prepare(tiny_unet(), plan.recipe))
