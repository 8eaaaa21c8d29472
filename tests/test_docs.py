"""The documentation against the code.

- docs/recipes.md has a heading for every recipe key and names every shipped recipe, base
  quantizer, base-quantizer option and observer;
- every `yaml` block of docs/recipes.md and docs/plugins.md that contains the line
  `version: 1` is a recipe that loads and resolves (against `tiny_unet()`, or `digits16` when
  its first line is `# model: digits16`); a first line `# error: TEXT` / `# warns: TEXT`
  means that resolving must fail / warn with TEXT; other `yaml` blocks must parse;
- the example plugin of docs/plugins.md (its module and its pyproject.toml entry points)
  loads through a fake installed distribution and through `register_base_quantizer`, is
  usable from the recipes of that page, and quantizes, converts and samples `tiny_unet()`.
"""

from __future__ import annotations

import copy
import inspect
import math
import re
import sys
import tomllib
import warnings
from importlib.metadata import entry_points
from pathlib import Path

import pytest
import torch
import yaml
from helpers import ddim_inputs, tiny_unet

import modiff_quant as mq
from modiff_quant.layers import QuantizedLayer
from modiff_quant.recipe.schema import RULE_KEYS, TOP_KEYS
from modiff_quant.registry import BASE_QUANTIZERS, OBSERVERS, SCHEMES
from modiff_quant.settings import SETTING_PARSERS

DOCS = Path(__file__).parent.parent / "docs"
RECIPES_MD = DOCS / "recipes.md"
PLUGINS_MD = DOCS / "plugins.md"
PLUGIN_MODULE = "modiff_pow2"
STEPS = 6


def fenced(path: Path, language: str) -> list[tuple[int, str]]:
    """(line, body) of every fenced block of `language` in a Markdown file."""
    text = path.read_text(encoding="utf-8")
    return [
        (text[: match.start()].count("\n") + 1, match.group(2))
        for match in re.finditer(r"^```(\w*)\n(.*?)^```", text, flags=re.MULTILINE | re.DOTALL)
        if match.group(1) == language
    ]


def prose(path: Path) -> str:
    """The Markdown without its fenced blocks (whose `#` comments are no headings)."""
    return re.sub(r"^```.*?^```", "", path.read_text(encoding="utf-8"), flags=re.MULTILINE | re.DOTALL)


def headings(path: Path) -> list[str]:
    return [line for line in prose(path).splitlines() if line.startswith("#")]


def is_recipe(block: str) -> bool:
    return "version: 1" in block.splitlines()


def shipped_base_quantizers() -> list[str]:
    return sorted(
        ep.name for ep in entry_points(group="modiff_quant.base_quantizers") if ep.value.startswith("modiff_quant.")
    )


# ---------------------------------------------------------------------------------------------
# docs/recipes.md names everything


@pytest.mark.parametrize("key", [*TOP_KEYS, *RULE_KEYS])
def test_every_recipe_key_has_a_heading(key):
    assert any(f"`{key}`" in line for line in headings(RECIPES_MD)), f"docs/recipes.md has no heading for `{key}`"


def test_the_setting_keys_are_the_rule_keys_after_match_steps_and_skip_threshold():
    """So the parametrization above covers SETTING_PARSERS."""
    assert set(SETTING_PARSERS) <= set(RULE_KEYS)


@pytest.mark.parametrize("name", [*mq.shipped_recipes(), *shipped_base_quantizers()])
def test_every_shipped_recipe_and_base_quantizer_is_named(name):
    assert f"`{name}`" in prose(RECIPES_MD), f"docs/recipes.md does not name `{name}`"


def test_every_base_quantizer_option_observer_and_scheme_is_named():
    text = prose(RECIPES_MD)
    missing = []
    for name in shipped_base_quantizers():
        missing += [
            f"{name}: {option}"
            for option in inspect.signature(BASE_QUANTIZERS.get(name)).parameters
            if f"`{option}`" not in text
        ]
    for name in OBSERVERS.names():
        observer = inspect.signature(OBSERVERS.get(name)).parameters
        missing += [f"observer {name}"] if f"`{name}`" not in text else []
        missing += [
            f"observer {name}: {option}"
            for option in observer
            if option not in ("spec", "channel_dim", "weight") and f"`{option}`" not in text
        ]
    missing += [f"scheme {name}" for name in SCHEMES.names() if f"`{name}`" not in text]
    assert not missing, f"docs/recipes.md does not name: {', '.join(missing)}"


# ---------------------------------------------------------------------------------------------
# the YAML examples are recipes that do what the page says


@pytest.fixture(scope="module")
def models():
    loaded = {"tiny_unet": tiny_unet()}

    def get(name: str) -> torch.nn.Module:
        if name not in loaded:
            from modiff_quant.models import load_model

            loaded[name] = load_model(name)
        return loaded[name]

    return get


def yaml_blocks() -> list:
    return [
        pytest.param(path, body, id=f"{path.name}:{line}")
        for path in (RECIPES_MD, PLUGINS_MD)
        for line, body in fenced(path, "yaml")
    ]


def test_the_pages_have_yaml_examples():
    assert sum(is_recipe(body) for _, body in fenced(RECIPES_MD, "yaml")) >= 30
    assert sum(is_recipe(body) for _, body in fenced(PLUGINS_MD, "yaml")) >= 3


@pytest.mark.parametrize(("page", "block"), [p for p in yaml_blocks() if p.values[0] == RECIPES_MD])
def test_recipe_examples_resolve_as_documented(page, block, models, tmp_path):
    if not is_recipe(block):
        yaml.safe_load(block)  # a fragment: valid YAML
        return
    first = block.splitlines()[0]
    model = models(first.removeprefix("# model:").strip()) if first.startswith("# model:") else models("tiny_unet")
    path = tmp_path / "recipe.yaml"
    path.write_text(block, encoding="utf-8")
    if first.startswith("# error:"):
        with pytest.raises(mq.RecipeError, match=re.escape(first.removeprefix("# error:").strip())):
            mq.load_recipe(path).resolve(model)
        return
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        mq.load_recipe(path).resolve(model)
    recipe_warnings = [str(w.message) for w in caught if str(path) in str(w.message)]
    if first.startswith("# warns:"):
        expected = first.removeprefix("# warns:").strip()
        assert any(expected in message for message in recipe_warnings), recipe_warnings
    else:
        assert not recipe_warnings


# ---------------------------------------------------------------------------------------------
# the example plugin


def plugin_source() -> str:
    (module,) = [body for _, body in fenced(PLUGINS_MD, "python") if body.startswith(f"# {PLUGIN_MODULE}.py\n")]
    return module


def plugin_entry_points() -> dict[str, dict[str, str]]:
    (pyproject,) = [body for _, body in fenced(PLUGINS_MD, "toml")]
    return tomllib.loads(pyproject)["project"]["entry-points"]


def plugin_recipes() -> list[str]:
    return [body for _, body in fenced(PLUGINS_MD, "yaml") if is_recipe(body)]


@pytest.fixture
def isolated(monkeypatch):
    """Registrations made by a test stay in it; the plugin module is imported afresh."""
    for registry in (SCHEMES, BASE_QUANTIZERS, OBSERVERS):
        monkeypatch.setattr(registry, "_items", dict(registry._items))
    sys.modules.pop(PLUGIN_MODULE, None)
    yield
    sys.modules.pop(PLUGIN_MODULE, None)


@pytest.fixture
def plugin_on_path(tmp_path, monkeypatch, isolated):
    """The plugin module importable, without entry points."""
    folder = tmp_path / "site"
    folder.mkdir()
    (folder / f"{PLUGIN_MODULE}.py").write_text(plugin_source(), encoding="utf-8")
    monkeypatch.syspath_prepend(str(folder))
    return folder


@pytest.fixture
def installed_plugin(plugin_on_path):
    """The plugin as an installed distribution: its entry points as pyproject.toml declares them."""
    info = plugin_on_path / "modiff_pow2-0.1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: modiff-pow2\nVersion: 0.1.0\n", encoding="utf-8")
    sections = [
        f"[{group}]\n" + "".join(f"{name} = {target}\n" for name, target in names.items())
        for group, names in plugin_entry_points().items()
    ]
    (info / "entry_points.txt").write_text("\n".join(sections), encoding="utf-8")
    return plugin_on_path


@pytest.fixture(scope="module")
def trajectory():
    model = tiny_unet()
    return model, ddim_inputs(model, steps=STEPS)


def run(recipe: mq.Recipe | Path, trajectory) -> tuple[torch.nn.Module, float]:
    """prepare -> calibrate -> convert -> sample; the SQNR (dB) of the outputs against the float model."""
    model, inputs = trajectory
    quantized = mq.prepare(copy.deepcopy(model), recipe)
    with torch.no_grad(), mq.calibrate(quantized):
        for x, t in inputs:
            quantized(x, t)
    mq.convert(quantized)
    with torch.no_grad():
        reference = torch.stack([model(x, t).sample for x, t in inputs])
        with mq.sampling(quantized):
            outputs = torch.stack([quantized(x, t).sample for x, t in inputs])
    assert torch.isfinite(outputs).all()
    return quantized, 10 * math.log10(
        reference.pow(2).sum().item() / (reference - outputs).pow(2).sum().clamp_min(1e-30).item()
    )


def at_w8a8(recipe: mq.Recipe) -> mq.Recipe:
    import dataclasses

    return dataclasses.replace(recipe, defaults=recipe.defaults.updated({"w_bits": 8, "a_bits": 8}))


def test_plugin_entry_points_name_the_documented_classes():
    groups = plugin_entry_points()
    assert groups["modiff_quant.base_quantizers"] == {"pow2": f"{PLUGIN_MODULE}:Pow2Quantizer"}
    assert groups["modiff_quant.observers"] == {"clipped_minmax": f"{PLUGIN_MODULE}:ClippedMinMaxObserver"}


@pytest.mark.slow
def test_plugin_through_its_entry_points_runs_the_documented_recipes(installed_plugin, trajectory, tmp_path):
    assert "pow2" in BASE_QUANTIZERS.names() and "clipped_minmax" in OBSERVERS.names()
    assert PLUGIN_MODULE not in sys.modules  # listed without being imported
    recipes = plugin_recipes()
    assert len(recipes) == 3
    for index, text in enumerate(recipes):
        path = tmp_path / f"plugin-{index}.yaml"
        path.write_text(text, encoding="utf-8")
        recipe = mq.load_recipe(path)
        quantized, _ = run(recipe, trajectory)
        layers = [m for m in quantized.modules() if isinstance(m, QuantizedLayer)]
        embedding = [
            layer for layer in layers if re.search(r"time_emb", layer.plan.name)
        ]  # w8a8-modiff keeps them at 8
        assert embedding and all(layer.plan.settings.a_bits == 8 for layer in embedding)
        assert all(layer.plan.settings.a_bits == 4 for layer in layers if layer not in embedding)
        _, sqnr = run(at_w8a8(recipe), trajectory)
        assert sqnr > 20.0, f"{path.name} at W8A8: SQNR {sqnr:.1f} dB"
        if "activations: static" in text:  # the frozen activation scales are powers of two
            scales = torch.cat([q.scale.flatten() for layer in layers for q in layer.all_quantizers()])
            assert torch.equal(scales, torch.exp2(torch.round(torch.log2(scales))))


def test_plugin_errors_name_the_recipe_line(installed_plugin, write_recipe):
    with pytest.raises(
        mq.RecipeError,
        match=r"recipe.yaml:3: base quantizer 'pow2' rejects its options "
        r"\(activations must be 'dynamic' or 'static', got 'dynamc'\); it accepts: activations",
    ):
        mq.load_recipe(write_recipe("version: 1\ndefaults:\n  base_quantizer: {name: pow2, activations: dynamc}\n"))
    path = write_recipe("version: 1\ndefaults:\n  base_quantizer: pow2\n  w_granularity: channel\n  w_bits: 12\n")
    with pytest.raises(
        mq.RecipeError,
        match=r"recipe.yaml:5: layer 'conv_in' \(Conv2d\): base quantizer 'pow2': "
        r"stores weights as int8: w_bits 2-8 or float, got w_bits 12",
    ):
        mq.load_recipe(path).resolve(tiny_unet())


def test_plugin_registered_in_process(plugin_on_path, trajectory):
    (snippet,) = [body for _, body in fenced(PLUGINS_MD, "python") if body.startswith("# in-process registration\n")]
    namespace: dict = {}
    exec(compile(snippet, "docs/plugins.md", "exec"), namespace)
    recipe = namespace["recipe"]
    assert recipe.defaults.base_quantizer == "pow2" and "clipped_minmax" in OBSERVERS.names()
    _, sqnr = run(at_w8a8(recipe), trajectory)
    assert sqnr > 20.0
