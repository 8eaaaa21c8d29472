"""Machinery of the fuzz suite (tests/test_fuzz.py): a guarded call that bounds time and records
imports, a model snapshot that tells whether a failed call changed anything, a payload module
that must never run, and a YAML writer that can place raw YAML (tags, aliases, bombs) anywhere.

The contracts checked are the documented ones (docs/recipes.md "Errors", README "Ship it",
issue 14): recipe errors are `RecipeError` starting with `file:line:`, checkpoint errors are
`LoadError`, nothing imports a module the user did not install, every call returns in bounded
time and memory, and a failed call leaves the model as it was.
"""

from __future__ import annotations

import importlib.abc
import importlib.metadata
import json
import math
import re
import resource
import secrets
import signal
import sys
import time
import traceback
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

MESSAGE_LIMIT = 20_000
"""Characters an error message may have beyond the size of the input it is about: messages quote
values, they must not expand them (a 458-byte alias bomb once made a 351 MB message)."""

RSS_GROWTH_LIMIT_MB = 1024
"""Growth of the process's peak resident memory one call may cause."""

REPO = Path(__file__).resolve().parents[1]
PAYLOAD_PREFIX = "fuzz_payload_"


class Terse:
    """Printed by its own short `__repr__`, also in hypothesis' reports (which otherwise print
    dataclasses field by field: whole models, megabytes of files)."""

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        printer.text(repr(self))


class Overran(Exception):
    """Raised inside a guarded call that ran past its time bound (re-raised every 0.25 s, so a
    call that swallows it still stops)."""


# ---------------------------------------------------------------------------------------------
# imports


class _ImportRecorder(importlib.abc.MetaPathFinder):
    """First on sys.meta_path during a guarded call: records every module name looked up, finds nothing."""

    def __init__(self) -> None:
        self.names: list[str] = []

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> None:
        self.names.append(fullname)


_ALLOWED_TOP_LEVEL: frozenset[str] | None = None


def allowed_top_level() -> frozenset[str]:
    """Top-level module names a call may import: the stdlib and installed distributions' packages."""
    global _ALLOWED_TOP_LEVEL
    if _ALLOWED_TOP_LEVEL is None:
        _ALLOWED_TOP_LEVEL = frozenset(sys.stdlib_module_names) | frozenset(
            importlib.metadata.packages_distributions()
        )
    return _ALLOWED_TOP_LEVEL


@dataclass(frozen=True)
class Payload:
    """A module that writes `marker` when imported, planted where a careless loader might find it."""

    name: str
    marker: Path

    @classmethod
    def plant(cls, on_path: Path, marker_dir: Path) -> Payload:
        payload = cls(f"{PAYLOAD_PREFIX}{secrets.token_hex(4)}", marker_dir / "payload-ran")
        payload.write_into(on_path)
        if str(on_path) not in sys.path:
            sys.path.insert(0, str(on_path))
        return payload

    def source(self) -> str:
        return f"import pathlib\npathlib.Path({str(self.marker)!r}).write_text('ran')\nclass X:\n    pass\n"

    def write_into(self, folder: Path) -> None:
        (folder / f"{self.name}.py").write_text(self.source(), encoding="utf-8")

    def ran(self) -> bool:
        """True when the payload was imported since the last call; forgets it (the next call is judged on its own)."""
        ran = self.marker.exists() or self.name in sys.modules
        self.marker.unlink(missing_ok=True)
        sys.modules.pop(self.name, None)
        return ran

    def substitute(self, text: str) -> str:
        """Recipes are generated with the placeholder `fuzz_payload_MODULE`; the real name is random per session."""
        return text.replace(f"{PAYLOAD_PREFIX}MODULE", self.name)


# ---------------------------------------------------------------------------------------------
# guarded calls


@dataclass
class Outcome:
    """What one guarded call did."""

    what: str
    limit: float
    value: Any = None
    error: BaseException | None = None
    seconds: float = 0.0
    unlisted_imports: tuple[str, ...] = ()
    payload_ran: bool = False
    rss_growth_mb: float = 0.0
    where: str = ""  # file:line (function) where the error was raised, in the project if possible

    @property
    def overran(self) -> bool:
        return isinstance(self.error, Overran) or self.seconds > self.limit

    def bound_problems(self) -> list[tuple[str, str]]:
        """(kind, text) of the bounds every call is checked against, whatever it returned."""
        problems = []
        if self.overran:
            problems.append(("overran", f"{self.what} ran {self.seconds:.2f} s, past its bound of {self.limit:g} s"))
        if self.unlisted_imports:
            problems.append(
                (
                    "unlisted import",
                    f"{self.what} imported modules that are neither stdlib nor installed: "
                    f"{', '.join(self.unlisted_imports)}",
                )
            )
        if self.payload_ran:
            problems.append(("payload ran", f"{self.what} ran the planted payload module"))
        if self.rss_growth_mb > RSS_GROWTH_LIMIT_MB:
            problems.append(("memory", f"{self.what} grew the peak memory by {self.rss_growth_mb:.0f} MB"))
        return problems

    def describe_error(self) -> str:
        if self.error is None:
            return "no error"
        text = str(self.error)
        text = text if len(text) < 600 else f"{text[:300]} ... {text[-200:]} ({len(text)} chars)"
        return f"{type(self.error).__module__}.{type(self.error).__qualname__} at {self.where}: {text}"


def _raise_overran(signum: int, frame: Any) -> None:
    raise Overran("time bound exceeded")


def _where(error: BaseException) -> str:
    frames = traceback.extract_tb(error.__traceback__)
    ours = [
        f
        for f in frames
        if f.filename.startswith(str(REPO)) and "/tests/" not in f.filename and "/.venv/" not in f.filename
    ]
    frame = (ours or frames or [None])[-1]
    if frame is None:
        return "?"
    return (
        f"{Path(frame.filename).relative_to(REPO) if frame.filename.startswith(str(REPO)) else frame.filename}"
        f":{frame.lineno} ({frame.name})"
    )


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def guarded(what: str, call: Callable[[], Any], limit: float, payload: Payload | None) -> Outcome:
    """Run `call` with a time bound (SIGALRM raises `Overran` in it), warnings silenced, and every
    module import it makes recorded; never raises what `call` raises."""
    outcome = Outcome(what, limit)
    recorder = _ImportRecorder()
    before = set(sys.modules)
    rss = _peak_rss_mb()
    previous = signal.signal(signal.SIGALRM, _raise_overran)
    sys.meta_path.insert(0, recorder)
    start = time.perf_counter()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            signal.setitimer(signal.ITIMER_REAL, limit, 0.25)
            try:
                outcome.value = call()
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
    except (Exception, SystemExit) as exc:  # the point of the guard: any error is an outcome to judge (argparse exits)
        outcome.error = exc
        outcome.where = _where(exc)
    finally:
        outcome.seconds = time.perf_counter() - start
        sys.meta_path.remove(recorder)
        signal.signal(signal.SIGALRM, previous)
    allowed = allowed_top_level()
    imported = [
        name
        for name in dict.fromkeys(recorder.names)
        if name not in before and (name in sys.modules or name.startswith(PAYLOAD_PREFIX))
    ]
    outcome.unlisted_imports = tuple(name for name in imported if name.partition(".")[0] not in allowed)
    outcome.payload_ran = payload is not None and payload.ran()
    outcome.rss_growth_mb = _peak_rss_mb() - rss
    return outcome


# ---------------------------------------------------------------------------------------------
# model snapshots


def _hook_counts(module: nn.Module) -> tuple[int, ...]:
    return tuple(
        len(getattr(module, name, {}))
        for name in (
            "_forward_pre_hooks",
            "_forward_hooks",
            "_backward_hooks",
            "_state_dict_hooks",
            "_load_state_dict_pre_hooks",
        )
    )


def _global_hook_counts() -> tuple[int, int]:
    from torch.nn.modules import module as torch_module

    return len(torch_module._global_forward_pre_hooks), len(torch_module._global_forward_hooks)


@dataclass(frozen=True, repr=False)
class ModelSnapshot(Terse):
    """Everything a failed call must leave as it was: tensors, module classes, hooks, instance
    `forward` overrides, modiff_quant's attributes, and the global module hooks."""

    tensors: dict[str, torch.Tensor]
    classes: dict[str, type]
    hooks: dict[str, tuple[int, ...]]
    forwards: frozenset[str]
    attributes: frozenset[str]
    global_hooks: tuple[int, int]

    def __repr__(self) -> str:
        return f"ModelSnapshot({len(self.tensors)} tensors, {len(self.classes)} modules)"

    @classmethod
    def take(cls, model: nn.Module) -> ModelSnapshot:
        modules = dict(model.named_modules())
        return cls(
            tensors={key: value.detach().clone() for key, value in model.state_dict(keep_vars=True).items()},
            classes={name: type(module) for name, module in modules.items()},
            hooks={name: _hook_counts(module) for name, module in modules.items()},
            forwards=frozenset(name for name, module in modules.items() if "forward" in vars(module)),
            attributes=frozenset(
                f"{name}.{attr}"
                for name, module in modules.items()
                for attr in vars(module)
                if attr.startswith("_modiff")
            ),
            global_hooks=_global_hook_counts(),
        )

    def differences(self, model: nn.Module) -> list[str]:
        """What differs in `model` from this snapshot (empty: unchanged)."""
        now = ModelSnapshot.take(model)
        found = []
        if set(now.tensors) != set(self.tensors):
            found.append(
                f"state_dict keys changed: +{sorted(set(now.tensors) - set(self.tensors))[:3]} "
                f"-{sorted(set(self.tensors) - set(now.tensors))[:3]}"
            )
        changed = [
            k for k in self.tensors.keys() & now.tensors.keys() if not _same_tensor(self.tensors[k], now.tensors[k])
        ]
        if changed:
            found.append(f"{len(changed)} tensors changed, e.g. {sorted(changed)[:3]}")
        reclassed = [
            f"{n} {self.classes[n].__name__}->{now.classes[n].__name__}"
            for n in self.classes.keys() & now.classes.keys()
            if self.classes[n] is not now.classes[n]
        ]
        if reclassed or set(now.classes) != set(self.classes):
            found.append(
                f"modules re-classed or added/removed: {sorted(reclassed)[:3]} "
                f"{sorted(set(now.classes) ^ set(self.classes))[:3]}"
            )
        hooked = sorted(n for n in self.hooks.keys() & now.hooks.keys() if self.hooks[n] != now.hooks[n])
        if hooked:
            found.append(f"hooks changed on {hooked[:3]}")
        if now.forwards != self.forwards:
            found.append(f"instance forward attributes changed: {sorted(now.forwards ^ self.forwards)[:3]}")
        if now.attributes != self.attributes:
            found.append(f"modiff_quant attributes changed: {sorted(now.attributes ^ self.attributes)[:3]}")
        if now.global_hooks != self.global_hooks:
            found.append(f"global module hooks changed: {self.global_hooks} -> {now.global_hooks}")
        return found


def _same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (
        type(a) is type(b) and a.dtype == b.dtype and a.shape == b.shape and bool(torch.equal(a.detach(), b.detach()))
    )


# ---------------------------------------------------------------------------------------------
# recipe error messages


_PREFIX = re.compile(r"(?P<file>.+?):(?P<line>\d+): ", re.DOTALL)


def _line_count(path: Path) -> int:
    """Lines of a file under any line-break convention YAML knows (an upper bound for error lines)."""
    text = path.read_bytes().decode("utf-8", errors="replace")
    return 1 + sum(text.count(brk) for brk in ("\n", "\r", "\x85", "\u2028", "\u2029"))


def location_problem(message: str) -> str | None:
    """None when `message` starts with `file:line: ` naming an existing file (the recipe or one
    it extends, whatever its name) and a line in it."""
    match = _PREFIX.match(message)
    if match is None:
        return f"message does not start with file:line: {message[:200]!r}"
    path = Path(match["file"])
    try:
        named = path.is_file()
    except (OSError, ValueError):
        named = False
    if not named:
        return f"message names {match['file'][:200]!r}, which is not a file"
    line, lines = int(match["line"]), _line_count(path)
    if not 1 <= line <= lines + 1:  # + 1: YAML errors at the end of a file name the line after it
        return f"message names line {line} of {match['file']!r}, which has {lines} lines"
    return None


def message_problem(error: BaseException, input_bytes: int) -> str | None:
    size = len(str(error))
    if size > MESSAGE_LIMIT + input_bytes:
        return f"error message of {size} characters for {input_bytes} bytes of input (limit {MESSAGE_LIMIT} + input)"
    return None


# ---------------------------------------------------------------------------------------------
# YAML text


@dataclass(frozen=True)
class Raw:
    """YAML text placed verbatim where a value goes (tags, anchors, aliases, huge numbers)."""

    text: str


def flow(value: Any) -> str:
    """`value` as one line of flow-style YAML (strings double-quoted, JSON escapes)."""
    if isinstance(value, Raw):
        return value.text
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return ".nan"
        if math.isinf(value):
            return ".inf" if value > 0 else "-.inf"
        return f"{value:.17e}"  # with a dot: YAML 1.1 reads a float
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(flow(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{flow(k)}: {flow(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"cannot write {type(value).__name__} as YAML")


def recipe_yaml(document: Any) -> str:
    """A recipe document as YAML: top-level keys and each setting and rule on their own line, so
    errors have distinct lines."""
    if not isinstance(document, dict):
        return flow(document) + "\n"
    lines = []
    for key, value in document.items():
        if key == "defaults" and isinstance(value, dict) and value:
            lines.append("defaults:")
            lines += [f"  {flow(k)}: {flow(v)}" for k, v in value.items()]
        elif key == "rules" and isinstance(value, list) and value:
            lines.append("rules:")
            lines += [f"  - {flow(rule)}" for rule in value]
        else:
            lines.append(f"{flow(key)}: {flow(value)}")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# session environment


@dataclass(repr=False)
class FuzzEnv(Terse):
    """Per-session state of the fuzz suite: scratch space and the payload."""

    root: Path
    payload: Payload
    counter: int = 0
    chains: dict[int, list[Path]] = field(default_factory=dict)

    def __repr__(self) -> str:
        return f"FuzzEnv({self.root})"

    def folder(self) -> Path:
        """A fresh, empty folder with the payload planted in it."""
        self.counter += 1
        folder = self.root / f"case{self.counter}"
        folder.mkdir()
        self.payload.write_into(folder)
        return folder

    def chain(self, length: int) -> list[Path]:
        """Recipe files c0.yaml -> c1.yaml -> ... (each extends the next), made once per length:
        writing a thousand files per case would cost more than loading them."""
        if length not in self.chains:
            folder = self.root / f"chain{length}"
            folder.mkdir()
            for i in range(length):
                (folder / f"c{i}.yaml").write_text(
                    f"version: 1\nextends: c{i + 1}.yaml\n" if i + 1 < length else "version: 1\n", encoding="utf-8"
                )
            self.chains[length] = [folder / f"c{i}.yaml" for i in range(length)]
        return self.chains[length]

    def guard(self, what: str, call: Callable[[], Any], limit: float) -> Outcome:
        return guarded(what, call, limit, self.payload)


@contextmanager
def clean_folder(path: Path) -> Iterator[Path]:
    """Remove `path` afterwards (examples are many; scratch space is not)."""
    import shutil

    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
