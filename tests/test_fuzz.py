"""Fuzz suite: recipes, saved checkpoints and command lines as a stranger may write them.

Each test generates inputs from the real grammar (the recipe keys of `modiff_quant.recipe.schema`,
the files `save_quantized` writes, the `modiff-quant` parser) plus hostile variations, and checks
the documented contracts on every call: only the documented error type (`RecipeError` starting
with `file:line:`, `LoadError`, or exit status 2 with one `modiff-quant: error:` line), a bound
on time, memory and message size, the model unchanged after a failure, no import of a module that
is neither stdlib nor installed (a payload module planted on sys.path and next to the files must
never run).

CI runs the `fuzz` hypothesis profile (tests/conftest.py: derandomized, about a minute);
`--hypothesis-profile=fuzz-long` explores at random for much longer. `--hypothesis-show-statistics`
prints the number of cases per test and how they ended.
"""

from __future__ import annotations

import copy
import hashlib
import io
import json
import shutil
import sys
from collections.abc import Callable, Iterator
from contextlib import chdir, redirect_stderr, redirect_stdout
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from fuzz_support import (
    PAYLOAD_PREFIX,
    FuzzEnv,
    ModelSnapshot,
    Outcome,
    Overran,
    Payload,
    Raw,
    Terse,
    clean_folder,
    location_problem,
    message_problem,
    recipe_yaml,
)
from helpers import ddim_inputs, tiny_unet
from hypothesis import event, given, settings
from hypothesis import strategies as st

import modiff_quant as mq
from modiff_quant.recipe.schema import RULE_KEYS, TOP_KEYS
from modiff_quant.serialization import PLAN, RECIPE, TENSORS
from modiff_quant.settings import SETTING_PARSERS

LOAD_LIMIT = 3.0  # seconds: load_recipe of any file
# resolve, explain, prepare on the tiny UNet; load_quantized; one sampling step. A hang detector, not a
# speed target: a Brevitas recipe's load + resolve + prepare takes ~4.2 s of wall time on a 2-core CPU
# without VNNI/AMX, which broke the old 5 s bound with no change to the library
MODEL_LIMIT = 15.0
CLI_LIMIT = 15.0  # one modiff-quant command up to its expensive work

PAYLOAD = f"{PAYLOAD_PREFIX}MODULE"  # replaced by the session's payload module name when files are written

# a hang that the per-call bound cannot interrupt (C code) fails the run instead of hanging CI;
# generous, as shrinking a failure replays slow cases many times
pytestmark = [pytest.mark.timeout(900, method="thread"), pytest.mark.slow]


def fuzz_settings(share: float) -> settings:
    """The active fuzz profile (`fuzz` unless `fuzz-long` was selected) with `share` of its cases."""
    name = settings.get_current_profile_name()
    profile = settings.get_profile(name if name.startswith("fuzz") else "fuzz")
    return settings(profile, max_examples=max(1, round(profile.max_examples * share)))


# =============================================================================================
# shared fixtures


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> Iterator[FuzzEnv]:
    root = tmp_path_factory.mktemp("fuzz")
    (root / "on-path").mkdir()
    payload = Payload.plant(root / "on-path", root)
    fuzz = FuzzEnv(root, payload)
    try:
        yield fuzz
    finally:
        sys.path.remove(str(root / "on-path"))


@dataclass(frozen=True, repr=False)
class FloatModel(Terse):
    """The float tiny UNet every case starts from (a copy of it), and its snapshot."""

    model: torch.nn.Module
    snapshot: ModelSnapshot

    def fresh(self) -> torch.nn.Module:
        return tiny_unet(seed=1)  # the same weights as `model`, and faster than a deep copy

    def __repr__(self) -> str:
        return "FloatModel(tiny UNet)"


@pytest.fixture(scope="module")
def float_unet() -> FloatModel:
    """Recipes that import optional packages (Brevitas, torchao) are prepared once first, so that
    the imports are not charged to a case."""
    model = tiny_unet(seed=1)
    for name in ("w8a4-modiff-brevitas", "w8a4-modiff-torchao", "w8a4-modiff-ptq4dm"):
        recipe = mq.load_recipe(name)
        recipe.explain(model)
        mq.prepare(copy.deepcopy(model), recipe)
    return FloatModel(model, ModelSnapshot.take(model))


@dataclass
class Report:
    """The problems found in one case; raised as one exception whose class names the first problem,
    so that hypothesis keeps (and shrinks) each kind of failure separately."""

    problems: list[tuple[str, str]] = field(default_factory=list)  # (kind, text)

    def add(self, kind: str, text: str) -> None:
        self.problems.append((kind, text))

    def bounds(self, outcome: Outcome) -> None:
        for kind, text in outcome.bound_problems():
            self.add(f"{outcome.what}: {kind}", text)

    def unexpected(self, outcome: Outcome, expected: str) -> None:
        error = outcome.error
        if isinstance(error, Overran):  # reported by `bounds`
            return
        self.add(
            f"{outcome.what} raised {type(error).__name__} at {outcome.where}",
            f"{outcome.what} raised {outcome.describe_error()} (documented: {expected})",
        )

    def changed(self, what: str, model: torch.nn.Module, snapshot: ModelSnapshot) -> None:
        differences = snapshot.differences(model)
        if differences:
            self.add(f"{what} changed the model", f"{what} changed the model: {'; '.join(differences)}")

    def check(self) -> None:
        if self.problems:
            kind = self.problems[0][0]
            raise _violation(kind)("\n".join(f"- {text}" for _, text in self.problems))


_VIOLATIONS: dict[str, type[AssertionError]] = {}


def _violation(kind: str) -> type[AssertionError]:
    if kind not in _VIOLATIONS:
        _VIOLATIONS[kind] = type(f"Violation[{kind}]", (AssertionError,), {})
    return _VIOLATIONS[kind]


def _ending(outcome: Outcome) -> str:
    return "ok" if outcome.error is None else type(outcome.error).__name__


# =============================================================================================
# 1. recipes: text and structure

LAYERS = (
    "conv_in",
    "conv_out",
    "time_embedding.linear_1",
    "down_blocks.1.attentions.0.to_q",
    "up_blocks.0.resnets.1.conv_shortcut",
    "mid_block.attentions.0.to_out.0",
    "down_blocks.0.downsamplers.0.conv",
)
BLOCKS = ("up_blocks.0", "up_blocks.1", "mid_block", "down_blocks.1", "down_blocks.0.resnets.0")
CLASSES = ("Conv2d", "Linear", "UpBlock2D", "ResnetBlock2D", "Attention", "GroupNorm", "UNet2DModel")
SHIPPED = ("w8a4-modiff", "w8a8-modiff-deepcache", "w8a4-modiff-brevitas", "w8a4-modiff-torchao", "adaptive-cache")

REGEXES_VALID = (
    ".*",
    r"up_blocks\.0\..*",
    r".*attentions\.\d+\.to_[qkv]",
    "conv_(in|out)",
    "mid_block",
    r".*resnets\.[01]\.conv1",
    "(?i)CONV_IN",
    r"(up|down)_blocks\.\d+",
    r".*\.to_out\.0",
)
REGEXES_PATHOLOGICAL = (
    "(.|.)*Z",
    "(a+)+$",
    r"(\w+\.?)*Z",
    "((((.*)*)*)*)*Z",
    "(x+x+)+y",
    "(.*a){20}",
    r"(\d|\d\d)*Z",
    "([a-z_]|[a-z_.])*Z",
    "(" * 1000 + "a" + ")" * 1000,
    "(?:" * 300 + "." + ")*" * 300,
    "a{4294967296}",
    "a{1000}{1000}{1000}",
)
REGEXES_INVALID = (
    "(",
    "[",
    "*a",
    "a{2,1}",
    "(?P<x",
    "\\",
    r"(?<=a+)b",
    r"(a)\2",
    "[z-a]",
    "(?",
    "a**",
    "(?P<a>x)(?P<a>y)",
    r"\p{Foo}",
)
REGEX_ATOMS = ("conv_in", "up_blocks", r"\.", ".", ".*", r"\d+", "[0-9]", r"\w+", "_", "to_", "(a|b)", "$", "^")

BRACKETS = 1000  # nesting depth of the deepest generated structures

TAGS = (
    "!!python/object/apply:os.system ['true']",
    f"!!python/object/apply:{PAYLOAD}.X []",
    f"!!python/name:{PAYLOAD}.X",
    f"!!python/module:{PAYLOAD}",
    f"!!python/object/new:{PAYLOAD}.X []",
    f"!!python/object:{PAYLOAD}.X {{}}",
    f"!<tag:yaml.org,2002:python/object/apply:{PAYLOAD}.X> []",
    "!!binary aGVsbG8=",
    "!!timestamp 2001-12-14",
    "!!set {a, b}",
    "!!omap [a: 1]",
    "!!pairs [a: 1]",
    "!!seq {a: 1}",
    "!!map [1]",
    "!!str 4",
    "!!int x",
    "!!float x",
    "!!bool maybe",
    "!!null x",
    "!custom 4",
    "!!merge x",
    "!!value x",
)
PLAIN_SCALARS = (
    "yes",
    "on",
    "~",
    "1:30",
    "190:20:30",
    "0x1F",
    "0o17",
    "017",
    "1_000",
    ".NaN",
    "-.inf",
    "2001-12-14",
    "=",
    "<<",
    "1.0e400",
    "0b101",
)


def _alias_bomb(levels: int, fan: int, tag: int) -> Raw:
    """Anchors of anchors: `levels` lines of `fan` aliases expand to fan**levels leaves."""
    parts = [f"&b{tag}x0 [" + ", ".join(["1"] * fan) + "]"]
    parts += [f"&b{tag}x{i} [" + ", ".join([f"*b{tag}x{i - 1}"] * fan) + "]" for i in range(1, levels)]
    return Raw("[" + ", ".join(parts) + "]")


def _yaml_specials() -> st.SearchStrategy[Raw]:
    bombs = (
        st.tuples(st.integers(2, 9), st.integers(2, 9), st.integers(0, 9))
        .filter(lambda p: p[1] ** p[0] <= 10**6)
        .map(lambda p: _alias_bomb(*p))
    )
    huge_ints = st.tuples(
        st.sampled_from(["", "-", "0x", "+"]), st.sampled_from([20, 400, 4300, 4301, 5000, 20_000])
    ).map(lambda p: Raw(p[0] + ("f" if p[0] == "0x" else "9") * p[1]))
    deep = st.tuples(st.sampled_from(["[", "{a: "]), st.sampled_from([50, 300, BRACKETS, 5 * BRACKETS])).map(
        lambda p: Raw(p[0] * p[1] + "1" + ("]" if p[0] == "[" else "}") * p[1])
    )
    return st.one_of(st.sampled_from(TAGS).map(Raw), st.sampled_from(PLAIN_SCALARS).map(Raw), bombs, huge_ints, deep)


_PRINTABLE = st.text(st.characters(codec="ascii", categories=("L", "N", "P", "Zs")), max_size=12)
TEXT = st.one_of(
    _PRINTABLE, _PRINTABLE, _PRINTABLE, st.text(max_size=12)
)  # printable, or anything (control characters, NEL, ...)
_SCALAR = st.one_of(st.none(), st.booleans(), st.integers(-3, 40), st.floats(), TEXT)
JUNK: st.SearchStrategy[Any] = st.one_of(
    _SCALAR,
    st.sampled_from([-1, 0, 1, 2**31, 2**63, 2**64, 10**30, 1e308, float("inf"), float("nan"), -0.0]),
    st.sampled_from(
        [
            "",
            " ",
            "float",
            "none",
            "8",
            "4.0",
            "group:",
            "group:0",
            "group:-4",
            "group:x",
            "warmup:",
            "warmup:0",
            "warmup:-1",
            "all",
            PAYLOAD,
            f"{PAYLOAD}:X",
        ]
    ),
    st.sampled_from([300, 5000, 100_000]).map(lambda n: "x" * n),
    st.lists(_SCALAR, max_size=3),
    st.dictionaries(TEXT, _SCALAR, max_size=3),
    _yaml_specials(),
)


def chance(draw: st.DrawFn, percent: int) -> bool:
    """True about `percent` times in 100 (hypothesis favours the ends of a range, so a little
    less); shrinks towards True."""
    return draw(st.integers(1, 100)) <= percent


@st.composite
def mostly(draw: st.DrawFn, valid: st.SearchStrategy[Any]) -> Any:
    """A valid value nine times in ten (shrinking towards one), so that cases reach resolve and prepare."""
    return draw(valid) if chance(draw, 90) else draw(JUNK)


def _regexes() -> st.SearchStrategy[str]:
    composed = st.recursive(
        st.sampled_from(REGEX_ATOMS),
        lambda inner: st.one_of(
            st.tuples(inner, inner).map("".join),
            st.tuples(inner, inner).map(lambda p: f"({p[0]}|{p[1]})"),
            st.tuples(inner, st.sampled_from(["*", "+", "?", "{2}", "{0,3}", "*?"])).map(lambda p: f"({p[0]}){p[1]}"),
        ),
        max_leaves=8,
    )
    return st.one_of(
        st.sampled_from(REGEXES_VALID),
        st.sampled_from(REGEXES_PATHOLOGICAL),
        st.sampled_from(REGEXES_INVALID),
        composed,
    )


PATTERN = st.one_of(
    st.sampled_from(LAYERS + BLOCKS + CLASSES),
    _regexes().map(lambda r: f"re:{r}"),
    st.sampled_from(["re:", "", PAYLOAD]),
)
MATCH = mostly(st.one_of(PATTERN, PATTERN, st.lists(PATTERN, min_size=1, max_size=3)))

GROUP = st.one_of(st.sampled_from([1, 2, 3, 4, 8, 16]), st.sampled_from([10**6, 2**31, 2**63, 10**40, 10**400])).map(
    lambda n: f"group:{n}"
)
INJECTORS = (
    "Int8WeightPerChannelFloat",
    "Int8WeightPerTensorFloat",
    "Int8ActPerTensorFloat",
    "ShiftedUint8ActPerTensorFloat",
    "Int8WeightPerChannelFloatMSE",
    "brevitas.quant:Int8ActPerTensorFloat",
    "brevitas.quant.scaled_int:Int8WeightPerTensorFloat",
    f"{PAYLOAD}:X",
    f"{PAYLOAD}.sub:X",
    f"brevitas.{PAYLOAD}:X",
    "os:system",
    "subprocess:Popen",
    "torch.nn:Module",
    "builtins:object",
    ":X",
    "a:b:c",
    "Int8Nonexistent",
)
OBSERVERS = st.sampled_from(["minmax", "ema_minmax", "mse", "msee", PAYLOAD, f"{PAYLOAD}:X"])
OBSERVER_OPTIONS = st.one_of(
    st.just({}),
    st.sampled_from(
        [{"p": 2.4}, {"momentum": 0.95}, {"momentum": 2}, {"grid": 10**9}, {"max_values": 0}, {"p": -1}, {"bogus": 1}]
    ),
    JUNK,
)
SMALL_INT = st.one_of(st.integers(-2, 40), st.sampled_from([10**12, 2**63]))


def _base(name: str, **options: st.SearchStrategy[Any]) -> st.SearchStrategy[dict[str, Any]]:
    return st.fixed_dictionaries(
        {"name": st.just(name)}, optional={key: mostly(value) for key, value in options.items()}
    )


BASE_QUANTIZER = st.one_of(
    st.sampled_from(
        [
            "dynamic",
            "static",
            "ptq4dm",
            "qdiffusion",
            "torchao_int4",
            "brevitas",
            "dynamc",
            PAYLOAD,
            f"{PAYLOAD}:X",
            "",
        ]
    ),
    _base("static", observer=OBSERVERS, observer_options=OBSERVER_OPTIONS),
    _base(
        "ptq4dm",
        observer=OBSERVERS,
        samples=SMALL_INT,
        mean=st.floats(),
        std=st.floats(),
        seed=SMALL_INT,
        num_train_timesteps=SMALL_INT,
    ),
    _base(
        "qdiffusion",
        beta=st.sampled_from([[20, 2], [1], [], "x"]),
        weight_iters=SMALL_INT,
        calibration_steps=SMALL_INT,
        warmup=st.floats(),
        p=st.floats(),
        blocks=st.lists(st.sampled_from(CLASSES), max_size=2),
        observer=OBSERVERS,
    ),
    _base(
        "adaround",
        beta=st.sampled_from([[20, 2], [1], [], "x"]),
        iters=SMALL_INT,
        samples_per_step=SMALL_INT,
        lr=st.floats(),
        warmup=st.floats(),
        weight_observer=OBSERVERS,
    ),
    _base("gptq", damp=st.floats(), act_order=st.booleans(), samples_per_step=SMALL_INT, weight_observer=OBSERVERS),
    _base("torchao_int4", fallback=st.sampled_from(["channel", "float", "int8"])),
    _base(
        "brevitas",
        weight_quant=st.sampled_from(INJECTORS),
        act_quant=st.sampled_from(INJECTORS),
        calibration=st.sampled_from(["range", "per_call", "sometimes"]),
    ),
    st.fixed_dictionaries({"name": JUNK}),
    st.fixed_dictionaries({"name": st.just("dynamic"), "bogus": _SCALAR}),
)

STEP_INT = st.one_of(st.integers(-1, 12), st.sampled_from([10**9, 10**30]))
STEPS = st.one_of(
    st.just("all"),
    st.lists(STEP_INT, max_size=4),
    st.fixed_dictionaries(
        {}, optional={"start": STEP_INT, "stop": STEP_INT, "every": STEP_INT, "refresh_every": STEP_INT}
    ),
)
TIMESTEP_GROUPS = st.one_of(
    st.integers(1, 4),
    st.sampled_from([1000, 100_000, 10**9, 10**30]),
    st.fixed_dictionaries(
        {
            "count": st.one_of(st.integers(1, 4), st.just(10**6)),
            "range": st.lists(st.one_of(st.floats(), st.integers(-10, 2000)), max_size=3),
        }
    ),
)

SETTINGS: dict[str, st.SearchStrategy[Any]] = {
    "w_bits": st.sampled_from([2, 3, 4, 6, 8, 16, 32, "float"]),
    "a_bits": st.sampled_from([0, 2, 4, 8, 16, 32, "float"]),
    "scheme": st.sampled_from(["modiff", "plain", "modif", PAYLOAD]),
    "base_quantizer": BASE_QUANTIZER,
    "w_granularity": st.one_of(st.sampled_from(["tensor", "channel"]), GROUP),
    "a_granularity": st.one_of(st.sampled_from(["tensor", "sample", "channel"]), GROUP),
    "w_symmetric": st.booleans(),
    "w_bias_correction": st.booleans(),
    "a_symmetric": st.booleans(),
    "first_step": st.one_of(
        st.sampled_from(["fp", "quantized"]),
        st.sampled_from([1, 2, 3, 99_999_999, 10**12, 10**100]).map(lambda n: f"warmup:{n}"),
    ),
    "error_compensation": st.booleans(),
    "timestep_groups": TIMESTEP_GROUPS,
    "split": st.booleans(),
    "input_cache": st.sampled_from(["full", "float16", "bfloat16", "int8", "int16"]),
    "output_cache": st.sampled_from(["full", "float16", "bfloat16", "int8", "int16"]),
}
MISSPELLED = st.sampled_from(["a_bit", "w_bitz", "bits", "Match", PAYLOAD, "", "version"])


@st.composite
def settings_maps(draw: st.DrawFn, keys: tuple[str, ...] = tuple(SETTING_PARSERS)) -> dict[Any, Any]:
    chosen = draw(st.lists(st.sampled_from(keys), unique=True, max_size=4))
    values = {key: draw(mostly(SETTINGS.get(key, JUNK))) for key in chosen}
    if not chance(draw, 95):
        values[draw(MISSPELLED)] = draw(_SCALAR)
    return values


@st.composite
def rules(draw: st.DrawFn) -> Any:
    if not chance(draw, 75):  # a block rule: 0-bit skipping on a schedule
        rule: dict[Any, Any] = {
            "match": draw(st.one_of(st.sampled_from(BLOCKS), MATCH)),
            "a_bits": draw(mostly(st.just(0))),
        }
        if draw(st.booleans()):
            rule["steps"] = draw(mostly(STEPS))
        if draw(st.booleans()):
            rule["skip_threshold"] = draw(mostly(st.floats(0.001, 1.0)))
        return rule
    if not chance(draw, 97):
        return draw(JUNK)
    rule = {"match": draw(MATCH)} if chance(draw, 97) else {}
    rule.update(
        draw(settings_maps(tuple(key for key in RULE_KEYS if key not in ("match", "steps", "skip_threshold"))))
    )
    return rule


BASE_FILES = (
    "base.yaml",
    "sub/base2.yaml",
    "with space.yaml",
    "ünï/cödé.yaml",
    "#hash%.yaml",
    "q'uo\"te.yaml",
    "a" * 250 + ".yaml",
)


@st.composite
def recipe_documents(draw: st.DrawFn, extends: st.SearchStrategy[Any]) -> Any:
    """A recipe as Python data (with `Raw` YAML where wanted), mostly well-formed."""
    if not chance(draw, 97):
        return draw(JUNK)
    document: dict[Any, Any] = {}
    if chance(draw, 97):
        document["version"] = draw(mostly(st.just(1)))
    for key, value in (("name", TEXT), ("description", TEXT), ("strict", st.booleans())):
        if not chance(draw, 80):
            document[key] = draw(mostly(value))
    if not chance(draw, 60):
        document["extends"] = draw(extends)
    if not chance(draw, 25):
        document["defaults"] = draw(mostly(settings_maps()))
    if not chance(draw, 50):
        document["rules"] = draw(mostly(st.lists(rules(), max_size=4)))
    if not chance(draw, 97):
        document[draw(st.sampled_from([*TOP_KEYS, "strcit", PAYLOAD, 1]))] = draw(_SCALAR)
    if not chance(draw, 80):
        document = dict(draw(st.permutations(list(document.items()))))
    return document


BYTES = (
    b"\x00",
    b"\x07",
    b"\x1b[31m",
    b"\xff",
    b"\xc3\x28",
    b"\xed\xa0\x80",
    b"\xef\xbb\xbf",
    b"\r",
    "\x85".encode(),
    "\u2028".encode(),
    b"\t",
    b"\x7f",
    b"\xf4\x90\x80\x80",
    b"\xfe\xff",
)
PREFIXES = (
    b"%YAML 1.1\n---\n",
    b"--- !!map\n",
    b"%TAG ! tag:yaml.org,2002:python/\n--- !object/apply:os.system ['true']\n",
    b"\xef\xbb\xbf",
    b"---\n...\n",
    b"%YAML 2.0\n---\n",
    b"--- !!seq\n",
)
SUFFIXES = (
    b"\n---\nversion: 1\n",
    b"\n...\n",
    b"\n# comment",
    b"\nversion: 1\n",
    b"\n? [a, b]\n: 1\n",
    b"\n<<: {a_bits: 4}\n",
    b"\ndefaults: &d {a_bits: 4}\nrules:\n  - {match: conv_in, <<: *d}\n",
    b"\nrules: [*undefined]\n",
)
WHOLE = (
    b"",
    b"~",
    b"[]",
    b"!!python/object/apply:os.system ['true']\n",
    b"--- !!seq {a: 1}\n",
    b"!!map [1]\n",
    b"*a\n",
    b"&a [*a]\n",
    b"version: 1\nversion: 1\n",
    b"\t\tversion: 1\n",
)


@st.composite
def text_mutations(draw: st.DrawFn) -> tuple[Any, ...] | None:
    """One byte-level change to a recipe file, or None."""
    if chance(draw, 80):
        return None
    kind = draw(st.sampled_from(["insert", "truncate", "prefix", "suffix", "utf16", "whole"]))
    position = draw(st.integers(0, 10**6))
    if kind == "insert":
        return ("insert", position, draw(st.sampled_from(BYTES)))
    if kind == "truncate":
        return ("truncate", position)
    if kind in ("prefix", "suffix", "whole"):
        return (kind, draw(st.sampled_from({"prefix": PREFIXES, "suffix": SUFFIXES, "whole": WHOLE}[kind])))
    return ("utf16",)


def mutate(content: bytes, mutation: tuple[Any, ...] | None) -> bytes:
    if mutation is None:
        return content
    kind = mutation[0]
    if kind == "insert":
        at = mutation[1] % (len(content) + 1)
        return content[:at] + mutation[2] + content[at:]
    if kind == "truncate":
        return content[: mutation[1] % (len(content) + 1)]
    if kind == "prefix":
        return mutation[1] + content
    if kind == "suffix":
        return content + mutation[1]
    if kind == "whole":
        return mutation[1]
    return content.decode("utf-8", errors="replace").encode("utf-16")


@dataclass(frozen=True, repr=False)
class RecipeCase(Terse):
    """Recipe files to write: `recipe.yaml` (loaded), optional bases it may extend, and the length
    of the `extends` chain that `chain0.yaml` in them stands for."""

    entry: bytes
    bases: tuple[tuple[str, bytes], ...] = ()
    chain: int = 0

    def write(self, folder: Path, env: FuzzEnv) -> list[Path]:
        """The files, recipe.yaml first, with the payload's name and the chain's path filled in."""
        chain = env.chain(self.chain) if self.chain and b"chain0.yaml" in self.entry else []
        names = {
            PAYLOAD.encode(): env.payload.name.encode(),
            b"chain0.yaml": str(chain[0]).encode() if chain else b"chain0.yaml",
        }
        written = [_write(folder / "recipe.yaml", self.entry, names)]
        written += [_write(folder / name, content, names) for name, content in self.bases]
        return written + chain

    def __repr__(self) -> str:
        bases = ", ".join(f"{name[:40]}: {_short(content)}" for name, content in self.bases)
        return f"RecipeCase(entry={_short(self.entry)}, bases=[{bases}], chain={self.chain})"


def _short(content: bytes, limit: int = 1500) -> str:
    return (
        repr(content)
        if len(content) <= limit
        else f"{content[: limit // 2]!r} ... {content[-200:]!r} ({len(content)} bytes)"
    )


def _write(path: Path, content: bytes, names: dict[bytes, bytes]) -> Path:
    for placeholder, name in names.items():
        content = content.replace(placeholder, name)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    return path


def _recipe_bytes(draw: st.DrawFn, extends: st.SearchStrategy[Any]) -> bytes:
    return mutate(
        recipe_yaml(draw(recipe_documents(extends))).encode("utf-8", errors="surrogatepass"), draw(text_mutations())
    )


ODD_EXTENDS = (
    "base",
    "./base.yaml",
    "sub/../base.yaml",
    "recipe.yaml",
    "recipe",
    "missing.yaml",
    "sub",
    ".",
    "/",
    "~",
    "/etc/hostname",
    "recipe.yaml/x",
    f"{PAYLOAD}.py",
    PAYLOAD,
    "a" * 300,
    "a/" * 200 + "x",
    "\x00",
    "*",
    "w8a4-modif",
)


@st.composite
def recipe_cases(draw: st.DrawFn) -> RecipeCase:
    """recipe.yaml, which may extend bases (generated files with odd names, which may extend
    each other, recipe.yaml or shipped recipes), shipped recipes, a chain of files, or odd paths."""
    names = draw(st.lists(st.sampled_from(BASE_FILES), unique=True, max_size=2))
    chain = draw(st.sampled_from([3, 40, 1200])) if not chance(draw, 90) else 0
    targets = st.sampled_from([*names, *SHIPPED, *(["chain0.yaml"] if chain else [])])
    entry = _recipe_bytes(draw, mostly(st.one_of(targets, targets, targets, st.sampled_from(ODD_EXTENDS))))
    base_targets = st.sampled_from([*names, "recipe.yaml", "../recipe.yaml", *SHIPPED])
    bases = tuple((name, _recipe_bytes(draw, base_targets)) for name in names)
    return RecipeCase(entry, bases, chain)


def check_recipe_error(report: Report, outcome: Outcome, size: int) -> None:
    """A failed recipe call: a RecipeError starting with file:line of a recipe file, of bounded size."""
    if not isinstance(outcome.error, mq.RecipeError):
        report.unexpected(outcome, "RecipeError")
        return
    located = location_problem(str(outcome.error))
    if located:
        report.add(
            f"{outcome.what}: RecipeError without file:line at {outcome.where}",
            f"{outcome.what}: {located} (raised at {outcome.where})",
        )
    too_long = message_problem(outcome.error, size)
    if too_long:
        report.add(f"{outcome.what}: message size", f"{outcome.what}: {too_long} (raised at {outcome.where})")


def check_recipe(env: FuzzEnv, float_unet: FloatModel, recipe_files: list[Path]) -> None:
    """load_recipe; when it loads, resolve and explain (which never change the model) and prepare
    on a fresh copy (which changes nothing when it fails)."""
    size = sum(path.stat().st_size for path in recipe_files)
    report = Report()
    loaded = env.guard("load_recipe", lambda: mq.load_recipe(recipe_files[0]), LOAD_LIMIT)
    event(f"load_recipe: {_ending(loaded)}")
    report.bounds(loaded)
    if loaded.error is not None:
        check_recipe_error(report, loaded, size)
    elif not isinstance(loaded.value, mq.Recipe):
        report.add("load_recipe: result", f"load_recipe returned {type(loaded.value).__name__}, not a Recipe")
    else:
        recipe = loaded.value
        model = float_unet.fresh()
        calls: tuple[tuple[str, Callable[[], Any]], ...] = (
            ("resolve", lambda: recipe.resolve(model)),
            ("explain", lambda: recipe.explain(model)),
            ("prepare", lambda: mq.prepare(model, recipe)),
        )
        for what, call in calls:
            outcome = env.guard(what, call, MODEL_LIMIT)
            event(f"{what}: {_ending(outcome)}")
            report.bounds(outcome)
            if outcome.error is not None:
                check_recipe_error(report, outcome, size)
            if outcome.error is not None or what != "prepare":
                report.changed(what, model, float_unet.snapshot)
            if outcome.error is not None:
                break
    report.check()


@settings(fuzz_settings(1.5))
@given(case=recipe_cases())
def test_recipes_from_strangers(env, float_unet, case):
    with clean_folder(env.folder()) as folder:
        check_recipe(env, float_unet, case.write(folder, env))


def test_recipe_grammar_covers_every_key():
    """The generator knows every setting the schema accepts (a new key needs a strategy here)."""
    assert set(SETTINGS) == set(SETTING_PARSERS)
    assert set(RULE_KEYS) - set(SETTING_PARSERS) == {"match", "steps", "skip_threshold"}
    assert set(TOP_KEYS) == {"version", "name", "description", "extends", "strict", "defaults", "rules"}


# =============================================================================================
# 2. saved checkpoints

CALIBRATED = (
    "version: 1\nextends: w8a4-modiff-ptq4dm\ndefaults:\n"
    "  base_quantizer: {name: ptq4dm, samples: 32, observer: minmax}\n"
)
"""PTQ4DM's NDTC calibration with min-max scales: the same saved tensors as the shipped recipe,
calibrated in a second instead of ten."""
CHECKPOINT_RECIPES = {"w8a4-modiff": 2, "ptq4dm-minmax": 4}  # recipe -> DDIM calibration steps


class Saved(Terse, dict):
    """recipe -> the files save_quantized wrote for it (name -> bytes)."""

    def __repr__(self) -> str:
        return f"Saved({', '.join(self)})"


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> Saved:
    """The files save_quantized writes for a dynamic and a calibrated recipe."""
    saved = Saved()
    calibrated = tmp_path_factory.mktemp("recipes") / "ptq4dm-minmax.yaml"
    calibrated.write_text(CALIBRATED, encoding="utf-8")
    for recipe, steps in CHECKPOINT_RECIPES.items():
        model = tiny_unet(seed=0)
        inputs = ddim_inputs(model, steps)
        mq.prepare(model, calibrated if recipe == calibrated.stem else recipe)
        with torch.no_grad(), mq.calibrate(model):
            for x, t in inputs:
                model(x, t)
        mq.convert(model)
        folder = mq.save_quantized(model, tmp_path_factory.mktemp(recipe))
        saved[recipe] = {name: (folder / name).read_bytes() for name in (TENSORS, RECIPE, PLAN)}
    return saved


@dataclass(frozen=True)
class FileEdit:
    """Byte flips, truncation, deletion, or a directory in place of one file."""

    file: str
    kind: str
    positions: tuple[int, ...] = ()
    masks: tuple[int, ...] = ()

    def apply(self, files: dict[str, Any]) -> None:
        content = files.get(self.file)
        if self.kind == "delete":
            files[self.file] = None
        elif self.kind == "directory":
            files[self.file] = "directory"
        elif isinstance(content, bytes) and content:
            if self.kind == "truncate":
                files[self.file] = content[: self.positions[0] % len(content)]
            else:
                data = bytearray(content)
                for position, mask in zip(self.positions, self.masks):
                    data[position % len(data)] ^= mask
                files[self.file] = bytes(data)


DTYPES = (torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32, torch.uint8, torch.bool, torch.int8)
POISON = (float("nan"), float("inf"), float("-inf"), 0.0, -1.0)
"""Values any tensor may be set to: non-finite ones are corrupt, zeros and -1 are not."""
POISON_QUANTIZER = (*POISON, 1e38, -1e38, 1e-45, 255.0, 2.0**31)
"""Also extreme finite values, for quantizer parameters (scales, zero points): weights of 1e38
may legitimately overflow the model, a saved quantizer parameter must not."""


@dataclass(frozen=True)
class TensorEdit:
    """A change inside model.safetensors: a tensor renamed, dropped, added, reshaped, retyped or
    poisoned (NaN/inf/0/huge scales, codes past their table); or other metadata."""

    scope: str  # prefix of the keys to choose from: "modiff/", "codes/" or "" (any)
    index: int
    kind: str
    arg: Any = None

    def apply(self, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
        keys = sorted(k for k in tensors if k.startswith(self.scope))
        if not keys:  # e.g. no quantizer parameters in a dynamic model's checkpoint
            return
        key = keys[self.index % len(keys)]
        value = tensors[key]
        if self.kind == "rename":
            tensors[RENAMES[self.arg](key)] = tensors.pop(key)
        elif self.kind == "drop":
            del tensors[key]
        elif self.kind == "add":
            tensors[f"{key.rsplit('/', 1)[0]}/{self.arg}" if "/" in key else f"{key}.{self.arg}"] = torch.zeros(3)
        elif self.kind == "reshape":
            tensors[key] = _reshaped(value, self.arg)
        elif self.kind == "dtype":
            tensors[key] = value.to(self.arg)
        elif self.kind == "poison":
            poisoned = value.clone()
            flat = poisoned.view(-1) if poisoned.numel() else poisoned
            if poisoned.numel():
                target = flat if self.arg[1] else flat[self.index % flat.numel()]
                target.fill_(self.arg[0] if poisoned.is_floating_point() else 255)
            tensors[key] = poisoned
        elif self.kind == "metadata":
            metadata.clear()
            metadata.update(self.arg)


def _reshaped(value: torch.Tensor, how: str) -> torch.Tensor:
    flat = value.flatten()
    if how == "scalar":
        return flat[:1].sum().to(value.dtype)  # a 0-d tensor, also from an empty one
    return {"flatten": flat, "unsqueeze": value.unsqueeze(0), "slice": flat[:-1], "empty": flat[:0]}[how].clone()


RENAMES: dict[str, Callable[[str], str]] = {
    "suffix": lambda k: k + "x",
    "double slash": lambda k: k.replace("/", "//"),
    "upper": str.upper,
    "empty": lambda k: "",
    "other prefix": lambda k: k.replace("modiff/", "codes/"),
    "parent": lambda k: "../" + k,
}
TENSOR_EDITS = st.one_of(
    st.builds(
        TensorEdit,
        st.sampled_from(["modiff/", "codes/", ""]),
        st.integers(0, 10**6),
        st.just("rename"),
        st.sampled_from(sorted(RENAMES)),
    ),
    st.builds(TensorEdit, st.sampled_from(["modiff/", "codes/", ""]), st.integers(0, 10**6), st.just("drop")),
    st.builds(
        TensorEdit,
        st.sampled_from(["modiff/", "codes/", ""]),
        st.integers(0, 10**6),
        st.just("add"),
        st.sampled_from(["scale", "codes", "bogus", "weight"]),
    ),
    st.builds(
        TensorEdit,
        st.sampled_from(["modiff/", "codes/", ""]),
        st.integers(0, 10**6),
        st.just("reshape"),
        st.sampled_from(["flatten", "unsqueeze", "slice", "empty", "scalar"]),
    ),
    st.builds(
        TensorEdit,
        st.sampled_from(["modiff/", "codes/", ""]),
        st.integers(0, 10**6),
        st.just("dtype"),
        st.sampled_from(DTYPES),
    ),
    st.builds(
        TensorEdit,
        st.just("modiff/"),
        st.integers(0, 10**6),
        st.just("poison"),
        st.tuples(st.sampled_from(POISON_QUANTIZER), st.booleans()),
    ),
    st.builds(
        TensorEdit,
        st.just("modiff/"),
        st.integers(0, 10**6),
        st.just("poison"),
        st.tuples(st.sampled_from(POISON_QUANTIZER[3:]), st.booleans()),
    ),  # finite: may load
    st.builds(
        TensorEdit,
        st.sampled_from(["codes/", ""]),
        st.integers(0, 10**6),
        st.just("poison"),
        st.tuples(st.sampled_from(POISON), st.booleans()),
    ),
    st.builds(
        TensorEdit,
        st.just(""),
        st.just(0),
        st.just("metadata"),
        st.sampled_from([{}, {"format": "modiff-quant/2"}, {"format": "x" * 10_000}, {"other": "1"}]),
    ),
)

DEEP_JSON = "__DEEP_JSON__"
JSON_JUNK = st.one_of(
    st.none(),
    st.booleans(),
    st.sampled_from(
        [
            0,
            -1,
            1,
            2,
            2**70,
            1.5,
            float("nan"),
            float("inf"),
            "",
            "x",
            "1",
            "conv_in",
            "../../etc/passwd",
            [],
            {},
            [1],
            {"a": 1},
            {"bytes": 0, "sha256": ""},
            ["conv_in"],
            DEEP_JSON,
        ]
    ),
    st.text(max_size=8),
)


@dataclass(frozen=True)
class PlanEdit:
    """A change in plan.json: a value replaced (types changed, deep nesting), a key dropped or
    renamed, anywhere in the tree or in its top-level fields."""

    top_level: bool
    index: int
    kind: str
    value: Any = None

    def apply(self, manifest: Any) -> Any:
        paths = [()] + [p for p in _json_paths(manifest) if len(p) == 1 or not self.top_level]
        path = paths[self.index % len(paths)]
        if not path:
            return self.value if self.kind == "set" else manifest
        parent = manifest
        for key in path[:-1]:
            parent = parent[key]
        last = path[-1]
        if self.kind == "set":
            parent[last] = self.value
        elif self.kind == "delete":
            del parent[last]
        elif self.kind == "rename" and isinstance(parent, dict):
            parent[f"{last}x"] = parent.pop(last)
        elif self.kind == "wrap":
            parent[last] = [parent[last]]
        return manifest


def _json_paths(value: Any, prefix: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    children = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, child in children:
        yield (*prefix, key)
        yield from _json_paths(child, (*prefix, key))


PLAN_EDITS = st.builds(
    PlanEdit,
    st.booleans(),
    st.integers(0, 10**6),
    st.sampled_from(["set", "set", "delete", "rename", "wrap"]),
    JSON_JUNK,
)

RECIPE_APPENDS = (
    b"extends: w8a8-modiff\n",
    f"extends: {PAYLOAD}.py\n".encode(),
    f"extends: {PAYLOAD}\n".encode(),
    b"defaults: {a_bits: 8}\n",
    b"- {match: 're:(.|.)*Z', a_bits: 8}\n",
    f"- {{match: conv_in, base_quantizer: {{name: brevitas, weight_quant: '{PAYLOAD}:X'}}}}\n".encode(),
    b"strict: maybe\n",
)


@dataclass(frozen=True)
class RecipeEdit:
    """recipe.yaml appended to, replaced by a generated recipe, or mutated byte-wise."""

    kind: str
    content: bytes

    def apply(self, files: dict[str, Any]) -> None:
        original = files.get(RECIPE)
        if self.kind == "replace" or not isinstance(original, bytes):
            files[RECIPE] = self.content
        else:
            files[RECIPE] = original + self.content


@st.composite
def recipe_edits(draw: st.DrawFn) -> RecipeEdit:
    if draw(st.booleans()):
        return RecipeEdit("append", draw(st.sampled_from(RECIPE_APPENDS)))
    return RecipeEdit("replace", _recipe_bytes(draw, st.sampled_from(SHIPPED + (f"{PAYLOAD}.py", "missing.yaml"))))


FILE_EDITS = st.one_of(
    st.builds(
        FileEdit,
        st.sampled_from([TENSORS, RECIPE, PLAN]),
        st.sampled_from(["flip", "flip", "truncate"]),
        st.lists(st.integers(0, 10**7), min_size=1, max_size=4).map(tuple),
        st.lists(st.integers(1, 255), min_size=4, max_size=4).map(tuple),
    ),
    st.builds(FileEdit, st.sampled_from([TENSORS, RECIPE, PLAN]), st.sampled_from(["delete", "directory"])),
)


@dataclass(frozen=True)
class CheckpointCase:
    """A saved checkpoint of `recipe` with `edits` applied; with `rehash`, plan.json's sizes and
    SHA-256 are recomputed after the file edits (before plan edits), so the damage gets past the checksums."""

    recipe: str
    edits: tuple[Any, ...]
    rehash: bool

    def write(self, folder: Path, saved: dict[str, bytes], payload: Payload) -> None:
        files: dict[str, Any] = dict(saved)
        tensor_edits = [e for e in self.edits if isinstance(e, TensorEdit)]
        if tensor_edits:
            files[TENSORS] = _edit_tensors(files[TENSORS], tensor_edits)
        for edit in self.edits:
            if isinstance(edit, (FileEdit, RecipeEdit)):
                edit.apply(files)
        if isinstance(files[RECIPE], bytes):
            files[RECIPE] = files[RECIPE].replace(PAYLOAD.encode(), payload.name.encode())
        plan_edits = [e for e in self.edits if isinstance(e, PlanEdit)]
        if (self.rehash or plan_edits) and isinstance(files[PLAN], bytes):
            files[PLAN] = _edit_plan(files, plan_edits, self.rehash)
        for name, content in files.items():
            if content == "directory":
                (folder / name).mkdir()
            elif content is not None:
                (folder / name).write_bytes(content)


def _edit_tensors(content: bytes, edits: list[TensorEdit]) -> bytes:
    from safetensors.torch import load, save

    tensors = load(content)
    header = json.loads(content[8 : 8 + int.from_bytes(content[:8], "little")])
    metadata = dict(header.get("__metadata__", {}))
    for edit in edits:
        edit.apply(tensors, metadata)
    return save({key: value.contiguous() for key, value in tensors.items()}, metadata=metadata or None)


def _edit_plan(files: dict[str, Any], edits: list[PlanEdit], rehash: bool) -> bytes:
    try:
        manifest = json.loads(files[PLAN])
    except ValueError:
        return files[PLAN]
    if rehash and isinstance(manifest, dict) and isinstance(manifest.get("files"), dict):
        for name in (TENSORS, RECIPE):
            if isinstance(files.get(name), bytes):
                manifest["files"][name] = {
                    "bytes": len(files[name]),
                    "sha256": hashlib.sha256(files[name]).hexdigest(),
                }
    for edit in edits:
        manifest = edit.apply(manifest)
    text = json.dumps(manifest, indent=1)
    return text.replace(json.dumps(DEEP_JSON), "[" * 100_000 + "]" * 100_000).encode()


@st.composite
def checkpoint_cases(draw: st.DrawFn) -> CheckpointCase:
    edit = st.one_of(TENSOR_EDITS, TENSOR_EDITS, PLAN_EDITS, PLAN_EDITS, FILE_EDITS, recipe_edits())
    return CheckpointCase(
        draw(st.sampled_from(sorted(CHECKPOINT_RECIPES))),
        tuple(draw(st.lists(edit, min_size=1, max_size=3))),
        draw(st.sampled_from([True, True, False])),
    )


def sampling_step(model: torch.nn.Module) -> torch.Tensor:
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), mq.sampling(model):
        return model(x, torch.tensor(500)).sample


@settings(fuzz_settings(0.5))
@given(case=checkpoint_cases())
def test_checkpoints_from_strangers(env, float_unet, checkpoints, case):
    with clean_folder(env.folder()) as folder:
        case.write(folder, checkpoints[case.recipe], env.payload)
        size = sum(p.stat().st_size for p in folder.iterdir() if p.is_file())
        model = float_unet.fresh()
        report = Report()
        loaded = env.guard("load_quantized", lambda: mq.load_quantized(model, folder), MODEL_LIMIT)
        event(f"load_quantized: {_ending(loaded)}")
        report.bounds(loaded)
        if loaded.error is not None:
            if not isinstance(loaded.error, mq.LoadError):
                report.unexpected(loaded, "LoadError")
            too_long = message_problem(loaded.error, size)
            if too_long:
                report.add("load_quantized: message size", too_long)
            report.changed("failed load_quantized", model, float_unet.snapshot)
        else:
            step = env.guard("sampling step after load_quantized", lambda: sampling_step(model), MODEL_LIMIT)
            report.bounds(step)
            if step.error is not None:
                report.unexpected(step, "a finite output: the checkpoint loaded")
            elif not torch.isfinite(step.value).all():
                report.add(
                    "non-finite output after load_quantized",
                    "load_quantized accepted the checkpoint, then one sampling step gave "
                    f"{int((~torch.isfinite(step.value)).sum())} non-finite values",
                )
        report.check()


# =============================================================================================
# 3. command lines

VALID, EITHER, INVALID = 0, 1, 2
"""Verdicts on a piece of a command line by the documented rules: VALID must get past every
check (to the expensive work or exit 0), INVALID must exit 2 before the expensive work, EITHER
may do either (huge counts, values the documents leave open)."""

SMALL_CIFAR = {
    "sample_size": 8,
    "in_channels": 3,
    "out_channels": 3,
    "block_out_channels": (16, 32),
    "layers_per_block": 1,
    "down_block_types": ("DownBlock2D", "AttnDownBlock2D"),
    "up_block_types": ("AttnUpBlock2D", "UpBlock2D"),
    "norm_num_groups": 8,
    "attention_head_dim": 8,
}
"""`cifar10-ddpm` shrunk (its weights files too), so that a case costs milliseconds."""

NOISE_LIMIT = 10**6  # floats of sampling noise a case may allocate before it counts as expensive work


class ExpensiveWork(Exception):
    """Raised by the patched sampling loop, a big noise allocation or a long bops count: the
    command got past its checks."""


@dataclass(frozen=True)
class Arg:
    """Command-line words and what the documented rules say about them."""

    words: tuple[str, ...]
    verdict: int
    what: str = ""


def _count(flag: str, valid: range, either: Callable[[int], bool]) -> st.SearchStrategy[Arg]:
    """A numeric option: a small valid number, or edges, huge numbers and words; judged as
    argparse's `int()` reads them."""
    hostile = st.one_of(
        st.integers(-3, 12).map(str),
        st.sampled_from(
            ["0", "-1", "1000", "1001", str(2**31), str(2**32), str(2**62), str(2**63), str(10**30), "10001"]
        ),
        st.sampled_from(["abc", "1.5", "", "1e3", "0x10", " 5", "٣", "5_0", "-5", "nan", "inf", "²", "--"]),
    )
    texts = st.one_of(st.integers(valid.start, min(valid.start + 8, valid.stop - 1)).map(str), hostile)

    def judge(text: str) -> Arg:
        try:
            value = int(text)
        except ValueError:
            return Arg((flag, text), INVALID, "not an integer")
        return Arg((flag, text), VALID if value in valid else EITHER if either(value) else INVALID)

    return texts.map(judge)


@st.composite
def _menu(draw: st.DrawFn, flag: str, choices: dict[str, int]) -> Arg:
    """One of `choices`, a valid one three times in four."""
    valid = sorted(choice for choice, verdict in choices.items() if verdict == VALID)
    choice = draw(st.sampled_from(valid if valid and chance(draw, 75) else sorted(choices)))
    return Arg((flag, choice), choices[choice])


STEPS_ARG = _count("--steps", range(2, 1001), lambda v: v == 1 or v > 1000)
SAMPLES_ARG = _count("--samples", range(1, 10**4 + 1), lambda v: v > 10**4)
SEED_ARG = _count("--seed", range(2**32), lambda v: True)
BATCH_ARG = _count("--batch-size", range(1, 2**62), lambda v: v >= 2**62)
FLOAT_BITS_ARG = _count("--bops-float-bits", range(1, 65), lambda v: v > 64)
CALIBRATION_ARG = _count("--calibration-samples", range(1, 10**4 + 1), lambda v: v > 10**4)
BOPS_STEPS_ARG = _count("--steps", range(1, 10**4 + 1), lambda v: v > 10**4)
W_BITS_ARG = _count("--w-bits", range(8, 9), lambda v: v >= 1)

OUT_FOLDER = {
    "out": VALID,
    "dir": VALID,
    "dir/../out2": VALID,
    "": VALID,
    "file.txt": INVALID,
    "file.txt/sub": INVALID,
    "a" * 300: INVALID,
}
OUT_FILE = {
    "out.json": VALID,
    "new/dir/out.json": VALID,
    "file.txt": VALID,
    "dir": INVALID,
    "": INVALID,
    "file.txt/out.json": INVALID,
    "a" * 300 + ".json": INVALID,
}
SAMPLERS_MENU = {"ddim": VALID, "ddpm": VALID, "ddim-quad": VALID, "dpm-solver": VALID, "bogus": INVALID, "": INVALID}
ATTENTION_MENU = {"layer": VALID, "float": VALID, "exclude": VALID, "bogus": INVALID}
BASE_MENU = {
    "dynamic": VALID,
    "ptq4dm": EITHER,
    "dynamc": INVALID,
    PAYLOAD: INVALID,
    f"{PAYLOAD}:X": INVALID,
    "": EITHER,
}  # ptq4dm: not with per-sample scales


@dataclass(frozen=True, repr=False)
class CliFiles(Terse):
    """Files the command lines name (absolute paths), made once per module; their verdicts."""

    folder: Path
    models: dict[str, int]  # --model value -> verdict
    weights: dict[str, int]  # --weights value -> verdict with cifar10-ddpm
    recipes: dict[str, int]
    results: dict[str, int]

    def __repr__(self) -> str:
        return f"CliFiles({self.folder})"


@pytest.fixture(scope="module")
def cli_files(tmp_path_factory, env) -> Iterator[CliFiles]:
    """Models, weights, recipes and results files, good and bad, plus the patches that stop
    a command at its expensive work (sampling, big noise, long bops counts)."""
    from diffusers import UNet2DModel
    from safetensors.torch import save_file

    import modiff_quant.cli
    import modiff_quant.evaluate
    import modiff_quant.models
    import modiff_quant.samplers

    root = tmp_path_factory.mktemp("cli")
    payload = env.payload
    torch.manual_seed(0)
    cifar = UNet2DModel(**SMALL_CIFAR)
    state = cifar.state_dict()
    save_file(state, root / "cifar.safetensors")
    torch.save(state, root / "cifar.pt")
    cifar.save_pretrained(root / "cifar-folder")
    save_file(
        {k: torch.full_like(v, float("nan")) if v.is_floating_point() else v for k, v in state.items()},
        root / "nan.safetensors",
    )
    save_file(tiny_unet().state_dict(), root / "other-shapes.safetensors")
    (root / "garbage.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header}" + bytes(range(256)))
    (root / "garbage.pt").write_bytes(b"PK\x03\x04garbage")
    (root / "empty.pt").write_bytes(b"")
    (root / "payload.pt").write_bytes(
        f"c{PAYLOAD}\nX\n)R.".replace(PAYLOAD, payload.name).encode()
    )  # a pickle that imports the payload
    (root / "empty-folder").mkdir()
    tiny_unet().save_pretrained(root / "model-folder")
    (root / "bad-config").mkdir()
    (root / "bad-config" / "config.json").write_text("{not json", encoding="utf-8")
    (root / "config-only").mkdir()
    shutil.copy(root / "model-folder" / "config.json", root / "config-only" / "config.json")
    (root / "evil-class").mkdir()
    (root / "evil-class" / "config.json").write_text(
        json.dumps({"_class_name": payload.name, "_diffusers_version": "0.42.0"}), encoding="utf-8"
    )
    (root / "a-file").write_text("x", encoding="utf-8")
    recipes = {
        "good.yaml": ("version: 1\nextends: w8a4-modiff\n", VALID),
        "broken.yaml": ("version: 1\ndefaults: {a_bits: 4\n", INVALID),
        "payload.yaml": (
            "version: 1\ndefaults:\n  a_granularity: tensor\n"
            f"  base_quantizer: {{name: brevitas, weight_quant: '{payload.name}:X'}}\n",
            INVALID,
        ),
        "strict.yaml": ("version: 1\nstrict: true\nrules:\n  - {match: no_such_layer, a_bits: 8}\n", INVALID),
        "regex.yaml": ("version: 1\nrules:\n  - {match: 're:(.|.)*Z', a_bits: 8}\n", EITHER),
    }
    for name, (text, _) in recipes.items():
        (root / name).write_text(text, encoding="utf-8")
    (root / "latin1.yaml").write_bytes("version: 1\nname: caf\xe9\n".encode("latin-1"))
    results = {
        "results.json": (
            {
                "rows": [{"base": "dynamic", "scheme": "modiff", "w_bits": 8, "a_bits": 4, "fd": 30.0}],
                "fp": {"fd": 20.0},
                "settings": {"steps": 10},
            },
            VALID,
        ),
        "results-list.json": ([], INVALID),
        "results-rows.json": ({"rows": "x", "fp": {"fd": 1}}, INVALID),
        "results-row.json": ({"rows": [{"base": "dynamic"}], "fp": {"fd": 1}}, INVALID),
        "results-nofp.json": (
            {"rows": [{"base": "dynamic", "scheme": "modiff", "w_bits": 8, "a_bits": 4, "fd": 30.0}]},
            INVALID,
        ),
        "results-fp.json": (
            {"rows": [{"base": "dynamic", "scheme": "modiff", "w_bits": 8, "a_bits": 4, "fd": 30.0}], "fp": 3},
            INVALID,
        ),
        "results-str.json": (
            {
                "rows": [{"base": "dynamic", "scheme": "modiff", "w_bits": 8, "a_bits": "4", "fd": "x"}],
                "fp": {"fd": 20.0},
            },
            EITHER,
        ),
    }
    for name, (data, _) in results.items():
        (root / name).write_text(json.dumps(data), encoding="utf-8")
    (root / "results-deep.json").write_text("[" * 100_000 + "]" * 100_000, encoding="utf-8")
    (root / "results-bad.json").write_bytes(b"\xff\xfe{")
    r = str(root)
    files = CliFiles(
        root,
        models={
            "digits16": VALID,
            "cifar10-ddpm": VALID,
            "cifar10-dpm": INVALID,
            f"{r}/model-folder": VALID,
            f"{r}/bad-config": INVALID,
            f"{r}/config-only": INVALID,
            f"{r}/evil-class": INVALID,
            f"{r}/a-file": INVALID,
            f"{r}/missing": INVALID,
            "": INVALID,
        },
        weights={
            f"{r}/cifar.safetensors": VALID,
            f"{r}/cifar.pt": VALID,
            f"{r}/cifar-folder": VALID,
            f"{r}/nan.safetensors": EITHER,
            f"{r}/other-shapes.safetensors": INVALID,
            f"{r}/garbage.safetensors": INVALID,
            f"{r}/garbage.pt": INVALID,
            f"{r}/empty.pt": INVALID,
            f"{r}/payload.pt": INVALID,
            f"{r}/empty-folder": INVALID,
            f"{r}/missing.pt": INVALID,
            f"{r}/a-file": INVALID,
        },
        recipes={
            "w8a4-modiff": VALID,
            "w8a4-modiff-ptq4dm": VALID,
            "w8a4-modif": INVALID,
            f"{r}/missing.yaml": INVALID,
            f"{r}/empty-folder": INVALID,
            f"{r}/latin1.yaml": INVALID,
            **{f"{r}/{name}": verdict for name, (_, verdict) in recipes.items()},
        },
        results={
            f"{r}/missing.json": INVALID,
            f"{r}/empty-folder": INVALID,
            f"{r}/results-deep.json": INVALID,
            f"{r}/results-bad.json": INVALID,
            **{f"{r}/{name}": verdict for name, (_, verdict) in results.items()},
        },
    )

    def stop(*args: Any, **kwargs: Any) -> None:
        raise ExpensiveWork("sampling")

    original_noise = modiff_quant.evaluate.Harness._noise
    original_count = modiff_quant.cli.count_bops

    def noise(self: Any, count: int, seed: int) -> torch.Tensor:
        if count * torch.Size(modiff_quant.models.sample_shape(self.model)).numel() > NOISE_LIMIT:
            raise ExpensiveWork(f"noise for {count} samples")
        return original_noise(self, count, seed)

    def count_bops(entries: Any, plan: Any, steps: int, conventions: Any) -> Any:
        if isinstance(steps, int) and steps > 10**4:
            raise ExpensiveWork(f"bops over {steps} steps")
        return original_count(entries, plan, steps, conventions)

    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(modiff_quant.models.BUILTIN_MODELS, "cifar10-ddpm", SMALL_CIFAR)
        patch.setenv("HF_HUB_OFFLINE", "1")
        sample = modiff_quant.samplers.sample
        for module in [m for name, m in list(sys.modules.items()) if name.startswith("modiff_quant")]:
            if getattr(module, "sample", None) is sample:
                patch.setattr(module, "sample", stop)
        patch.setattr(modiff_quant.evaluate.Harness, "_noise", noise)
        patch.setattr(modiff_quant.cli, "count_bops", count_bops)
        with (
            redirect_stdout(io.StringIO()),
            redirect_stderr(io.StringIO()),
        ):  # warm-up: lazy imports (matplotlib) are not charged to a case
            modiff_quant.cli.main(
                ["plot", "fd-vs-bits", "--results", f"{r}/results.json", "--out", str(root / "warm")]
            )
            modiff_quant.cli.main(["explain", "--model", "digits16", "--recipe", "w8a4-modiff"])
        yield files


GATE_BASE: dict[str, Any] = {
    "version": 1,
    "defaults": {"model": "digits16", "sampler": "ddim", "steps": 5, "samples": 4, "seed": 0},
    "settings": {
        "fp": {"recipe": None, "metrics": {"fd": {"value": 38.5, "tolerance": "15%"}}},
        "w8a4": {
            "recipe": "w8a4-modiff",
            "metrics": {
                "fd_to_fp": {"value": 1.0, "tolerance": "15%"},
                "psnr_vs_fp": {"value": 30.0, "tolerance": 1.0},
            },
        },
    },
    "comparisons": [{"metric": "fd_to_fp", "worse": "fp", "better": "w8a4", "ratio": 1}],
}


def _at(path: tuple[Any, ...], value: Any) -> Callable[[dict[str, Any]], None]:
    def edit(document: dict[str, Any]) -> None:
        node = document
        for key in path[:-1]:
            node = node[key]
        if value is _DELETE:
            del node[path[-1]]
        else:
            node[path[-1]] = value

    return edit


_DELETE = object()
_METRIC = ("settings", "w8a4", "metrics", "fd_to_fp")
GATE_EDITS: dict[str, tuple[Callable[[dict[str, Any]], None], int]] = {
    "as is": (lambda d: None, VALID),
    "value null": (_at((*_METRIC, "value"), None), VALID),
    "tolerance 2.5": (_at((*_METRIC, "tolerance"), 2.5), VALID),
    "no comparisons": (_at(("comparisons",), _DELETE), VALID),
    "ptq4dm recipe": (_at(("settings", "w8a4", "recipe"), "w8a4-modiff-ptq4dm"), VALID),
    "base quantizer": (_at(("settings", "w8a4", "base_quantizer"), "dynamic"), VALID),
    "base quantizer per-sample": (
        _at(("settings", "w8a4", "base_quantizer"), "ptq4dm"),
        INVALID,
    ),  # w8a4-modiff's per-sample scales are not static
    "ddpm": (_at(("defaults", "sampler"), "ddpm"), VALID),
    "batch 2": (_at(("defaults", "batch_size"), 2), VALID),
    "value abc": (_at((*_METRIC, "value"), "abc"), INVALID),
    "value list": (_at((*_METRIC, "value"), [1]), INVALID),
    "value nan": (_at((*_METRIC, "value"), float("nan")), EITHER),
    "value inf": (_at((*_METRIC, "value"), float("inf")), EITHER),
    "tolerance abc": (_at((*_METRIC, "tolerance"), "abc"), INVALID),
    "tolerance %": (_at((*_METRIC, "tolerance"), "%"), INVALID),
    "tolerance list": (_at((*_METRIC, "tolerance"), [1]), INVALID),
    "tolerance -5%": (_at((*_METRIC, "tolerance"), "-5%"), EITHER),
    "no value": (_at((*_METRIC, "value"), _DELETE), INVALID),
    "steps 0": (_at(("defaults", "steps"), 0), INVALID),
    "steps -1": (_at(("defaults", "steps"), -1), INVALID),
    "steps x": (_at(("defaults", "steps"), "x"), INVALID),
    "steps 5000": (_at(("defaults", "steps"), 5000), EITHER),
    "samples 0": (_at(("defaults", "samples"), 0), INVALID),
    "batch 0": (_at(("defaults", "batch_size"), 0), INVALID),
    "calibration 0": (_at(("settings", "w8a4", "calibration_samples"), 0), INVALID),
    "seed x": (_at(("defaults", "seed"), "x"), INVALID),
    "seed -1": (_at(("defaults", "seed"), -1), EITHER),
    "sampler bogus": (_at(("defaults", "sampler"), "bogus"), INVALID),
    "model 5": (_at(("defaults", "model"), 5), INVALID),
    "model missing": (_at(("defaults", "model"), "nosuchmodel"), INVALID),
    "no model": (_at(("defaults", "model"), _DELETE), INVALID),
    "recipe typo": (_at(("settings", "w8a4", "recipe"), "w8a4-modif"), INVALID),
    "recipe 5": (_at(("settings", "w8a4", "recipe"), 5), INVALID),
    "recipe payload": (_at(("settings", "w8a4", "recipe"), f"{PAYLOAD}.py"), INVALID),
    "base typo": (_at(("settings", "w8a4", "base_quantizer"), "dynamc"), INVALID),
    "metric fid": (_at(("settings", "w8a4", "metrics", "fid"), {"value": 1.0}), INVALID),
    "metrics list": (_at(("settings", "w8a4", "metrics"), []), INVALID),
    "setting string": (_at(("settings", "w8a4"), "x"), INVALID),
    "version 2": (_at(("version",), 2), INVALID),
    "no settings": (_at(("settings",), _DELETE), INVALID),
    "settings empty": (_at(("settings",), {}), EITHER),
    "unknown key": (_at(("bogus",), 1), INVALID),
    "comparisons string": (_at(("comparisons",), "x"), INVALID),
    "comparison unknown setting": (_at(("comparisons", 0, "worse"), "nope"), INVALID),
    "comparison ratio abc": (_at(("comparisons", 0, "ratio"), "abc"), INVALID),
    "comparison no ratio": (_at(("comparisons", 0, "ratio"), _DELETE), INVALID),
    "comparison list": (_at(("comparisons", 0), [1]), INVALID),
}
GATE_WHOLE = {
    "not UTF-8": b"version: 1\nsettings: {caf\xe9: 1}\n",
    "tag": b"!!python/object/apply:os.system ['true']\n",
    "alias bomb": recipe_yaml({"version": 1, "settings": _alias_bomb(6, 9, 0)}).encode(),
    "deep": recipe_yaml({"version": 1, "settings": Raw("[" * 5000 + "]" * 5000)}).encode(),
    "empty": b"",
    "NUL": b"version: 1\x00\n",
}


@st.composite
def gate_files(draw: st.DrawFn) -> tuple[bytes, int, str]:
    """A baselines file: the documented example with a few edits, or a hostile whole file."""
    if not chance(draw, 85):
        name = draw(st.sampled_from(sorted(GATE_WHOLE)))
        return GATE_WHOLE[name], INVALID, name
    document = copy.deepcopy(GATE_BASE)
    names = draw(st.lists(st.sampled_from(sorted(GATE_EDITS)), min_size=1, max_size=2, unique=True))
    verdict = VALID
    for name in names:
        edit, judged = GATE_EDITS[name]
        try:
            edit(document)
        except (KeyError, IndexError, TypeError):  # an earlier edit removed what this one edits
            continue
        verdict = max(verdict, judged)
    return recipe_yaml(document).encode(), verdict, "+".join(names)


@dataclass(frozen=True, repr=False)
class CliCase(Terse):
    """A command line, its verdict by the documented rules, and the baselines file it may name."""

    argv: tuple[str, ...]
    verdict: int
    why: str
    baseline: bytes = b""

    def __repr__(self) -> str:
        return (
            f"CliCase(argv={list(self.argv)!r}, verdict={('VALID', 'EITHER', 'INVALID')[self.verdict]} ({self.why}), "
            f"baseline={_short(self.baseline, 300)})"
        )


def _options(
    draw: st.DrawFn, required: list[st.SearchStrategy[Arg]], optional: list[st.SearchStrategy[Arg]]
) -> list[Arg]:
    args = [draw(option) for option in required if chance(draw, 95)]
    if len(args) < len(required):
        args.append(Arg((), INVALID, "a required option left out"))
    args += [draw(option) for option in optional if not chance(draw, 60)]
    return args


@st.composite
def cli_cases(draw: st.DrawFn, files: CliFiles) -> CliCase:
    models = _menu("--model", files.models)
    recipes = _menu("--recipe", files.recipes)
    command = draw(
        st.sampled_from(
            ["explain", "bops", "eval", "demo", "plot distributions", "plot step-error", "plot fd-vs-bits", "gate"]
        )
    )
    sampling = [
        STEPS_ARG,
        SAMPLES_ARG,
        SEED_ARG,
        BATCH_ARG,
        _menu("--sampler", SAMPLERS_MENU),
        _menu("--calibration-cache", OUT_FOLDER),
        _menu("--bops-attention", ATTENTION_MENU),
        FLOAT_BITS_ARG,
    ]
    baseline, args = b"", []
    if command == "explain":
        args = _options(draw, [models, recipes], [])
    elif command == "bops":
        args = _options(
            draw,
            [models, _menu("--json", OUT_FILE)],
            [recipes, BOPS_STEPS_ARG, _menu("--bops-attention", ATTENTION_MENU), FLOAT_BITS_ARG],
        )
    elif command == "eval":
        args = _options(
            draw,
            [models, recipes, _menu("--json", OUT_FILE)],
            [*sampling, _menu("--base-quantizer", BASE_MENU), CALIBRATION_ARG, _menu("--out", OUT_FOLDER)],
        )
    elif command == "demo":
        demo_recipes = st.lists(st.sampled_from(sorted(files.recipes)), min_size=1, max_size=3).map(
            lambda rs: Arg(("--recipes", *rs), max(files.recipes[r] for r in rs))
        )
        args = _options(draw, [], [models, *sampling, demo_recipes, _menu("--out", OUT_FOLDER)])
    elif command == "plot distributions":
        layers = st.lists(
            st.sampled_from(["conv_in", "mid_block.attentions.0.to_q", "no_such_layer", ""]), min_size=1, max_size=2
        ).map(lambda ls: Arg(("--layers", *ls), EITHER))
        args = _options(draw, [_menu("--out", OUT_FOLDER)], [models, *sampling, layers])
    elif command == "plot step-error":
        args = _options(draw, [_menu("--out", OUT_FOLDER)], [models, *sampling, recipes])
    elif command == "plot fd-vs-bits":
        args = _options(draw, [_menu("--out", OUT_FOLDER)], [_menu("--results", files.results), W_BITS_ARG])
        results = next((a for a in args if a.words[:1] == ("--results",)), None)
        if results is None:
            args.append(Arg((), INVALID, "no --results: the default file does not exist"))
    else:
        baseline, verdict, why = draw(gate_files())
        args = [Arg(("--baseline", "baseline.yaml"), verdict, why)] + (
            [Arg(("--update",), VALID)] if draw(st.booleans()) else []
        )
    if command in ("eval", "plot distributions", "plot step-error", "demo", "explain", "bops") and not chance(
        draw, 70
    ):
        args.append(draw(_menu("--weights", files.weights)))
    if not chance(draw, 95):
        args.append(
            draw(
                st.sampled_from(
                    [
                        Arg(("--bogus",), INVALID, "unknown option"),
                        Arg(("stray",), INVALID, "stray word"),
                        Arg(("--steps",), INVALID, "option without value"),
                    ]
                )
            )
        )
    args = draw(st.permutations(args)) if not chance(draw, 80) else args
    verdict = max([VALID, *(a.verdict for a in args)])
    verdict = max(verdict, _model_weights_verdict(files, args))
    why = "; ".join(
        f"{' '.join(a.words)[:60]}: {('VALID', 'EITHER', 'INVALID')[a.verdict]}{' ' + a.what if a.what else ''}"
        for a in args
        if a.verdict
    )
    return CliCase((*command.split(), *(w for a in args for w in a.words)), verdict, why, baseline)


def _model_weights_verdict(files: CliFiles, args: list[Arg]) -> int:
    """--weights with a model other than cifar10-ddpm may be refused or ignored; weights alone
    were judged as cifar10-ddpm's (the others bring their own weights)."""
    model = next((a.words[1] for a in reversed(args) if a.words[:1] == ("--model",)), "digits16")
    weights = [a for a in args if a.words[:1] == ("--weights",)]
    if weights and model != "cifar10-ddpm" and files.models.get(model) == VALID:
        return EITHER
    return VALID


def check_cli(env: FuzzEnv, case: CliCase, folder: Path) -> None:
    """main(argv) ends in exactly one of: exit 0, exit 2 with one `modiff-quant: error:` line
    (or argparse's usage error), or the expensive work; which one the verdict allows."""
    from modiff_quant.cli import main

    (folder / "file.txt").write_text("x", encoding="utf-8")
    (folder / "dir").mkdir()
    (folder / "baseline.yaml").write_bytes(case.baseline.replace(PAYLOAD.encode(), env.payload.name.encode()))
    stdout, stderr = io.StringIO(), io.StringIO()

    def run() -> int:
        with chdir(folder), redirect_stdout(stdout), redirect_stderr(stderr):
            return main([word.replace(PAYLOAD, env.payload.name) for word in case.argv])

    command = " ".join(case.argv[: 2 if case.argv[:1] == ("plot",) else 1])
    outcome = env.guard(f"modiff-quant {command}", run, CLI_LIMIT)
    report = Report()
    report.bounds(outcome)
    error, lines = outcome.error, stderr.getvalue().strip().splitlines()
    if isinstance(error, SystemExit):
        ending = f"exit {error.code} (argparse)"
        if error.code != 2 or not lines or ": error: " not in lines[-1]:
            report.add("argparse exit", f"SystemExit({error.code}) with stderr {lines[-2:]!r}")
        code = 2
    elif isinstance(error, ExpensiveWork):
        ending, code = "expensive work", None
    elif error is not None:
        ending, code = type(error).__name__, None
        report.unexpected(outcome, "exit 0, exit 2 with one 'modiff-quant: error:' line, or the expensive work")
    else:
        ending, code = f"exit {outcome.value}", outcome.value
        if code == 2 and (len(lines) != 1 or not lines[0].startswith("modiff-quant: error: ")):
            report.add(
                "exit 2 without one error line",
                f"exit 2, but stderr is not one 'modiff-quant: error:' line: {lines[:3]!r}",
            )
        elif code not in (0, 1, 2):
            report.add("exit code", f"main returned {code!r}")
    event(f"{command}: {ending}")
    verdict = ("VALID", "EITHER", "INVALID")[case.verdict]
    if case.verdict == INVALID and code != 2 and not report.problems:
        report.add(
            f"invalid input accepted ({ending})",
            f"{verdict} command line ended in {ending}, not exit 2 before the expensive work ({case.why})",
        )
    if case.verdict == VALID and code == 2:
        report.add("valid input refused", f"{verdict} command line refused: {lines[-1:]!r}")
    report.check()


@settings(fuzz_settings(0.5))
@given(data=st.data())
def test_command_lines_from_strangers(env, cli_files, data):
    case = data.draw(cli_cases(cli_files), label="case")
    with clean_folder(env.folder()) as folder:
        check_cli(env, case, folder)
