"""Recipe loading on hostile input: any bytes give a Recipe or a RecipeError at file:line, fast.

A recipe is data that may come from a stranger (a checkpoint's recipe.yaml, a shared file). These
tests pin the limits of docs/recipes.md#limits and the load-time fixes of issue 14: linear-time
regexes (RE2), bounded messages and documents (alias bombs, nesting, size), one documented error
type for every malformed input, and option values checked against the constructor's types.
"""

from __future__ import annotations

import re
import string
import time
import tracemalloc
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from modiff_quant import RecipeError, load_recipe
from modiff_quant.quoting import shown
from modiff_quant.recipe import Recipe, option_types, schema, source
from modiff_quant.recipe.schema import RULE_KEYS, TOP_KEYS
from modiff_quant.registry import BASE_QUANTIZERS
from modiff_quant.settings import SETTING_PARSERS

FAST = 1.0  # seconds of CPU: every input here is small, so a load that needs more is a hang in the making
AT_LIMIT = 3.0  # seconds of CPU for the largest documents the limits allow (0.4-1.4 s measured on 2-core CPUs)
PATIENT = 10.0  # seconds of wall time: a load that blocks (reads a pipe, waits on a lock) uses no CPU


class Bounded:
    """Asserts that its block took under `cpu` seconds of this process's CPU time (which other
    processes on a busy machine do not inflate) and under PATIENT seconds of wall time."""

    def __init__(self, cpu: float = FAST) -> None:
        self.limit = cpu

    def __enter__(self) -> None:
        self.cpu, self.wall = time.process_time(), time.perf_counter()

    def __exit__(self, *exc_info: object) -> None:
        cpu, wall = time.process_time() - self.cpu, time.perf_counter() - self.wall
        assert cpu < self.limit and wall < PATIENT, f"took {cpu:.2f} s of CPU, {wall:.2f} s in all"


def write_bytes(tmp_path: Path, data: bytes, name: str = "recipe.yaml") -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def line_of(data: bytes, needle: bytes) -> int:
    return data[: data.index(needle)].count(b"\n") + 1


def timed_error(path: Path) -> RecipeError:
    with Bounded(), pytest.raises(RecipeError) as info:
        load_recipe(path)
    return info.value


def assert_at(error: RecipeError, path: Path, line: int, *fragments: str) -> None:
    assert str(error).startswith(f"{path}:{line}: "), str(error)
    for fragment in fragments:
        assert fragment in str(error), str(error)


@pytest.fixture(params=["libyaml", "python"])
def parser(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Both PyYAML parsers: libyaml's (what PyYAML wheels have) and the pure-Python fallback."""
    if request.param == "python":
        monkeypatch.setattr(source, "_Base", yaml.SafeLoader)
    elif not yaml.__with_libyaml__:
        pytest.skip("PyYAML without libyaml")
    else:
        assert source._Base is yaml.CSafeLoader
    return request.param


# ----------------------------------------------------------------------------------------------
# every malformed input is a RecipeError at its line (issue 14: ten other exception kinds)

RULE = b"version: 1\nrules:\n  - match: %s\n    a_bits: 4\n"
HOSTILE = [
    # id, file content, bytes on the line the error must name, fragments of the message
    ("not-utf-8", b"version: 1\ndefaults:\n  a_bits: 4\n  \xff\xfe: 1\n", b"\xff", ["not UTF-8", "0xff"]),
    ("nul", b"version: 1\ndescription: a\x00b\n", b"\x00", ["U+0000 is not allowed"]),
    ("control-character", b"version: 1\n\ndescription: a\x07b\n", b"\x07", ["U+0007"]),
    ("seq-tag-on-mapping", b"version: 1\ndefaults: !!seq {a: 1}\n", b"!!seq", ["sequence"]),
    ("map-tag-on-list", b"version: 1\ndefaults: !!map [1]\n", b"!!map", ["needs a mapping"]),
    (
        "nested-300-deep",
        b"version: 1\ndescription: " + b"[" * 300 + b"]" * 300 + b"\n",
        b"[[",
        ["nested deeper than 32 levels"],
    ),
    (
        "5000-digit-integer",
        b"version: 1\ndefaults:\n  a_bits: " + b"9" * 5000 + b"\n",
        b"99",
        ["a number of 5000 characters", "limit is 100"],
    ),
    (
        "5000-digit-group",
        b"version: 1\ndefaults:\n  a_granularity: group:" + b"9" * 5000 + b"\n",
        b"group:",
        ["a_granularity", "group:999"],
    ),
    (
        "1000-nested-groups",
        RULE % (b"'re:" + b"(" * 1000 + b"a" + b")" * 1000 + b"'"),
        b"re:",
        ["2,004 characters; the limit is 1,000"],
    ),
    ("extends-300-characters", b"version: 1\nextends: " + b"x" * 300 + b"\n", b"extends", ["not a usable path"]),
    ("bad-int", b"version: 1\ndescription: !!int abc\n", b"!!int", ["invalid !!int value 'abc'"]),
    ("bad-bool", b"version: 1\ndescription: !!bool maybe\n", b"!!bool", ["invalid !!bool value 'maybe'"]),
    (
        "empty-int",
        b"version: 1\ndescription: !!int ''\n",
        b"!!int",
        ["invalid !!int value ''"],
    ),  # IndexError (found by the fuzz test)
    (
        "bad-date",
        b"version: 1\n\ndescription: 2001-13-45\n",
        b"2001",
        ["invalid !!timestamp value", "month must be in 1..12"],
    ),
    ("recursive-alias", b"version: 1\ndescription: &a [*a]\n", b"&a", ["recursive"]),
    (
        "python-tag",
        b"version: 1\ndescription: !!python/object/apply:os.system [ls]\n",
        b"!!python",
        ["could not determine a constructor"],
    ),
]


@pytest.mark.parametrize(("data", "needle", "fragments"), [pytest.param(*case[1:], id=case[0]) for case in HOSTILE])
def test_malformed_input_is_a_recipe_error_at_its_line(tmp_path, parser, data, needle, fragments):
    """What raised UnicodeDecodeError, ReaderError, OverflowError, OSError, AttributeError,
    TypeError, RecursionError or ValueError is a RecipeError naming the file and the line."""
    path = write_bytes(tmp_path, data)
    assert_at(timed_error(path), path, line_of(data, needle), *fragments)


def test_unknown_recipe_name_is_file_not_found_even_when_too_long_for_a_path():
    """A name that is no file and no shipped recipe stays FileNotFoundError (documented), whatever it is."""
    for name in ("no-such-recipe", "x" * 300, "a\x00b"):
        with pytest.raises(FileNotFoundError):
            load_recipe(name)


def test_a_file_that_cannot_be_read_is_a_recipe_error(tmp_path):
    """An OSError while reading (here: the path is a folder, as it can be for a gate file or after
    a race with whoever replaced the file) is a RecipeError at line 1 of that path."""
    with pytest.raises(RecipeError) as info:
        source.read_located(tmp_path)
    assert_at(info.value, tmp_path, 1, "cannot read the file: Is a directory")


def test_extends_chain_is_capped_at_its_extends_line(tmp_path):
    """A 1,200-file chain was a RecursionError; the 16th file's extends line now names the limit."""
    for i in range(1200):
        write_bytes(
            tmp_path, b"version: 1\nextends: r%d.yaml\n" % (i + 1) if i < 1199 else b"version: 1\n", f"r{i}.yaml"
        )
    error = timed_error(tmp_path / "r0.yaml")
    assert_at(
        error,
        tmp_path / f"r{schema.MAX_EXTENDS - 1}.yaml",
        2,
        f"extends chain longer than {schema.MAX_EXTENDS} recipes: r0.yaml -> r1.yaml -> r2.yaml -> ...",
    )
    assert load_recipe(tmp_path / f"r{1200 - schema.MAX_EXTENDS}.yaml").rules == ()  # 16 files: fine


# ----------------------------------------------------------------------------------------------
# bounded documents and messages


def alias_bomb(levels: int) -> bytes:
    """The classic billion laughs: each level lists the previous one 9 times (9**levels strings)."""
    lines = ["version: 1", f"_0: &a0 [{', '.join(['lol'] * 9)}]"]
    lines += [f"_{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, levels)]
    return "\n".join([*lines, f"description: *a{levels - 1}", ""]).encode()


def test_alias_bomb_is_refused_by_its_expanded_size(tmp_path):
    """A 500-byte bomb made a 351 MB message (9.9 s, 1.5 GB); now the parser's events are counted,
    aliases expanded, and the load stops at the limit before anything is built."""
    data = alias_bomb(9)
    assert len(data) < 600
    path = write_bytes(tmp_path, data)
    tracemalloc.start()
    try:
        error = timed_error(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert_at(error, path, line_of(data, b"&a4"), f"more than {source.MAX_VALUES:,} values")  # 9**5 values
    assert peak < 20 << 20


def test_values_in_messages_are_truncated(tmp_path):
    """Messages embedded `{value!r}`: an aliased list of 5,000 strings, or 500 KB of text, in a
    setting now gives a message of a few hundred characters."""
    path = write_bytes(
        tmp_path,
        b"version: 1\ndefaults:\n  a_bits: &a ["
        + b", ".join([b"lol"] * 9)
        + b"]\n  w_bits: ["
        + b", ".join([b"*a"] * 500)
        + b"]\n",
    )
    error = timed_error(path)
    assert_at(error, path, 4, "w_bits: expected", "got [['lol', 'lol'")  # w_bits is checked first
    assert len(str(error)) < 300
    path = write_bytes(
        tmp_path, b"version: 1\ndescription: [" + b", ".join([b"x" * 100_000] * 5) + b"]\n", "long.yaml"
    )
    error = timed_error(path)
    assert_at(error, path, 2, "description must be a string, got ['xxx")
    assert len(str(error)) < 300


def test_nesting_through_aliases_counts_what_they_stand_for(tmp_path):
    """Depth is checked on the expanded document: 20 levels aliased inside 20 levels is 40."""
    data = (
        b"version: 1\nx: &deep "
        + b"[" * 20
        + b"]" * 20
        + b"\ndescription: "
        + b"[" * 20
        + b"*deep"
        + b"]" * 20
        + b"\n"
    )
    path = write_bytes(tmp_path, data)
    assert_at(timed_error(path), path, 3, "nested deeper than 32 levels")


@pytest.mark.parametrize("extra", [0, 1])
def test_file_size_is_checked_before_reading(tmp_path, extra):
    """1 MiB of recipe text at most: at the limit the text is parsed, one byte more is refused."""
    head = b"version: 1\n"
    data = head + b"#" * (source.MAX_BYTES - len(head) - 1 + extra) + b"\n"
    path = write_bytes(tmp_path, data)
    if extra:
        assert_at(timed_error(path), path, 1, f"over {source.MAX_BYTES:,} bytes")
    else:
        with Bounded():
            assert isinstance(load_recipe(path), Recipe)


def test_size_limit_is_shared_along_the_extends_chain(tmp_path):
    """The files of a chain share one budget, so 16 files cannot make 16 times the work."""
    half = b"#" * (source.MAX_BYTES // 2) + b"\n"
    write_bytes(tmp_path, b"version: 1\n" + half, "base.yaml")
    path = write_bytes(tmp_path, b"version: 1\nextends: base\n" + half)
    assert_at(timed_error(path), tmp_path / "base.yaml", 1, "over 1,048,576 bytes")


def test_documents_at_the_value_limit_load_fast(tmp_path):
    """The slowest documents within the limits (every value a separate rule, or a flat list) load
    within AT_LIMIT: 0.25 s of CPU on one 2-core machine, 0.4-1.4 s on a slower one without
    VNNI/AMX (1.2 s inside the full suite); a parse superlinear in the values would take minutes."""
    rules = b"".join(b"  - {match: down_blocks.%d.conv1, a_bits: 4}\n" for i in range((source.MAX_VALUES - 10) // 5))
    for name, data in (
        ("rules", b"version: 1\nrules:\n" + rules),
        ("list", b"version: 1\ndescription: [" + b"1, " * (source.MAX_VALUES - 10) + b"]\n"),
    ):
        path = write_bytes(tmp_path, data, f"{name}.yaml")
        with Bounded(AT_LIMIT):
            try:
                load_recipe(path)
            except RecipeError as error:
                assert name == "list" and "description must be a string" in str(error)


# ----------------------------------------------------------------------------------------------
# RE2 regexes


class Named(nn.Module):
    """A module tree with the given child names (each a Linear)."""

    def __init__(self, *names: str) -> None:
        super().__init__()
        for name in names:
            self.add_module(name, nn.Linear(2, 2))


def one_rule(tmp_path: Path, pattern: str) -> Recipe:
    return load_recipe(write_bytes(tmp_path, RULE % f"'{pattern}'".encode()))


def test_backtracking_pattern_matches_in_linear_time(tmp_path):
    """`(.|.)*Z` took Python's re 2**n steps on an n-letter name (it hung load, prepare, explain)."""
    recipe = one_rule(tmp_path, "re:(.|.)*Z")
    model = Named("a" * 60, "b" * 59 + "Z")
    with Bounded():
        plan = recipe.resolve(model)
    assert plan.layers["b" * 59 + "Z"].rules and not plan.layers["a" * 60].rules


def test_regex_is_compiled_once_per_rule(tmp_path, monkeypatch):
    recipe = one_rule(tmp_path, r"re:l\d")
    calls = []
    monkeypatch.setattr(schema.re2, "compile", lambda *args: calls.append(args))
    recipe.resolve(Named(*(f"l{i}" for i in range(10))))
    assert calls == []


@pytest.mark.parametrize(
    ("pattern", "problem"),
    [
        ("re:(?=conv)conv_in", "invalid perl operator: (?="),  # lookahead
        (r"re:(conv)\1", r"invalid escape sequence: \1"),  # backreference
        ("re:conv(", "missing )"),
        ("re:a{1001}", "invalid repetition size"),
        ("re:(" + r"\pL" * 30 + "){30}", "pattern too large"),  # over RE2's memory budget
    ],
)
def test_pattern_re2_refuses_is_an_error_naming_re2_and_the_problem(tmp_path, pattern, problem):
    path = write_bytes(tmp_path, RULE % f"'{pattern}'".encode())
    assert_at(timed_error(path), path, 3, "invalid regex", "RE2 syntax", problem)


def test_repetition_count_re2_cannot_read_is_literal_text(tmp_path):
    """`a{4294967296}` was an OverflowError in Python's re. RE2 reads a `{` that starts no valid
    repetition as a literal brace, so the rule matches that text only (a rule matching nothing
    warns at resolve)."""
    rule = one_rule(tmp_path, "re:a{4294967296}").rules[0]
    assert rule.matches("a{4294967296}", nn.Identity())
    assert not rule.matches("a" * 10, nn.Identity())


def test_regex_count_is_capped_across_the_chain(tmp_path):
    """Each compiled regex holds up to 64 KiB: 256 of them in a recipe and its bases at most."""
    rules = b"".join(b"  - {match: 're:l%d', a_bits: 4}\n" % i for i in range(schema.MAX_REGEXES - 1))
    write_bytes(tmp_path, b"version: 1\nrules:\n" + rules, "base.yaml")
    assert len(load_recipe(tmp_path / "base.yaml").rules) == schema.MAX_REGEXES - 1
    path = write_bytes(tmp_path, b"version: 1\nextends: base\nrules:\n  - {match: ['re:x', 're:y'], a_bits: 4}\n")
    assert_at(timed_error(path), path, 4, f"more than {schema.MAX_REGEXES} 're:' patterns")


# ----------------------------------------------------------------------------------------------
# settings accepted at load that failed or hung later


@pytest.mark.parametrize(
    ("setting", "accepted"),
    [
        ("timestep_groups: 100000", False),  # took 7 s before it was rejected
        ("timestep_groups: 101", False),
        ("timestep_groups: 100", True),
        ("timestep_groups: {count: 2, range: [-.inf, .inf]}", False),
        ("timestep_groups: {count: 2, range: [0, .inf]}", False),
        ("timestep_groups: {count: 2, range: [.nan, 1]}", False),
        ("timestep_groups: {count: 2, range: [-1.0e+308, 1.0e+308]}", False),  # the width overflows
        ("timestep_groups: {count: 2, range: [-5, 5]}", True),
        ("first_step: warmup:99999999", False),  # accepted, and never returned
        ("first_step: warmup:65", False),
        ("first_step: warmup:64", True),
    ],
)
def test_counts_and_ranges_are_bounded_at_load(tmp_path, setting, accepted):
    path = write_bytes(
        tmp_path, f"version: 1\ndefaults:\n  base_quantizer: static\n  a_granularity: tensor\n  {setting}\n".encode()
    )
    if accepted:
        load_recipe(path)
    else:
        assert_at(timed_error(path), path, 5, setting.split(":")[0], "got")


OPTION_CASES = [
    # base_quantizer value, accepted, fragments of the error
    ("{name: ptq4dm, seed: x}", False, ["option 'seed': expected int, got 'x'"]),
    ("{name: ptq4dm, seed: true}", False, ["option 'seed': expected int, got True"]),
    ("{name: ptq4dm, seed: 3}", True, []),
    ("{name: qdiffusion, weight_lr: 1e-3}", False, ["option 'weight_lr': expected float, got '1e-3'", "write 0.001"]),
    ("{name: qdiffusion, weight_lr: 1.0e3}", False, ["write 1000.0"]),
    ("{name: qdiffusion, weight_lr: 1.0e-3}", True, []),
    ("{name: qdiffusion, weight_lr: 1}", True, []),  # an int is a float
    ("{name: qdiffusion, weight_lr: .nan}", False, ["NaN is never a valid option"]),
    ("{name: qdiffusion, beta: [20, x]}", False, ["option 'beta': expected Sequence[float], got [20, 'x']"]),
    (
        "{name: qdiffusion, blocks: ResnetBlock2D}",
        False,
        ["option 'blocks': expected Sequence[str] | None"],
    ),  # a str is no list of names
    ("{name: qdiffusion, blocks: [ResnetBlock2D], beta: [20, 2]}", True, []),
    (
        "{name: static, observer_options: [2.4]}",
        False,
        ["option 'observer_options': expected dict[str, Any] | None, got [2.4]"],
    ),
    ("{name: static, observer_options: {1: 2.4}}", False, ["expected dict[str, Any] | None"]),
    (
        "{name: torchao_int4, fallback: zero}",
        False,
        ["option 'fallback': expected one of 'channel', 'float', got 'zero'"],
    ),
    ("{name: brevitas, calibration: 1}", False, ["option 'calibration': expected one of 'range', 'per_call', got 1"]),
]


@pytest.mark.parametrize(
    ("value", "accepted", "fragments"), [pytest.param(*case, id=case[0]) for case in OPTION_CASES]
)
def test_option_values_are_checked_against_the_constructor_types(tmp_path, value, accepted, fragments):
    """`seed: x` and `weight_lr: 1e-3` (a string in YAML 1.1) loaded and failed at calibration."""
    path = write_bytes(
        tmp_path, f"version: 1\ndefaults:\n  a_granularity: tensor\n  base_quantizer: {value}\n".encode()
    )
    if accepted:
        load_recipe(path)
    else:
        assert_at(timed_error(path), path, 4, *fragments)


class Injector:
    """Stands for a Brevitas injector class (its options are typed `str | Injector | None`, Injector = Any)."""


@pytest.mark.parametrize(
    ("value", "hint", "fits"),
    [
        (Injector, str | Any | None, True),
        (1, float, True),
        (True, int, False),
        (1.5, int, False),
        (None, int | None, True),
        ("a", Literal["a", "b"], True),
        ("c", Literal["a", "b"], False),
        (1, Literal[True], False),  # 1 == True, but not the same type
        ([1, 2.5], list[float], True),
        ((1, 2), list[float], False),
        ([1, 2], tuple[int, int], True),
        ([1, 2, 3], tuple[int, int], False),
        ([1, 2, 3], tuple[int, ...], True),
        ("ab", Sequence[str], False),
        ({"p": 1}, dict[str, float], True),
        ({"p": "x"}, dict[str, float], False),
        ({"p": "x"}, typing.Mapping[str, Any], True),
        (Injector, type, True),
        (1, type, False),
    ],
)
def test_type_check_of_option_values(value, hint, fits):
    assert option_types._conforms(value, hint) is fits


def test_brevitas_options_take_injector_classes():
    """The annotations resolve without importing Brevitas, and a class passes `Injector = Any`."""
    from modiff_quant.backends.brevitas import BrevitasQuantizer

    hints = option_types._option_hints(BrevitasQuantizer)
    assert option_types._conforms(Injector, hints["weight_quant"]) and option_types._conforms(
        "Int8WeightPerTensorFloat", hints["act_quant"]
    )


TORCHAO = (
    "version: 1\ndefaults:\n  base_quantizer: {base}\n  w_bits: 4\n  w_symmetric: false\n"
    "  w_granularity: {granularity}\n"
)


@pytest.mark.parametrize(
    ("layer", "granularity", "remedy"),
    [
        (nn.Linear(64, 16), "group:1", {"base": "torchao_int4", "granularity": "group:2"}),
        (nn.Conv2d(4, 8, 3), "group:1", {"base": "torchao_int4", "granularity": "group:2"}),
        (
            nn.Linear(1, 16),
            "channel",
            {"base": "{name: torchao_int4, fallback: float}", "granularity": "group:2"},
        ),  # one input: one element per channel
    ],
)
def test_torchao_int4_refuses_groups_of_one_element_at_resolve(tmp_path, layer, granularity, remedy):
    """torchao's choose_qparams_affine cannot reduce a block of one element (it failed at convert
    with "shape '[16, 64]' is invalid for input of size 1"): refused at the w_granularity line."""
    path = write_bytes(tmp_path, TORCHAO.format(base="torchao_int4", granularity=granularity).encode())
    with pytest.raises(RecipeError) as info:
        load_recipe(path).resolve(nn.Sequential(layer))
    assert_at(info.value, path, 6, "torchao cannot quantize groups of one weight element")
    load_recipe(write_bytes(tmp_path, TORCHAO.format(**remedy).encode(), "remedy.yaml")).resolve(nn.Sequential(layer))


# ----------------------------------------------------------------------------------------------
# fuzz: any bytes give a Recipe or a located RecipeError, quickly, with a short message


YAML_BREAK = re.compile("\r\n|[\r\n\x85\u2028\u2029]")  # what YAML 1.1 counts as a line break


def check_outcome(path: Path) -> None:
    """load_recipe returns a Recipe, or raises RecipeError whose message starts with file:line
    of a line of a real file, in under a second, with a message of bounded length."""
    try:
        with Bounded():
            load_recipe(path)
    except RecipeError as error:
        location = error.location
        assert location is not None and str(error).startswith(f"{location}: "), str(error)
        lines = len(YAML_BREAK.findall(Path(location.file).read_bytes().decode("utf-8", errors="replace"))) + 1
        assert 1 <= location.line <= lines, str(error)
        assert len(str(error)) < 1500, str(error)[:300]


OPTIONS = sorted(
    {
        name
        for quantizer in ("static", "qdiffusion", "ptq4dm", "torchao_int4")
        for name in option_types._option_hints(BASE_QUANTIZERS.get(quantizer))
    }
    - {"return"}
)
KEYS = [
    *TOP_KEYS,
    *RULE_KEYS,
    *SETTING_PARSERS,
    *OPTIONS,
    "name",
    "count",
    "range",
    "start",
    "stop",
    "every",
    "refresh_every",
    "observer",
    "p",
]
NAMES = [
    "dynamic",
    "static",
    "qdiffusion",
    "ptq4dm",
    "torchao_int4",
    "modiff",
    "plain",
    "w8a4-modiff",
    "conv_in",
    "Linear",
    "mse",
    "minmax",
]
HOSTILE_TEXT = [
    "re:(.|.)*Z",
    "re:a{4294967296}",
    "re:(?=a)",
    "re:(a)\\1",
    "re:" + "(" * 50,
    "warmup:99999999",
    "warmup:2",
    "group:1",
    "group:0",
    "group:" + "9" * 50,
    "1e-3",
    "fp",
    "float",
    "all",
    "sample",
    "tensor",
    "channel",
    "x" * 300,
    "/dev/zero",
    "\u2028",
    "\x85",
    "\ufeff",
]
scalars = st.one_of(
    st.integers(-(10**30), 10**30),
    st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(),
    st.none(),
    st.sampled_from(KEYS + NAMES + HOSTILE_TEXT),
    st.text(max_size=20),
)
documents = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=8), inner, max_size=5)
    ),
    max_leaves=25,
)
recipes = st.fixed_dictionaries(
    {"version": st.sampled_from([1, 1, 1, "1", 2])}, optional={key: documents for key in TOP_KEYS if key != "version"}
)
SNIPPETS = [
    "!!seq ",
    "!!map ",
    "!!set ",
    "!!omap ",
    "!!binary ",
    "!!timestamp ",
    "!!int ",
    "!!float ",
    "!!bool ",
    "!!str ",
    "!!null ",
    "!!python/object/apply:os.system ",
    "!foo ",
    "&a ",
    "&b ",
    "*a",
    "*b",
    "<<: *a\n",
    "[",
    "]",
    "{",
    "}",
    ": ",
    "- ",
    "\n",
    "\n  ",
    "'",
    '"',
    "---\n",
    "...\n",
    "? ",
    "|\n",
    ">\n",
    "%YAML 1.1\n",
    "#",
    "\t",
    "\x00",
    "\x07",
    "\ud7ff",
    "\U0001f600",
    "9" * 120,
    "re:(a|a)*b",
]
FUZZ = settings(
    max_examples=300,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@FUZZ
@given(data=st.binary(max_size=400), header=st.booleans())
def test_fuzz_random_bytes(tmp_path, data, header):
    check_outcome(write_bytes(tmp_path, (b"version: 1\n" if header else b"") + data))


@pytest.mark.slow
@FUZZ
@given(
    document=recipes,
    flow=st.booleans(),
    edits=st.lists(st.tuples(st.floats(0, 1), st.sampled_from(SNIPPETS) | st.text(max_size=3)), max_size=6),
)
def test_fuzz_recipe_structure_with_tags_anchors_and_aliases(tmp_path, document, flow, edits):
    """Recipes built from the real keys and values, dumped, then edited at random places: YAML
    tags, anchors, aliases, merge keys, brackets, control characters and long numbers."""
    text = yaml.safe_dump(document, default_flow_style=flow, allow_unicode=True, sort_keys=False)
    for where, snippet in edits:
        cut = int(where * len(text))
        text = text[:cut] + snippet + text[cut:]
    check_outcome(write_bytes(tmp_path, text.encode("utf-8", errors="surrogatepass")))


@FUZZ
@given(
    levels=st.integers(1, 8),
    width=st.integers(1, 12),
    depth=st.integers(0, 40),
    place=st.sampled_from(
        [
            "description: {}",
            "strict: {}",
            "rules: {}",
            "rules: [{{match: {}, a_bits: 4}}]",
            "defaults: {{a_bits: {}}}",
            "defaults: {{base_quantizer: {{name: static, observer_options: {}}}}}",
        ]
    ),
)
def test_fuzz_alias_and_nesting_shapes(tmp_path, levels, width, depth, place):
    """Aliases of aliases (up to 12**8 values) nested up to 40 deep, as the value of a real key."""
    anchors = ["&a0 [lol]"] + [f"&a{i} [{', '.join([f'*a{i - 1}'] * width)}]" for i in range(1, levels)]
    value = f"[{', '.join(anchors)}, {'[' * depth}*a{levels - 1}{']' * depth}]"
    check_outcome(write_bytes(tmp_path, f"version: 1\n{place.format(value)}\n".encode()))


def test_shown_is_bounded_for_any_value():
    """The repr helper of every message: short for huge, deep or shared values."""
    shared: list[Any] = ["x" * 10**6]
    for _ in range(30):
        shared = [shared] * 10  # 10**30 leaves if expanded
    values = (shared, "y" * 10**6, {str(i): i for i in range(10**5)}, 10**5000, source.LocatedDict(a=shared))
    with Bounded():
        assert all(len(shown(value)) <= 80 for value in values)
    assert shown(string.ascii_letters) == repr(string.ascii_letters)
