"""Tests of YAML recipes: loading, validation with file:line, matching, `extends`, step schedules.

The shipped recipes are checked against the diffusers CIFAR-10 DDPM UNet (built from its config,
no weights needed); matching semantics are checked on a tiny model whose names are chosen so that
prefix/substring mistakes would show.
"""

from __future__ import annotations

import re
import string
import textwrap
import warnings
from collections import Counter
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import modiff_quant
from modiff_quant import RecipeError, load_recipe, shipped_recipes
from modiff_quant.quant import FLOAT_BITS, Granularity
from modiff_quant.recipe import FirstStep, LayerSettings, Location, StepSchedule

TOP_LEVEL_KEYS = ("version", "name", "description", "extends", "strict", "defaults", "rules")

CIFAR10_UNET_CONFIG = dict(
    sample_size=32,
    in_channels=3,
    out_channels=3,
    block_out_channels=(128, 256, 256, 256),
    layers_per_block=2,
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    norm_eps=1e-6,
    freq_shift=1,
    flip_sin_to_cos=False,
    downsample_padding=0,
    time_embedding_type="positional",
    attention_head_dim=None,
    norm_num_groups=32,
)

# name -> (w_bits, a_bits, scheme) every layer of the CIFAR UNet must get
SHIPPED = {  # name: w_bits, a_bits, scheme, base quantizer, activation granularity
    "w4a4-modiff": (4, 4, "modiff", "dynamic", "sample"),
    "w4a4-plain": (4, 4, "plain", "dynamic", "sample"),
    "w4a4-modiff-adaround": (4, 4, "modiff", "adaround", "sample"),
    "w8a4-modiff-gptq": (8, 4, "modiff", "gptq", "sample"),
    "w8a3-modiff-gptq": (8, 3, "modiff", "gptq", "sample"),
    "w8a3-modiff": (8, 3, "modiff", "dynamic", "sample"),
    "w8a3-plain": (8, 3, "plain", "dynamic", "sample"),
    "w8a2-modiff": (8, 2, "modiff", "dynamic", "sample"),
    "w8a4-modiff": (8, 4, "modiff", "dynamic", "sample"),
    "w8a4-modiff-ptq4dm": (8, 4, "modiff", "ptq4dm", "tensor"),
    "w8a4-modiff-qdiffusion": (8, 4, "modiff", "qdiffusion", "tensor"),
    "w8a4-modiff-torchao": (8, 4, "modiff", "torchao_int4", "sample"),
    "w8a4-modiff-brevitas": (8, 4, "modiff", "brevitas", "tensor"),
    "w8a4-plain": (8, 4, "plain", "dynamic", "sample"),
    "w8a4-plain-ptq4dm": (8, 4, "plain", "ptq4dm", "tensor"),
    "w8a4-plain-qdiffusion": (8, 4, "plain", "qdiffusion", "tensor"),
    "w8a4-plain-torchao": (8, 4, "plain", "torchao_int4", "sample"),
    "w8a4-plain-brevitas": (8, 4, "plain", "brevitas", "tensor"),
    "w8a6-modiff": (8, 6, "modiff", "dynamic", "sample"),
    "w8a6-plain": (8, 6, "plain", "dynamic", "sample"),
    "w8a8": (8, 8, "plain", "dynamic", "sample"),
    "w8a8-modiff": (8, 8, "modiff", "dynamic", "sample"),
    "w8a8-modiff-deepcache": (8, 8, "modiff", "dynamic", "sample"),
    "w8a8-plain": (8, 8, "plain", "dynamic", "sample"),
    "w8a4-modiff-lean": (8, 4, "modiff", "dynamic", "sample"),
    "w8a4-modiff-attn8": (8, 4, "modiff", "dynamic", "sample"),
    "w8a3-modiff-attn8": (8, 3, "modiff", "dynamic", "sample"),
    "deepcache": (32, 32, "plain", "dynamic", "tensor"),
    "adaptive-cache": (32, 32, "plain", "dynamic", "tensor"),
}
CACHING = {"w8a8-modiff-deepcache", "deepcache", "adaptive-cache"}
DEEPCACHE_BLOCKS = {"down_blocks.2", "down_blocks.3", "mid_block", "up_blocks.0", "up_blocks.1"}


# ----------------------------------------------------------------------------------------------
# helpers


@pytest.fixture(scope="module")
def unet() -> nn.Module:
    diffusers = pytest.importorskip("diffusers")
    return diffusers.UNet2DModel(**CIFAR10_UNET_CONFIG).eval()


class Inner(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)


class TinyNet(nn.Module):
    """Names chosen to catch prefix/substring matching: conv vs conv_in, fc vs block.fc."""

    def __init__(self) -> None:
        super().__init__()
        self.conv_in = nn.Conv2d(3, 8, 3)
        self.conv = nn.Conv2d(8, 8, 1)
        self.fc = nn.Linear(8, 8)
        self.block = Inner()
        self.norm = nn.GroupNorm(2, 8)


def write(tmp_path: Path, text: str, name: str = "recipe.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text).lstrip("\n"), encoding="utf-8")
    return path


def line_of(path: Path, needle: str, occurrence: int = 1) -> int:
    """1-based line number of the `occurrence`-th line of `path` containing `needle`."""
    hits = [i for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1) if needle in line]
    assert len(hits) >= occurrence, f"{needle!r} not in {path}"
    return hits[occurrence - 1]


def recipe_error(path: Path, model: nn.Module | None = None) -> RecipeError:
    """The RecipeError of loading `path` (and resolving it against `model`, if given)."""
    with pytest.raises(RecipeError) as info:
        recipe = load_recipe(str(path))
        if model is not None:
            recipe.resolve(model)
    return info.value


def assert_located(error: RecipeError, path: Path, line: int) -> None:
    assert error.location == Location(str(path), line), str(error)
    assert str(error).startswith(f"{path}:{line}: "), str(error)


def explain_rows(text: str) -> dict[str, str]:
    """layer name -> its row of the layer table of an explain() text (rows whose type is a layer class)."""
    return {
        row.split()[0]: row for row in text.splitlines() if row.split()[1:2] in (["Linear"], ["Conv1d"], ["Conv2d"])
    }


# ----------------------------------------------------------------------------------------------
# 1. shipped recipes on the CIFAR-10 UNet


def test_shipped_recipes_are_the_expected_set():
    """Every shipped recipe has an expectation below; a new or renamed one must be added here."""
    assert set(shipped_recipes()) == set(SHIPPED)


@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=pytest.mark.slow) if "brevitas" in n else n for n in sorted(SHIPPED)]
)
def test_shipped_recipe_resolves_on_cifar10_unet(name, unet):
    """Each shipped recipe loads by name and covers all 113 Linear/Conv layers with its W/A,
    scheme, base quantizer and activation granularity (the 24 layers of the timestep embedding at
    A8 in those built on `w8a8-modiff`); the `-attn8` ones also the 24 operands of the six
    attentions' products, at plain 8 bits."""
    recipe = load_recipe(name)
    assert recipe.name == name
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a shipped recipe must not have rules that match nothing
        plan = recipe.resolve(unet)
    operands = [layer for layer in plan.layers.values() if not layer.has_weight]
    assert len(operands) == (24 if name.endswith("-attn8") else 0)
    assert all((o.settings.scheme, o.settings.a_bits) == ("plain", 8) for o in operands)
    layers = [layer for layer in plan.layers.values() if layer.has_weight]
    assert Counter(layer.module_type for layer in layers) == {"Conv2d": 65, "Linear": 48}
    assert plan.unmatched == ()
    w_bits, a_bits, scheme, base, a_granularity = SHIPPED[name]
    timestep = [
        layer.name for layer in layers if re.fullmatch(r"(.*\.)?(time_embedding\.linear_\d|time_emb_proj)", layer.name)
    ]
    assert len(timestep) == 24
    for layer in layers:
        first_or_last = layer.name in ("conv_in", "conv_out")  # W4 recipes keep them at 8 bits, gptq at 16
        wide_edges = {4: 8, 8: 16 if base == "gptq" else 8}.get(w_bits, w_bits)
        expected_w = wide_edges if first_or_last else w_bits
        expected_a = 8 if layer.name in timestep and a_bits != FLOAT_BITS else a_bits
        assert (layer.settings.w_bits, layer.settings.a_bits, layer.settings.scheme) == (
            expected_w,
            expected_a,
            scheme,
        ), layer.name
        assert layer.settings.base_quantizer == base
        assert layer.settings.a_granularity == Granularity(a_granularity)
        assert not layer.has_skips, layer.name
    assert set(plan.blocks) == (DEEPCACHE_BLOCKS if name in CACHING else set())


def test_deepcache_caches_deep_blocks_on_odd_steps(unet):
    """DeepCache recipe: exactly the deep half of the UNet is reused on odd steps, never on even ones."""
    plan = load_recipe("w8a8-modiff-deepcache").resolve(unet)
    assert set(plan.blocks) == DEEPCACHE_BLOCKS
    for block in plan.blocks.values():
        assert block.schedule.contains(1) and block.schedule.contains(3) and block.schedule.contains(999)
        assert not block.schedule.contains(0) and not block.schedule.contains(2) and not block.schedule.contains(1000)
        assert block.rule.file.endswith("w8a8-modiff-deepcache.yaml")
        assert block.rule.line == 10
    assert plan.blocks["mid_block"].module_type == "UNetMidBlock2D"
    assert load_recipe("w8a8-modiff-deepcache").strict is True


# ----------------------------------------------------------------------------------------------
# 2. misspelled keys


@pytest.mark.parametrize(
    ("text", "typo", "suggestion"),
    [
        pytest.param(
            """
            version: 1
            defaults:
              w_bits: 8
            rules:
              - match: conv_in
                w_bits: 4
              - match: Linear
                a_bitz: 4
            """,
            "a_bitz",
            "a_bits",
            id="rule-key",
        ),
        pytest.param(
            """
            version: 1
            description: a recipe
            extend: w8a8-modiff
            """,
            "extend",
            "extends",
            id="top-level-key",
        ),
        pytest.param(
            """
            version: 1
            defaults:
              a_bits: 8
              w_granularity: channel
              w_bitz: 4
            """,
            "w_bitz",
            "w_bits",
            id="defaults-key",
        ),
    ],
)
def test_misspelled_key_names_file_line_and_suggestion(tmp_path, text, typo, suggestion):
    """A typo is caught at load with the exact file:line of the key and the nearest valid name."""
    path = write(tmp_path, text)
    error = recipe_error(path)
    assert_located(error, path, line_of(path, typo))
    assert repr(typo) in str(error)
    assert f"did you mean {suggestion!r}" in str(error)


# ----------------------------------------------------------------------------------------------
# 3. strict: rules that match nothing

UNMATCHED = """
version: 1
strict: {strict}
rules:
  - match: Linear
    a_bits: 6
  - match: re:mid_blocks\\..*
    a_bits: 4
"""


def test_strict_rule_matching_nothing_is_an_error(tmp_path, unet):
    """strict: true turns a pattern that matches nothing (mid_blocks vs mid_block) into an error."""
    path = write(tmp_path, UNMATCHED.format(strict="true"))
    error = recipe_error(path, unet)
    assert_located(error, path, line_of(path, "mid_blocks"))
    assert "matches no module" in str(error)
    assert "mid_block" in str(error).split("nearest names:")[1]


def test_non_strict_rule_matching_nothing_only_warns(tmp_path, unet):
    """Without strict the same recipe resolves; the dead rule is a UserWarning with file:line."""
    path = write(tmp_path, UNMATCHED.format(strict="false"))
    line = line_of(path, "mid_blocks")
    with pytest.warns(
        UserWarning, match=rf"^{re.escape(str(path))}:{line}: rule .*mid_blocks.* matches no module.*mid_block"
    ):
        plan = load_recipe(str(path)).resolve(unet)
    assert len(plan.layers) == 113
    assert [rule.location.line for rule in plan.unmatched] == [line]
    assert all(layer.settings.a_bits == (6 if layer.module_type == "Linear" else 8) for layer in plan.layers.values())
    assert f"warning: {path}:{line}" in plan.explain()


def test_strict_is_inherited_through_extends(tmp_path, unet):
    """A recipe extending the (strict) deepcache recipe is strict too, unless it says otherwise."""
    path = write(
        tmp_path, "version: 1\nextends: w8a8-modiff-deepcache\nrules:\n  - match: nothing_here\n    a_bits: 4\n"
    )
    assert_located(recipe_error(path, unet), path, 4)
    relaxed = write(
        tmp_path,
        "version: 1\nextends: w8a8-modiff-deepcache\nstrict: false\nrules:\n  - match: nothing_here\n    a_bits: 4\n",
        "relaxed.yaml",
    )
    with pytest.warns(UserWarning, match="nothing_here"):
        load_recipe(str(relaxed)).resolve(unet)


# ----------------------------------------------------------------------------------------------
# 4. matching semantics and explain


def resolve_text(tmp_path: Path, text: str, model: nn.Module):
    return load_recipe(str(write(tmp_path, text))).resolve(model)


def test_exact_name_matches_only_that_module(tmp_path):
    """A plain pattern is the full dotted name: `fc` must not match `block.fc`."""
    plan = resolve_text(tmp_path, "version: 1\nrules:\n  - match: fc\n    a_bits: 4\n", TinyNet())
    assert {name: layer.settings.a_bits for name, layer in plan.layers.items()} == {
        "conv_in": 8,
        "conv": 8,
        "fc": 4,
        "block.fc": 8,
    }


def test_class_name_matches_every_instance(tmp_path):
    """A class name matches every module of that class, wherever it is nested, and nothing else."""
    plan = resolve_text(tmp_path, "version: 1\nrules:\n  - match: Linear\n    w_bits: 4\n", TinyNet())
    assert {name: layer.settings.w_bits for name, layer in plan.layers.items()} == {
        "conv_in": 8,
        "conv": 8,
        "fc": 4,
        "block.fc": 4,
    }


def test_regex_must_match_the_whole_name(tmp_path):
    """`re:` uses fullmatch: `re:conv` is `conv` only, not `conv_in`; `re:conv.*` is both."""
    plan = resolve_text(
        tmp_path,
        "version: 1\nrules:\n  - match: re:conv\n    a_bits: 4\n  - match: re:.*fc\n    w_bits: 6\n",
        TinyNet(),
    )
    assert {name: (layer.settings.w_bits, layer.settings.a_bits) for name, layer in plan.layers.items()} == {
        "conv_in": (8, 8),
        "conv": (8, 4),
        "fc": (6, 8),
        "block.fc": (6, 8),
    }
    plan = resolve_text(tmp_path, "version: 1\nrules:\n  - match: re:conv.*\n    a_bits: 4\n", TinyNet())
    assert plan.layers["conv_in"].settings.a_bits == plan.layers["conv"].settings.a_bits == 4


def test_match_list_is_any_of(tmp_path):
    """`match` may be a list: a module matching any entry gets the settings."""
    plan = resolve_text(tmp_path, "version: 1\nrules:\n  - match: [conv_in, block.fc]\n    a_bits: 5\n", TinyNet())
    assert {name for name, layer in plan.layers.items() if layer.settings.a_bits == 5} == {"conv_in", "block.fc"}


def test_later_rules_override_earlier_ones_key_by_key(tmp_path):
    """A later rule replaces only the keys it sets; earlier keys and defaults survive."""
    text = """
    version: 1
    defaults:
      a_granularity: sample
    rules:
      - match: Linear
        w_bits: 6
        a_bits: 4
      - match: fc
        a_bits: 6
        scheme: plain
    """
    plan = resolve_text(tmp_path, text, TinyNet())
    fc, inner = plan.layers["fc"].settings, plan.layers["block.fc"].settings
    assert (fc.w_bits, fc.a_bits, fc.scheme, fc.a_granularity) == (6, 6, "plain", Granularity("sample"))
    assert (inner.w_bits, inner.a_bits, inner.scheme, inner.a_granularity) == (6, 4, "modiff", Granularity("sample"))
    assert [loc.line for loc in plan.layers["fc"].rules] == [5, 8]
    assert [loc.line for loc in plan.layers["block.fc"].rules] == [5]
    assert plan.layers["conv"].rules == ()


def test_explain_lists_every_layer_with_its_rule_lines(tmp_path):
    """explain(): one row per layer with the settings and the lines of the rules that applied."""
    text = """
    version: 1
    description: explain me
    rules:
      - match: Linear
        a_bits: 4
      - match: fc
        w_bits: 6
    """
    recipe = load_recipe(str(write(tmp_path, text)))
    out = recipe.explain(TinyNet())
    rows = explain_rows(out)
    assert set(rows) == {"conv_in", "conv", "fc", "block.fc"}
    assert rows["fc"].split()[-2:] == ["recipe.yaml:4,", "recipe.yaml:6"]
    assert rows["fc"].split()[4:6] == ["6", "4u"]  # W, A columns (u = asymmetric)
    assert rows["block.fc"].split()[-1] == "recipe.yaml:4"
    assert rows["conv"].split()[-1] == "defaults"
    assert "explain me" in out.splitlines()[0]
    assert "4 layers" in out


def test_explain_on_unet_lists_all_layers_and_cached_blocks(unet):
    """The DeepCache plan's explain shows all 113 layers and the five cached blocks with their rule."""
    out = load_recipe("w8a8-modiff-deepcache").explain(unet)
    assert "113 layers" in out
    layer_table, block_table = out.split("cached blocks")
    assert "conv_in" in layer_table and "up_blocks.3.resnets.2.conv_shortcut" in layer_table
    for block in DEEPCACHE_BLOCKS:
        assert any(
            line.split()[:1] == [block] and line.rstrip().endswith("w8a8-modiff-deepcache.yaml:10")
            for line in block_table.splitlines()
        ), block


# ----------------------------------------------------------------------------------------------
# 5. value validation, each error at the offending line

LOAD_ERRORS = [
    # id, recipe text, text on the line the error must name, fragments of the message
    ("a_bits-1", "version: 1\nrules:\n  - match: conv\n    a_bits: 1\n", "a_bits", ["a_bits", "got 1"]),
    ("a_bits-17", "version: 1\ndefaults:\n  a_bits: 17\n", "a_bits", ["a_bits", "got 17"]),
    ("a_bits-bool", "version: 1\ndefaults:\n  a_bits: true\n", "a_bits", ["a_bits", "got True"]),
    ("w_bits-0", "version: 1\ndefaults:\n  w_bits: 0\n", "w_bits", ["w_bits", "got 0"]),
    ("group-0", "version: 1\ndefaults:\n  a_granularity: group:0\n", "a_granularity", ["a_granularity", "group:0"]),
    (
        "w_granularity-sample",
        "version: 1\ndefaults:\n  w_granularity: sample\n",
        "w_granularity",
        ["w_granularity", "sample"],
    ),
    (
        "symmetric-not-bool",
        "version: 1\ndefaults:\n  a_symmetric: yes please\n",
        "a_symmetric",
        ["a_symmetric", "true or false"],
    ),
    ("warmup-0", "version: 1\ndefaults:\n  first_step: warmup:0\n", "first_step", ["first_step", "warmup:0"]),
    (
        "first_step-unknown",
        "version: 1\ndefaults:\n  first_step: float\n",
        "first_step",
        ["first_step", "fp, quantized or warmup:N"],
    ),
    (
        "steps-with-w_bits",
        "version: 1\nrules:\n  - match: conv\n    w_bits: 4\n    steps: [1, 2]\n",
        "steps",
        ["steps", "may only set a_bits"],
    ),
    (
        "steps-with-a_bits-and-more",
        "version: 1\nrules:\n  - match: conv\n    a_bits: 4\n    a_symmetric: true\n    steps: all\n",
        "steps",
        ["steps", "may only set a_bits"],
    ),
    (
        "steps-invalid",
        "version: 1\nrules:\n  - match: conv\n    a_bits: 0\n    steps: {every: 0}\n",
        "steps",
        ["steps:"],
    ),
    ("rule-sets-nothing", "version: 1\nrules:\n  - match: conv\n", "match", ["sets nothing"]),
    ("rule-without-match", "version: 1\nrules:\n  - a_bits: 4\n", "a_bits", ["no 'match'"]),
    (
        "missing-version",
        "description: no version\ndefaults:\n  a_bits: 4\n",
        "description",
        ["'version: 1' is required", "None"],
    ),
    ("version-2", "description: future\nversion: 2\n", "version", ["'version: 1' is required", "got 2"]),
    (
        "duplicate-key",
        "version: 1\ndefaults:\n  a_bits: 4\n  w_bits: 4\n  a_bits: 6\n",
        "a_bits: 6",
        ["duplicate key 'a_bits'"],
    ),
    (
        "invalid-regex",
        "version: 1\nrules:\n  - match: conv\n    a_bits: 4\n  - match: re:conv(\n    a_bits: 6\n",
        "re:conv(",
        ["invalid regex"],
    ),
    ("yaml-syntax", "version: 1\ndefaults:\n  a_bits: 8\n   w_bits: 4\nrules: []\n", "w_bits", ["invalid YAML"]),
    ("not-a-mapping", "- version: 1\n", "version", ["must be a YAML mapping"]),
    ("rules-not-a-list", "version: 1\nrules:\n  match: conv\n", "rules", ["rules must be a list"]),
    ("strict-not-bool", "version: 1\nstrict: maybe\n", "strict", ["strict must be true or false"]),
]


@pytest.mark.parametrize(
    ("text", "needle", "fragments"), [pytest.param(*case[1:], id=case[0]) for case in LOAD_ERRORS]
)
def test_invalid_value_is_rejected_at_load_with_its_line(tmp_path, text, needle, fragments):
    """Values that can be judged without a model fail in load_recipe, at the offending line."""
    path = write(tmp_path, text)
    error = recipe_error(path)
    assert_located(error, path, line_of(path, needle))
    for fragment in fragments:
        assert fragment in str(error)


RESOLVE_ERRORS = [
    # id, recipe text, text on the line the error must name, fragments of the message
    (
        "unknown-scheme",
        "version: 1\ndefaults:\n  a_bits: 8\n  scheme: modif\n",
        "scheme",
        ["unknown scheme 'modif'", "did you mean 'modiff'"],
    ),
    (
        "unknown-scheme-in-rule",
        "version: 1\nrules:\n  - match: time_embedding.linear_2\n    scheme: plian\n",
        "scheme: plian",  # a rule's settings are located at their own key
        ["unknown scheme 'plian'", "did you mean 'plain'"],
    ),
    (
        "unknown-base",
        "version: 1\ndefaults:\n  base_quantizer: dynamc\n",
        "base_quantizer",
        ["unknown base quantizer 'dynamc'", "did you mean 'dynamic'"],
    ),
    (
        "unknown-base-option",
        "version: 1\ndefaults:\n  a_bits: 8\n  base_quantizer: {name: static, observr: mse}\n",
        "base_quantizer",
        ["'static' rejects its options", "observr", "accepts: observer, observer_options"],
    ),
    (
        "option-for-dynamic",
        "version: 1\ndefaults:\n  base_quantizer:\n    name: dynamic\n    observer: mse\n",
        "base_quantizer",
        ["'dynamic' rejects its options", "accepts: weight_observer, weight_observer_options"],
    ),
    (
        "warmup-without-ec",
        "version: 1\ndefaults:\n  error_compensation: false\n"
        "rules:\n  - match: time_embedding.linear_1\n    first_step: warmup:2\n",
        "first_step: warmup:2",
        ["layer 'time_embedding.linear_1'", "error_compensation: true"],
    ),
    (
        "first-step-on-skipped-layer",
        "version: 1\ndefaults:\n  first_step: quantized\nrules:\n  - match: conv_out\n    a_bits: 0\n",
        "first_step",
        ["layer 'conv_out'", "a_bits is 0"],
    ),
    (
        "group-not-dividing",
        "version: 1\nrules:\n  - match: Conv2d\n    a_granularity: group:4\n"
        "  - match: conv_in\n    a_granularity: group:2\n",
        "a_granularity: group:2",
        ["layer 'conv_in'", "group:2", "got 3"],
    ),
    (
        "weight-group-not-dividing",
        "version: 1\nrules:\n  - match: conv_in\n    w_granularity: group:2\n",
        "w_granularity: group:2",
        ["layer 'conv_in'", "got 27"],  # 3 in-channels x 3 x 3 kernel
    ),
]


@pytest.mark.parametrize(
    ("text", "needle", "fragments"), [pytest.param(*case[1:], id=case[0]) for case in RESOLVE_ERRORS]
)
def test_setting_a_layer_cannot_take_is_rejected_at_resolve(tmp_path, unet, text, needle, fragments):
    """Errors that depend on the model or the registries are raised by load or resolve, at the line of the setting."""
    path = write(tmp_path, text)
    error = recipe_error(path, unet)
    assert_located(error, path, line_of(path, needle))
    for fragment in fragments:
        assert fragment in str(error)


def test_valid_static_base_quantizer_options_resolve(tmp_path):
    """The positive twin of the option checks: real options are accepted and kept."""
    text = "version: 1\ndefaults:\n  base_quantizer: {name: static, observer: mse, observer_options: {p: 2.4}}\n"
    plan = resolve_text(tmp_path, text, TinyNet())
    settings_ = plan.layers["fc"].settings
    assert settings_.base_quantizer == "static"
    assert settings_.base_quantizer_options == {"observer": "mse", "observer_options": {"p": 2.4}}


# ----------------------------------------------------------------------------------------------
# 6. extends


def test_extends_inherits_defaults_and_appends_rules(tmp_path, unet):
    """A child of a shipped recipe keeps its defaults and rules, overrides per key, and adds rules after."""
    path = write(
        tmp_path,
        """
        version: 1
        extends: w8a8-modiff-deepcache
        defaults:
          a_bits: 6
        rules:
          - match: conv_out
            w_bits: float
        """,
    )
    recipe = load_recipe(str(path))
    base = load_recipe("w8a8-modiff-deepcache")
    assert recipe.name == "recipe"
    assert recipe.description == base.description
    assert recipe.strict is True
    assert recipe.defaults == base.defaults.updated({"a_bits": 6})
    assert recipe.rules[: len(base.rules)] == base.rules
    assert [(rule.patterns, rule.location) for rule in recipe.rules[len(base.rules) :]] == [
        (("conv_out",), Location(str(path), 6))
    ]
    plan = recipe.resolve(unet)
    assert set(plan.blocks) == DEEPCACHE_BLOCKS
    assert plan.layers["conv_out"].settings.w_bits == FLOAT_BITS
    timestep = {name for name in plan.layers if re.search(r"time_emb", name)}  # w8a8-modiff's rule keeps them at 8
    assert {plan.layers[name].settings.a_bits for name in timestep} == {8}
    assert {layer.settings.a_bits for name, layer in plan.layers.items() if name not in timestep} == {6}
    assert {layer.settings.scheme for layer in plan.layers.values()} == {"modiff"}


def test_extends_a_sibling_file_by_relative_name(tmp_path):
    """`extends` looks next to the extending file first, with or without `.yaml`."""
    write(
        tmp_path,
        "version: 1\ndescription: the base\ndefaults:\n  w_bits: 5\nrules:\n  - match: fc\n    a_bits: 3\n",
        "base.yaml",
    )
    child = write(tmp_path, "version: 1\nextends: base\ndefaults:\n  a_bits: 7\n", "child.yaml")
    recipe = load_recipe(str(child))
    assert (recipe.defaults.w_bits, recipe.defaults.a_bits, recipe.description) == (5, 7, "the base")
    assert [rule.location for rule in recipe.rules] == [Location(str(tmp_path / "base.yaml"), 6)]
    plan = recipe.resolve(TinyNet())
    assert (plan.layers["fc"].settings.w_bits, plan.layers["fc"].settings.a_bits) == (5, 3)


def test_extends_cycle_is_an_error(tmp_path):
    """a extends b extends a must fail with a RecipeError naming the cycle, not recurse forever."""
    a = write(tmp_path, "version: 1\nextends: b.yaml\n", "a.yaml")
    b = write(tmp_path, "version: 1\nextends: a.yaml\n", "b.yaml")
    error = recipe_error(a)
    assert "extends cycle: a.yaml -> b.yaml -> a.yaml" in str(error)
    assert_located(error, b, 2)
    loop = write(tmp_path, "version: 1\nextends: loop\n", "loop.yaml")
    assert "extends cycle: loop.yaml -> loop.yaml" in str(recipe_error(loop))


def test_extends_missing_recipe_names_the_line(tmp_path):
    """A misspelled base recipe is reported at the `extends` line with the nearest shipped name."""
    path = write(tmp_path, "version: 1\ndescription: typo in base\nextends: w8a8-modif\n")
    error = recipe_error(path)
    assert_located(error, path, 3)
    assert "did you mean 'w8a8-modiff'" in str(error)


def test_error_inside_the_base_names_the_base_file(tmp_path):
    """An invalid base recipe is reported in the base file, not in the file that extends it."""
    base = write(tmp_path, "version: 1\ndefaults:\n  a_bits: 1\n", "base.yaml")
    child = write(tmp_path, "version: 1\nextends: base.yaml\n", "child.yaml")
    assert_located(recipe_error(child), base, 3)


# ----------------------------------------------------------------------------------------------
# 7. block rules


def test_rule_matching_blocks_and_layers_is_an_error(tmp_path, unet):
    """`re:up_blocks\\.0(\\..*)?` catches the block and its convs: ambiguous, so rejected."""
    path = write(
        tmp_path,
        "version: 1\nrules:\n  - match: Linear\n    a_bits: 6\n  - match: re:up_blocks\\.0(\\..*)?\n    a_bits: 4\n",
    )
    error = recipe_error(path, unet)
    assert_located(error, path, 5)
    assert "matches both layers" in str(error) and "up_blocks.0" in str(error)


def test_block_rule_setting_w_bits_is_an_error(tmp_path, unet):
    """A block only takes a_bits: 0 (+ steps); w_bits on a block is rejected at its line."""
    path = write(tmp_path, "version: 1\nrules:\n  - match: mid_block\n    w_bits: 4\n")
    error = recipe_error(path, unet)
    assert_located(error, path, 3)
    assert "mid_block" in str(error) and "only take" in str(error)
    path = write(tmp_path, "version: 1\nrules:\n  - match: mid_block\n    a_bits: 4\n")
    assert_located(recipe_error(path, unet), path, 3)


def test_block_rule_without_steps_skips_on_every_step(tmp_path, unet):
    """a_bits: 0 on a block with no `steps` caches it on all steps; its layers are untouched."""
    plan = resolve_text(tmp_path, "version: 1\nrules:\n  - match: up_blocks.3\n    a_bits: 0\n", unet)
    assert set(plan.blocks) == {"up_blocks.3"}
    assert all(plan.blocks["up_blocks.3"].schedule.contains(step) for step in range(20))
    assert not any(layer.has_skips for layer in plan.layers.values())


def test_layer_rule_with_steps_sets_zero_bit_steps_only(tmp_path):
    """`a_bits: 0` + steps on a layer adds a 0-bit schedule but keeps its a_bits for other steps."""
    plan = resolve_text(
        tmp_path,
        "version: 1\nrules:\n  - match: fc\n    a_bits: 0\n    steps: [2, 5]\n  - match: conv\n    a_bits: 0\n",
        TinyNet(),
    )
    fc, conv = plan.layers["fc"], plan.layers["conv"]
    assert fc.settings.a_bits == 8 and [fc.skips(step) for step in range(7)] == [
        False,
        False,
        True,
        False,
        False,
        True,
        False,
    ]
    assert conv.settings.a_bits == 0 and all(conv.skips(step) for step in range(7))
    assert not plan.layers["conv_in"].has_skips and plan.blocks == {}


# ----------------------------------------------------------------------------------------------
# 8. step schedules


@pytest.mark.parametrize(
    ("value", "inside", "outside"),
    [
        ("all", [0, 1, 2, 57, 10_000], []),
        ([1, 3], [1, 3], [0, 2, 4, 5]),
        ({"start": 2, "stop": 10, "every": 3}, [2, 5, 8], [0, 1, 3, 4, 6, 7, 9, 10, 11, 14]),
        ({"start": 1, "every": 2}, [1, 3, 5, 101], [0, 2, 4, 100]),
        ({"stop": 3}, [0, 1, 2], [3, 4]),
    ],
)
def test_step_schedule_contains(value, inside, outside):
    """Each schedule form contains exactly the steps it describes (stop is exclusive)."""
    schedule = StepSchedule.parse(value)
    assert [step for step in inside if not schedule.contains(step)] == []
    assert [step for step in outside if schedule.contains(step)] == []


@pytest.mark.parametrize(
    "value",
    [
        "none",
        "",
        None,
        3,
        [],
        [-1],
        [1.5],
        [True],
        ["1"],
        {},
        {"every": 0},
        {"start": -1},
        {"start": 5, "stop": 5},
        {"start": 6, "stop": 5},
        {"start": 1, "step": 2},
        {"start": "1"},
    ],
    ids=repr,
)
def test_step_schedule_rejects_invalid_forms(value):
    """Anything but all / a non-empty list of steps / a start-stop-every mapping is a ValueError."""
    with pytest.raises(ValueError):
        StepSchedule.parse(value)


# ----------------------------------------------------------------------------------------------
# 9. property tests of the parser

w_bits_values = st.one_of(st.integers(2, 16), st.just("float"))
a_bits_values = st.one_of(st.just(0), st.integers(2, 16), st.just("float"))
groups = st.integers(1, 256).map(lambda n: f"group:{n}")
w_granularities = st.one_of(st.sampled_from(["tensor", "channel"]), groups)
a_granularities = st.one_of(st.sampled_from(["tensor", "sample", "channel"]), groups)
first_steps = st.one_of(st.sampled_from(["fp", "quantized"]), st.integers(1, 20).map(lambda n: f"warmup:{n}"))
base_quantizers = st.one_of(
    st.just("dynamic"),
    st.builds(
        lambda observer: {"name": "static", "observer": observer}, st.sampled_from(["minmax", "ema_minmax", "mse"])
    ),
)
defaults_sections = st.fixed_dictionaries(
    {},
    optional={
        "w_bits": w_bits_values,
        "a_bits": a_bits_values,
        "scheme": st.sampled_from(["modiff", "plain"]),
        "base_quantizer": base_quantizers,
        "w_granularity": w_granularities,
        "a_granularity": a_granularities,
        "w_symmetric": st.booleans(),
        "a_symmetric": st.booleans(),
        "first_step": first_steps,
        "error_compensation": st.booleans(),
    },
)


def expected_settings(section: dict) -> LayerSettings:
    """What `section` must parse to, built independently of the recipe parser."""
    bits = lambda v: FLOAT_BITS if v == "float" else v  # noqa: E731
    expected = LayerSettings()
    values = {}
    for key, value in section.items():
        if key in ("w_bits", "a_bits"):
            values[key] = bits(value)
        elif key in ("w_granularity", "a_granularity"):
            values[key] = Granularity("group", int(value[6:])) if value.startswith("group:") else Granularity(value)
        elif key == "first_step":
            values[key] = FirstStep("warmup", int(value[7:])) if value.startswith("warmup:") else FirstStep(value)
        elif key == "base_quantizer":
            name, options = (
                (value, {})
                if isinstance(value, str)
                else (value["name"], {k: v for k, v in value.items() if k != "name"})
            )
            values.update(base_quantizer=name, base_quantizer_options=options)
        else:
            values[key] = value
    return expected.updated(values)


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(section=defaults_sections, flow_style=st.booleans())
def test_valid_defaults_round_trip(tmp_path, section, flow_style):
    """Any valid combination of default settings is parsed into exactly those values, with their lines."""
    path = tmp_path / "generated.yaml"
    path.write_text(
        yaml.safe_dump({"version": 1, "defaults": section}, default_flow_style=flow_style, sort_keys=False),
        encoding="utf-8",
    )
    recipe = load_recipe(str(path))
    assert recipe.defaults == expected_settings(section)
    assert recipe.rules == ()
    if not flow_style:  # block style: one key per line, so each setting's location is its own line
        for key in section:
            assert recipe.default_locations[key] == Location(str(path), line_of(path, f"{key}:")), key


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    key=st.one_of(st.text(min_size=1), st.text(string.ascii_lowercase + "_", min_size=1, max_size=12)).filter(
        lambda k: k not in TOP_LEVEL_KEYS
    )
)
def test_unknown_top_level_key_is_always_a_recipe_error(tmp_path, key):
    """Whatever string an unknown top-level key is, loading raises RecipeError and never anything else."""
    path = tmp_path / "generated.yaml"
    path.write_text(yaml.safe_dump({"version": 1, key: 1}, allow_unicode=True), encoding="utf-8")
    with pytest.raises(RecipeError, match="unknown top-level key") as info:
        load_recipe(str(path))
    assert info.value.location is not None and info.value.location.file == str(path)


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    key=st.sampled_from(["w_bits", "a_bits"]),
    value=st.one_of(st.integers(-100, 100), st.floats(allow_nan=False), st.text(max_size=8), st.booleans(), st.none()),
)
def test_bits_outside_the_valid_set_are_recipe_errors(tmp_path, key, value):
    """Bit-widths outside {0 (a only), 2..16, 32, 'float'} are rejected at the line of the key."""
    valid = {*range(2, 17), FLOAT_BITS, "float"} | ({0} if key == "a_bits" else set())
    path = tmp_path / "generated.yaml"
    path.write_text(yaml.safe_dump({"version": 1, "defaults": {key: value}}), encoding="utf-8")
    if value in valid and not isinstance(value, (bool, float)):
        assert getattr(load_recipe(str(path)).defaults, key) == (FLOAT_BITS if value == "float" else value)
    else:
        with pytest.raises(RecipeError, match=key):
            load_recipe(str(path))


# ----------------------------------------------------------------------------------------------
# regressions: bugs found while writing these tests


def test_non_scalar_yaml_key_is_a_recipe_error(tmp_path):
    """A complex YAML key (`? [a]`) is an invalid recipe and must be a RecipeError, not a TypeError."""
    path = write(tmp_path, "version: 1\n? [a, b]\n: 1\n")
    recipe_error(path)


@pytest.mark.parametrize("version", ["true", "1.0"])
def test_version_must_be_the_integer_1(tmp_path, version):
    """`version: true` / `1.0` are not schema version 1 (bit-widths already reject bools)."""
    path = write(tmp_path, f"version: {version}\n")
    assert_located(recipe_error(path), path, 1)


def test_explain_identifies_rules_from_the_base_file(tmp_path):
    """Rule lines from a base recipe must not be presented as lines of the extending file."""
    write(tmp_path, "version: 1\n\n\n\nrules:\n  - match: fc\n    a_bits: 4\n", "base.yaml")
    child = write(tmp_path, "version: 1\nextends: base.yaml\nrules:\n  - match: conv\n    a_bits: 6\n", "child.yaml")
    rows = explain_rows(load_recipe(str(child)).explain(TinyNet()))
    assert "base.yaml" in rows["fc"]


def test_unknown_observer_is_reported_at_resolve(tmp_path):
    """`observer: msee` can be judged before the model is changed and should name the recipe line."""
    path = write(tmp_path, "version: 1\ndefaults:\n  base_quantizer: {name: static, observer: msee}\n")
    error = recipe_error(path, TinyNet())
    assert_located(error, path, 3)


def test_public_api_exports_recipe_entry_points():
    """The recipe entry points used above are part of the package's public API."""
    for name in ("RecipeError", "Recipe", "load_recipe", "shipped_recipes"):
        assert name in modiff_quant.__all__


def test_with_base_quantizer_swaps_every_layer(tmp_path):
    """`--base-quantizer` / `Recipe.with_base_quantizer`: one switch puts every layer, rules
    included, on another base quantizer with its default options."""
    text = (
        "version: 1\ndefaults:\n  base_quantizer: {name: static, observer: mse}\n"
        "rules:\n  - match: fc\n    base_quantizer: static\n    a_bits: 4\n"
    )
    recipe = load_recipe(str(write(tmp_path, text)))
    plan = recipe.with_base_quantizer("dynamic").resolve(TinyNet())
    assert all(
        layer.settings.base_quantizer == "dynamic" and not layer.settings.base_quantizer_options
        for layer in plan.layers.values()
    )
    assert plan.layers["fc"].settings.a_bits == 4  # the rule's other settings stay
    with pytest.raises(KeyError, match="did you mean 'dynamic'"):
        recipe.with_base_quantizer("dynamc")


@pytest.mark.parametrize("base", ["dynamic", "static", "qdiffusion", "ptq4dm", "brevitas", "torchao_int4"])
@pytest.mark.parametrize("shipped", ["w8a4-modiff", "w8a4-plain", "w4a4-modiff"])
def test_every_base_quantizer_swaps_onto_the_shipped_recipes(shipped, base):
    """Swapping is one of the three jobs of the library: every shipped base quantizer takes the
    shipped recipes, adapting what it cannot serve (listed in `adapted` and by explain)."""
    recipe = load_recipe(shipped).with_base_quantizer(base)
    plan = recipe.resolve(TinyNet())
    assert {layer.settings.base_quantizer for layer in plan.layers.values()} == {base}
    calibrated = base in ("static", "qdiffusion", "ptq4dm", "brevitas")
    assert {str(layer.settings.a_granularity) for layer in plan.layers.values()} == (
        {"tensor"} if calibrated else {"sample"}
    )
    assert bool(recipe.adapted) == calibrated
    if calibrated:
        assert any(
            "defaults: a_granularity sample (from w8a8-modiff.yaml:17) -> tensor: " in a for a in recipe.adapted
        )
        assert all(adapted in recipe.explain(TinyNet()) for adapted in recipe.adapted)
    if base == "brevitas":  # its default injectors are symmetric: the asymmetric weights are adapted too
        assert any("defaults: w_symmetric False (from w8a8-modiff.yaml:15) -> True" in a for a in recipe.adapted)


def test_a_swap_onto_qdiffusion_equals_the_shipped_qdiffusion_recipe():
    """`w8a4-modiff` swapped onto Q-Diffusion is what the shipped `w8a4-modiff-qdiffusion` says."""
    swapped = load_recipe("w8a4-modiff").with_base_quantizer("qdiffusion").resolve(TinyNet())
    shipped = load_recipe("w8a4-modiff-qdiffusion").resolve(TinyNet())
    assert {n: p.settings for n, p in swapped.layers.items()} == {n: p.settings for n, p in shipped.layers.items()}


def test_a_swap_keeps_a_setting_the_user_pinned_and_names_its_line(tmp_path):
    """Only what the user wrote in their own recipe stays an error: their line is named."""
    path = write(tmp_path, "version: 1\nextends: w8a4-modiff\ndefaults:\n  a_granularity: sample\n")
    with pytest.raises(
        RecipeError,
        match=r"recipe.yaml:4: a_granularity sample is set here, and base quantizer "
        r"'qdiffusion' cannot serve it .*remove the line",
    ):
        load_recipe(str(path)).with_base_quantizer("qdiffusion")
    rule = write(
        tmp_path, "version: 1\nextends: w8a4-modiff\nrules:\n  - match: fc\n    a_granularity: sample\n", "r.yaml"
    )
    with pytest.raises(RecipeError, match=r"r.yaml:5: a_granularity sample is set here"):
        load_recipe(str(rule)).with_base_quantizer("brevitas")
    inherited = write(tmp_path, "version: 1\nextends: w8a4-modiff\ndefaults:\n  a_bits: 6\n", "inherited.yaml")
    assert load_recipe(str(inherited)).with_base_quantizer("ptq4dm").defaults.a_granularity == Granularity("tensor")


def test_shipped_recipes_keep_the_timestep_embedding_at_8_bits():
    """`w8a8-modiff`'s rule reaches every recipe built on it: on a diffusers UNet and on a DiT
    the timestep embedding's layers run at A8 and every other weight layer at the recipe's width."""
    from helpers import tiny_dit_pipeline, tiny_unet

    for model in (tiny_unet(), tiny_dit_pipeline().transformer):
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # the rule matches something on both
            plan = load_recipe("w8a3-modiff").resolve(model)
        layers = {name: layer for name, layer in plan.layers.items() if layer.has_weight}
        embedding = [name for name in layers if re.search(r"time_emb|timestep_embedder", name)]
        assert embedding and all(layers[name].settings.a_bits == 8 for name in embedding)
        assert {layer.settings.a_bits for name, layer in layers.items() if name not in embedding} == {3}
