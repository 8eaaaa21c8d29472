"""Shared fixtures: small models built from config and recipes written on the fly."""

from __future__ import annotations

import os
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, Phase, settings

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# Under pytest-xdist (scripts/test.sh runs one worker per core) the workers share the cores: one
# torch thread each, or their threads would contend for the same cores.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
torch.set_num_threads(max(1, min(2, torch.get_num_threads()) // _WORKERS))

# The fuzz suite (tests/test_fuzz.py) takes its example counts from one of these profiles: `fuzz`
# (CI: derandomized, so reproducible, about a minute on 2 cores) unless `fuzz-long` is selected
# with --hypothesis-profile=fuzz-long (random exploration, saved failures replayed, 20x the cases).
# Calls are timed by the suite itself (no deadline); no explain phase (it replays a slow failure hundreds of times).
_FUZZ = {
    "deadline": None,
    "print_blob": True,
    "phases": (Phase.explicit, Phase.reuse, Phase.generate, Phase.target, Phase.shrink),
    "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example],
}
settings.register_profile("fuzz", max_examples=300, derandomize=True, database=None, **_FUZZ)
settings.register_profile("fuzz-long", max_examples=6000, **_FUZZ)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Longest first, so that the xdist workers finish together (a long test started last would
    run alone at the end): the quality gate's parts, then the other slow tests, then the rest."""
    items.sort(
        key=lambda item: (
            0 if "test_project_quality_gate_passes" in item.nodeid else 1 + (not item.get_closest_marker("slow"))
        )
    )


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
