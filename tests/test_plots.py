"""Plots: the data behind the paper's Fig. 1b and Fig. 3 on digits16, FD vs bits from the
benchmark's results, the files `plot` and `eval --out` write, and clear errors on bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from modiff_quant.cli import main
from modiff_quant.evaluate import Harness
from modiff_quant.figure_data import ablation_recipes, default_layers, load_fd_table, record_distributions, step_errors

STEPS = 20


@pytest.fixture(scope="module")
def harness() -> Harness:
    return Harness("digits16", steps=STEPS, samples=8)


def _results(tmp_path, rows: list[dict]) -> str:
    path = tmp_path / "results.json"
    path.write_text(
        json.dumps({"settings": {"steps": 100, "samples": 256}, "fp": {"fd": 22.0}, "rows": rows}), encoding="utf-8"
    )
    return str(path)


def _row(base: str, scheme: str, w_bits: int, a_bits: int, fd: float) -> dict:
    return {"base": base, "scheme": scheme, "w_bits": w_bits, "a_bits": a_bits, "fd": fd, "psnr_vs_fp": 30.0}


def _assert_png(path) -> None:
    assert path.stat().st_size > 0
    with Image.open(path) as image:
        assert image.format == "PNG" and image.width > 300 and image.height > 200
        image.verify()


def test_temporal_differences_are_much_narrower_than_inputs(harness):
    """The premise of MoDiff (Fig. 1b), measured: even at 20 steps the difference of adjacent
    steps has a small fraction of the input's spread (measured 0.11-0.24), in every default layer."""
    distributions = record_distributions(harness, samples=4)
    assert (
        [d.name for d in distributions]
        == default_layers(harness.model)
        == ["down_blocks.0.resnets.0.conv1", "mid_block.attentions.0.to_q", "up_blocks.2.resnets.1.conv2"]
    )
    for layer in distributions:
        assert layer.std_ratio < 0.35, layer.name
        assert layer.diff.absmax < layer.raw.absmax
        assert layer.diff.count * STEPS == layer.raw.count * (STEPS - 1)  # every step but the first has a predecessor
        edges, raw, diff = layer.histogram()
        assert (
            len(edges) == len(raw) + 1
            and np.sum(raw * np.diff(edges)) == pytest.approx(1)
            and np.sum(diff * np.diff(edges)) == pytest.approx(1)
        )


@pytest.mark.slow
def test_step_error_curves_order_plain_no_compensation_and_modiff(harness):
    """Fig. 3 at W8A4: one value per step; MoDiff's error is below plain's and below MoDiff
    without error compensation, which starts equal (same full-precision first step) and drifts."""
    errors = step_errors(harness, "w8a4-modiff")
    curves = errors.curves
    assert list(curves) == ["plain", "MoDiff w/o error compensation", "MoDiff"]
    assert all(len(curve) == STEPS for curve in curves.values())
    mean = {label: float(np.mean(curve)) for label, curve in curves.items()}
    assert mean["MoDiff"] * 2 < mean["plain"] and mean["MoDiff"] < mean["MoDiff w/o error compensation"]
    assert (
        curves["MoDiff"][0] == pytest.approx(curves["MoDiff w/o error compensation"][0])
        and curves["MoDiff"][0] < curves["plain"][0] / 10
    )
    assert mean["MoDiff"] == pytest.approx(
        errors.metrics["MoDiff"]["eps_rel_error"]
    )  # the harness's metric is the curve's mean


def test_ablation_overrides_rules_that_set_the_ablated_settings(write_recipe, harness):
    """A rule that turns compensation off (or sets a scheme) must not leak into another variant."""
    path = write_recipe(
        "version: 1\nextends: w8a4-modiff\nrules:\n"
        "  - match: conv_in\n    error_compensation: false\n    scheme: plain\n"
    )
    variants = ablation_recipes(path)
    settings = {label: recipe.resolve(harness.model).layers["conv_in"].settings for label, recipe in variants.items()}
    assert settings["plain"].scheme == "plain"
    assert (settings["MoDiff"].scheme, settings["MoDiff"].error_compensation) == ("modiff", True)
    assert (
        settings["MoDiff w/o error compensation"].scheme,
        settings["MoDiff w/o error compensation"].error_compensation,
    ) == ("modiff", False)
    assert variants["MoDiff"].defaults.a_bits == 4 and variants["MoDiff"].name == "recipe (MoDiff)"


@pytest.mark.slow
def test_plot_command_writes_the_three_figures_with_their_data(tmp_path):
    results = _results(
        tmp_path,
        [
            _row(base, scheme, w, a, fd)
            for base in ("dynamic", "qdiffusion")
            for scheme, fd in (("plain", 300.0), ("modiff", 30.0))
            for w, a in ((8, 3), (8, 4), (4, 4))
        ],
    )
    small = ["--model", "digits16", "--steps", "10", "--samples", "4", "--out", str(tmp_path)]
    assert main(["plot", "distributions", *small, "--layers", "conv_in", "up_blocks.1.attentions.0.to_v"]) == 0
    assert main(["plot", "step-error", *small]) == 0
    assert main(["plot", "fd-vs-bits", "--results", results, "--out", str(tmp_path)]) == 0
    for name in ("fig1b-distributions", "fig3-step-error", "fd-vs-bits"):
        _assert_png(tmp_path / f"{name}.png")
    distributions = json.loads((tmp_path / "fig1b-distributions.json").read_text())
    assert [layer["name"] for layer in distributions["layers"]] == ["conv_in", "up_blocks.1.attentions.0.to_v"]
    step_error = json.loads((tmp_path / "fig3-step-error.json").read_text())
    assert len(step_error["timesteps"]) == 10 and all(len(curve) == 10 for curve in step_error["curves"].values())
    assert "W8A4" in step_error["title"] and "10 steps" in step_error["title"]
    fd = json.loads((tmp_path / "fd-vs-bits.json").read_text())
    assert (
        fd["fd"]["dynamic"] == {"plain": {"3": 300.0, "4": 300.0}, "modiff": {"3": 30.0, "4": 30.0}}
        and fd["fp_fd"] == 22.0
    )  # W4 rows left out


@pytest.mark.slow
def test_eval_out_adds_the_step_error_and_distribution_plots_to_its_report(tmp_path):
    result = tmp_path / "result.json"
    assert (
        main(
            [
                "eval",
                "--model",
                "digits16",
                "--recipe",
                "w8a4-modiff",
                "--steps",
                "10",
                "--samples",
                "4",
                "--json",
                str(result),
                "--out",
                str(tmp_path),
            ]
        )
        == 0
    )
    for name in ("step-error.png", "distributions.png"):
        _assert_png(tmp_path / name)
        assert f"]({name})" in (tmp_path / "report.md").read_text()
    curve = json.loads((tmp_path / "step-error.json").read_text())["curves"]["w8a4-modiff"]
    assert len(curve) == 10 and np.mean(curve) == pytest.approx(json.loads(result.read_text())["eps_rel_error"])


def test_fd_table_reads_the_benchmark_rows_at_one_weight_width(tmp_path):
    path = Path(
        _results(
            tmp_path,
            [
                _row("ptq4dm", "modiff", 8, 6, 21.0),
                _row("ptq4dm", "modiff", 8, 3, 41.0),
                _row("ptq4dm", "plain", 4, 4, 335.0),
            ],
        )
    )
    table = load_fd_table(path)
    assert table.fd == {"ptq4dm": {"modiff": {3: 41.0, 6: 21.0}}} and list(table.fd["ptq4dm"]["modiff"]) == [3, 6]
    assert table.fp_fd == 22.0 and table.settings["samples"] == 256
    assert load_fd_table(path, w_bits=4).fd == {"ptq4dm": {"plain": {4: 335.0}}}


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ([_row("dynamic", "plain", 4, 4, 107.0)], "no rows with w_bits 8 and an FD"),
        ([{"base": "dynamic", "scheme": "plain", "w_bits": 8, "fd": 91.0}], "row 0 lacks a_bits"),
    ],
)
def test_results_without_the_needed_rows_are_clear_errors(tmp_path, capsys, rows, message):
    assert main(["plot", "fd-vs-bits", "--results", _results(tmp_path, rows), "--out", str(tmp_path)]) == 2
    assert message in capsys.readouterr().err


def test_missing_results_file_and_unknown_layer_are_named(tmp_path, capsys, harness):
    assert main(["plot", "fd-vs-bits", "--results", str(tmp_path / "nowhere.json"), "--out", str(tmp_path)]) == 2
    assert "nowhere.json' not found" in capsys.readouterr().err
    with pytest.raises(
        ValueError,
        match=r"'down_blocks.0.resnet.0.conv1' is not a Linear/Conv layer of the model; "
        r"did you mean 'down_blocks.0.resnets.0.conv1'",
    ):
        record_distributions(harness, ["down_blocks.0.resnet.0.conv1"])
    assert main(["plot", "distributions", "--layers", "mid_block.attentions.0.to_qq", "--out", str(tmp_path)]) == 2
    assert "did you mean 'mid_block.attentions.0.to_q'" in capsys.readouterr().err
    assert not list(tmp_path.glob("*.png"))


def test_importing_the_package_does_not_import_matplotlib():
    code = "import sys, modiff_quant, modiff_quant.cli; assert 'matplotlib' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
