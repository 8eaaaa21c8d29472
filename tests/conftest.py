"""Shared fixtures: small models built from config and recipes written on the fly."""

from __future__ import annotations

import os
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture
def write_recipe(tmp_path: Path) -> Callable[..., Path]:
    """Write a YAML recipe (dedented) into tmp_path and return its path."""

    def write(text: str, name: str = "recipe.yaml") -> Path:
        path = tmp_path / name
        path.write_text(textwrap.dedent(text).lstrip("\n"), encoding="utf-8")
        return path

    return write


@pytest.fixture
def no_grad() -> Iterator[None]:
    """Inference-only tests: no autograd graph (set per test, never globally)."""
    with torch.no_grad():
        yield
