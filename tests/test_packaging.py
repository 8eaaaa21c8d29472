"""A non-editable install must carry the recipes, the backends and the entry points that the
core finds them through (the repo layout maps backends/ and recipes/ into the package)."""

from __future__ import annotations

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
