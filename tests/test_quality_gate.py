"""The quality gate as a product feature, and the project's own CI gate on digits16.

The project's baselines (tests/baselines/digits16.yaml) record FD, FD-to-FP and PSNR-vs-FP for
full precision and W8A8 / W8A4 / W8A3 plain vs MoDiff (dynamic scales), W8A4 plain vs MoDiff
over PTQ4DM and Q-Diffusion, W8A4 with quantized attention products (8-bit plain operands; 4-bit
plain vs modulated operands), W8A2 MoDiff with and without a 4-bit start (a bit schedule), and
a `search` result at W8A3 MoDiff's GBops.
They compare plain with MoDiff so that a collapse of the baseline is asserted too: a broken
MoDiff fails CI; and W8A4 with W8A8 MoDiff, so that quantization silently switched off (which
only improves every metric) fails too.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
import yaml

from modiff_quant import atomic_files, gate
from modiff_quant.cli import main

BASELINE = Path(__file__).parent / "baselines" / "digits16.yaml"


def _gate_parts() -> dict[str, list[str]]:
    """The baseline's settings in the fewest parts that keep every comparison inside one part."""
    baselines = yaml.safe_load(BASELINE.read_text(encoding="utf-8"))
    part = {name: name for name in baselines["settings"]}
    for comparison in baselines.get("comparisons", []):
        worse, better = part[comparison["worse"]], part[comparison["better"]]
        part = {name: worse if owner == better else owner for name, owner in part.items()}
    parts: dict[str, list[str]] = {}
    for name, owner in part.items():
        parts.setdefault(owner, []).append(name)
    calibrated = ("qdiffusion", "adaround", "ptq4dm", "gptq")  # their calibration makes these parts the longest: first
    ordered = sorted(parts.values(), key=lambda names: [not any(c in n for n in names) for c in calibrated])
    return {"+".join(names): names for names in ordered}


@pytest.mark.slow
@pytest.mark.parametrize("part", list(_gate_parts()))
def test_project_quality_gate_passes(part, tmp_path, capsys):
    """The project's gate in parts (settings compared with each other stay together), so that the
    test workers share it out; each part samples the same full-precision reference (the
    baseline's defaults fix noise and sampler)."""
    baselines = yaml.safe_load(BASELINE.read_text(encoding="utf-8"))
    names = _gate_parts()[part]
    one = {
        **baselines,
        "settings": {
            name: {
                **baselines["settings"][name],
                "recipe": gate.recipe_beside(baselines["settings"][name].get("recipe"), BASELINE),
            }
            for name in names
        },
        "comparisons": [c for c in baselines.get("comparisons", []) if c["worse"] in names],
    }
    (tmp_path / "baseline.yaml").write_text(yaml.safe_dump(one, sort_keys=False), encoding="utf-8")
    assert main(["gate", "--baseline", str(tmp_path / "baseline.yaml")]) == 0, capsys.readouterr().out
    out = capsys.readouterr().out
    assert "quality gate passed" in out and "FAIL" not in out


def test_recipe_files_of_a_baselines_file_are_found_next_to_it(tmp_path, capsys):
    (tmp_path / "recipes").mkdir()
    (tmp_path / "recipes" / "mine.yaml").write_text("version: 1\nextends: w8a4-modiff\n", encoding="utf-8")
    path = tmp_path / "baseline.yaml"
    path.write_text(
        "version: 1\ndefaults: {model: digits16, steps: 3, samples: 4}\n"
        "settings:\n  mine:\n    recipe: recipes/mine.yaml\n    metrics: {fd_to_fp: {value: null}}\n",
        encoding="utf-8",
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(elsewhere)
        assert main(["gate", "--baseline", str(path), "--update"]) == 0, capsys.readouterr()
    assert yaml.safe_load(path.read_text(encoding="utf-8"))["settings"]["mine"]["recipe"] == "recipes/mine.yaml"


@pytest.mark.slow
def test_gate_fails_on_a_planted_regression(tmp_path, capsys):
    """MoDiff without error compensation, checked against the MoDiff W8A4 baseline, must fail."""
    (tmp_path / "no-ec.yaml").write_text(
        "version: 1\nextends: w8a4-modiff\ndefaults:\n  error_compensation: false\n", encoding="utf-8"
    )
    baselines = yaml.safe_load(BASELINE.read_text(encoding="utf-8"))
    planted = {**baselines["settings"]["w8a4-modiff"], "recipe": str(tmp_path / "no-ec.yaml")}
    data = {"version": 1, "defaults": baselines["defaults"], "settings": {"w8a4-modiff": planted}}
    (tmp_path / "baseline.yaml").write_text(yaml.safe_dump(data), encoding="utf-8")
    assert main(["gate", "--baseline", str(tmp_path / "baseline.yaml")]) == 1
    out = capsys.readouterr().out
    assert "quality gate FAILED" in out
    assert any(line.startswith("w8a4-modiff  psnr_vs_fp") and line.endswith("FAIL") for line in out.splitlines())


def test_update_records_values_that_then_pass(tmp_path, capsys):
    path = tmp_path / "baseline.yaml"
    settings = {
        "w8a4-modiff": {"recipe": "w8a4-modiff", "metrics": {"psnr_vs_fp": {"value": None}, "fd": {"value": None}}}
    }
    path.write_text(
        yaml.safe_dump(
            {"version": 1, "defaults": {"model": "digits16", "steps": 5, "samples": 8}, "settings": settings}
        ),
        encoding="utf-8",
    )
    assert main(["gate", "--baseline", str(path), "--update"]) == 0
    recorded = yaml.safe_load(path.read_text(encoding="utf-8"))["settings"]["w8a4-modiff"]["metrics"]
    assert recorded["psnr_vs_fp"]["value"] > 0 and recorded["fd"]["tolerance"] == "15%"
    assert main(["gate", "--baseline", str(path)]) == 0
    assert "quality gate passed" in capsys.readouterr().out


def test_a_setting_that_raises_fails_its_checks_and_the_others_still_run(tmp_path, capsys, monkeypatch):
    """A regression that crashes one setting's run (after every input was checked) fails that
    setting's metrics and comparisons with the error's text; the other settings are still
    measured, and --update records nothing."""
    path = tmp_path / "baseline.yaml"
    metrics = {"psnr_vs_fp": {"value": None}}
    settings = {"fp": {"metrics": {"fd": {"value": None}}}, "a": {"recipe": "w8a4-modiff", "metrics": metrics}}
    comparisons = [{"metric": "psnr_vs_fp", "worse": "a", "better": "a", "margin": 0}]
    data = {"defaults": {"model": "digits16", "steps": 5, "samples": 8}, "settings": settings}
    path.write_text(yaml.safe_dump({"version": 1, **data, "comparisons": comparisons}), encoding="utf-8")
    text = path.read_text(encoding="utf-8")
    evaluate = gate.Harness.evaluate

    def refuse_quantized(self, recipe, **kwargs):
        if recipe is not None:
            raise RuntimeError("calibration refused:\n  no record")
        return evaluate(self, recipe, **kwargs)

    monkeypatch.setattr(gate.Harness, "evaluate", refuse_quantized)
    assert main(["gate", "--baseline", str(path), "--update"]) == 1
    out = capsys.readouterr().out
    rows = {tuple(line.split()[:2]): line for line in out.splitlines()}
    assert rows["fp", "fd"].split()[-2:] == ["recorded", "ok"]  # full precision still measured
    assert rows["a", "psnr_vs_fp"].split()[-7:] == "error: RuntimeError: calibration refused: no record FAIL".split()
    assert rows["a", "vs"].split()[-3:] == ["a", "raised", "FAIL"] and "nothing recorded" in out
    assert path.read_text(encoding="utf-8") == text


def test_bad_baselines_files_are_clear_errors(tmp_path, capsys):
    """Typos and missing parts fail before anything is sampled, naming the file and line."""
    path = tmp_path / "baseline.yaml"
    cases = [
        (
            "version: 1\nsettings:\n  a:\n    recipe: w8a4-modiff\n    sampels: 8\n    metrics: {fd: {value: 1}}\n",
            ":5: unknown key of setting 'a' 'sampels'",
        ),
        ("version: 1\nsettings:\n  a:\n    recipe: w8a4-modiff\n", ":3: setting 'a' needs a mapping with 'metrics'"),
        (
            "version: 1\nsettings:\n  a:\n    metrics: {fid: {value: 1}}\n",
            ":4: metric 'fid' needs {value: ..., tolerance: ...}",
        ),
        (
            "version: 1\nsettings:\n  a:\n    metrics: {fd: {value: 1, tolerance: 15 percent}}\n",
            ":4: tolerance must be a number >= 0 or 'N%'",
        ),
        ("version: 1\nsettings:\n  a:\n    metrics: {fd: {value: 1}}\n", ":3: setting 'a' names no model"),
        (
            "version: 1\ndefaults: {model: digits16}\nsettings:\n  a:\n    metrics: {fd: {value: 1}}\n"
            "comparisons:\n  - {metric: fd, worse: a, better: b, ratio: 2}\n",
            ":7: comparison names unknown setting 'b'",
        ),
    ]
    for text, message in cases:
        path.write_text(text, encoding="utf-8")
        assert main(["gate", "--baseline", str(path)]) == 2
        assert f"{path}{message}" in capsys.readouterr().err


def test_an_update_that_fails_midway_leaves_the_baselines_as_they_were(tmp_path, monkeypatch):
    """--update rewrites the file atomically: a failed write keeps the old text and leaves no
    stray file, and a finished one keeps the file's permissions."""
    path = tmp_path / "baseline.yaml"
    text = "version: 1\ndefaults: {model: digits16}\nsettings:\n  a:\n    metrics: {fd: {value: 1.0}}\n"
    path.write_text(text, encoding="utf-8")
    path.chmod(0o644)

    def fail(*args, **kwargs):
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as patched:
        patched.setattr(atomic_files.os, "replace", fail)
        with pytest.raises(OSError):
            gate._record(path, {"a": {"fd": 2.0}})
    assert path.read_text(encoding="utf-8") == text and [p.name for p in tmp_path.iterdir()] == ["baseline.yaml"]
    gate._record(path, {"a": {"fd": 2.0}})
    assert yaml.safe_load(path.read_text(encoding="utf-8"))["settings"]["a"]["metrics"]["fd"]["value"] == 2.0
    assert path.stat().st_mode & 0o777 == 0o644


@pytest.mark.slow
def test_a_setting_evaluated_twice_gives_bit_identical_images(tmp_path):
    """What the gate and the README's demo table rely on: on one machine, fresh harnesses give
    the same images for the same setting, calibration and reconstruction included."""
    from modiff_quant.evaluate import Harness

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        "version: 1\nextends: w8a4-modiff-qdiffusion\ndefaults:\n"
        "  base_quantizer: {name: qdiffusion, weight_iters: 1, act_iters: 1, samples_per_step: 2}\n",
        encoding="utf-8",
    )
    first, second = (
        Harness("digits16", steps=3, samples=4).evaluate(str(recipe), calibration_samples=2)[1].images
        for _ in range(2)
    )
    assert torch.equal(first, second)


@pytest.fixture
def power(monkeypatch):
    """scripts/gate_power.py as a module."""
    spec = importlib.util.spec_from_file_location("gate_power", BASELINE.parents[2] / "scripts" / "gate_power.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "gate_power", module)  # its dataclass looks its module up
    spec.loader.exec_module(module)
    return module


def test_the_power_script_counts_only_checks_failed_on_values_as_catches(power):
    """A setting that raised fails its checks in the gate's table, but only a check that failed on
    a value is a catch."""
    checks = [
        gate.Check("a", "fd", 1.0, 2.0, "<= 1.15 (15%)", False),
        gate.Check("b", "fd", 1.0, None, "error: ValueError: refused", False),
        gate.Check("a vs b", "fd", None, None, "b raised", False),
        gate.Check("c", "fd", 1.0, 1.0, "<= 1.15 (15%)", True),
    ]
    failed, on_values = power.failed_checks(gate.format_checks(checks))
    assert len(failed) == 3 and len(on_values) == 1 and on_values[0].startswith("a  ")


def test_every_bug_the_power_script_plants_is_one_line_of_the_library(tmp_path, power):
    """scripts/gate_power.py stays in step with the code: each planted edit applies exactly once."""
    assert len(power.BUGS) >= 8 and len({bug.key for bug in power.BUGS}) == len(power.BUGS)
    source = power.library_copy(tmp_path)
    for bug in power.BUGS:
        path = power.planted_file(source, bug)
        original = path.read_text(encoding="utf-8")
        power.plant(source, bug)
        assert path.read_text(encoding="utf-8") != original
        path.write_text(original, encoding="utf-8")
