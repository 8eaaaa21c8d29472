"""A non-editable install must carry the recipes, the backends and the entry points that the
core finds them through (the repo layout maps backends/ and recipes/ into the package)."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import modiff_quant as mq

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_wheel_contains_recipes_backends_and_entry_points(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--wheel-dir", str(tmp_path), str(ROOT)],
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("modiff_quant-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {f"modiff_quant/recipes/{name}.yaml" for name in mq.shipped_recipes()} <= set(names)
    assert {"modiff_quant/backends/dynamic.py", "modiff_quant/backends/static.py"} <= set(names)
    (entry_points,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
    text = zipfile.ZipFile(wheel).read(entry_points).decode()
    assert "dynamic = modiff_quant.backends.dynamic:DynamicQuantizer" in text
    assert "modiff-quant = modiff_quant.cli:main" in text


@pytest.mark.parametrize(
    ("python", "message"),
    [
        ("no-such-python", "no-such-python not found; install Python 3.11 or later"),
        (sys.executable + "-missing", "not found"),
        ("/bin/false", "modiff-quant needs Python 3.11 or later"),
    ],
)
def test_setup_checks_the_interpreter_before_installing_anything(python, message):
    """scripts/setup.sh refuses a missing or old interpreter in one line, before creating .venv."""
    script = Path(__file__).parents[1] / "scripts" / "setup.sh"
    result = subprocess.run(
        ["bash", str(script)], env={**os.environ, "PYTHON": python}, capture_output=True, text=True, check=False
    )
    assert result.returncode == 1 and message in result.stderr and result.stdout == ""
