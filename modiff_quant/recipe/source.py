"""YAML loading that remembers where every mapping key and list item came from, within limits.

Recipe errors must name the file and line; PyYAML's plain loader forgets both, so this
loader builds dict/list subclasses that carry line numbers. A recipe may come from a stranger:
every limit below is checked before the work it bounds (the file size before reading it, the
nesting depth and the number of values after alias expansion on the parser's events before
anything is composed), and every failure is a RecipeError with file:line.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ..quoting import clip, shown

MAX_BYTES = 1 << 20
"""Recipe text read for one recipe and the files it extends, together."""

MAX_DEPTH = 32
"""Nesting levels of mappings and lists (aliases counted as what they stand for)."""

MAX_VALUES = 20_000
"""Scalars, mappings and lists of one recipe and the files it extends, aliases expanded: a
500-byte alias bomb stands for millions, which a check or an error message would walk."""

MAX_NUMBER_CHARS = 100
"""Characters of one YAML number (Python's int() refuses 4,300 digits; base-60 ints are quadratic)."""

_Base = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
"""libyaml's parser where PyYAML was built with it (every PyYAML wheel; 10-40x faster), else PyYAML's own."""

_NON_PRINTABLE = yaml.reader.Reader.NON_PRINTABLE  # what YAML forbids in a stream
_BREAK = re.compile("\r\n|[\r\n\x85\u2028\u2029]")  # YAML 1.1 line breaks, as the parser counts lines


@dataclass(frozen=True)
class Location:
    file: str
    line: int

    def __str__(self) -> str:
        return f"{self.file}:{self.line}"


class RecipeError(ValueError):
    """An invalid recipe, or one that does not fit the model; the message starts with file:line."""

    def __init__(self, location: Location | None, message: str) -> None:
        super().__init__(f"{location}: {message}" if location else message)
        self.location = location


@dataclass
class Budget:
    """What is left of the limits for one recipe and the files it extends, which share them."""

    bytes: int = MAX_BYTES
    values: int = MAX_VALUES


class LocatedDict(dict):
    """A YAML mapping plus the line of the mapping and of each key."""

    location: Location | None = None
    key_locations: dict[Any, Location] = {}  # replaced per instance by the loader; never mutated

    def where(self, key: Any) -> Location:
        return self.key_locations.get(key, self.location)


class LocatedList(list):
    """A YAML sequence plus the line of the sequence and of each item."""

    location: Location | None = None
    item_locations: list[Location] = []  # replaced per instance by the loader; never mutated


def read_located(path: Path, budget: Budget | None = None) -> Any:
    """Read and parse a UTF-8 YAML file (at most `budget.bytes`, which it then uses up)."""
    budget = budget or Budget()
    file = str(path)
    try:
        if path.stat().st_size > budget.bytes:
            raise RecipeError(Location(file, 1), _over_size())
        with path.open("rb") as stream:
            data = stream.read(budget.bytes + 1)  # the size may have changed, or be unknown (a special file)
    except OSError as exc:
        raise RecipeError(Location(file, 1), f"cannot read the file: {exc.strerror or exc}") from None
    if len(data) > budget.bytes:
        raise RecipeError(Location(file, 1), _over_size())
    budget.bytes -= len(data)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        valid = data[: exc.start].decode("utf-8")
        line = _line_at(valid, len(valid))
        raise RecipeError(
            Location(file, line), f"not UTF-8 text: byte 0x{data[exc.start]:02x} at offset {exc.start} ({exc.reason})"
        ) from None
    return load_located(text, file, budget)


def load_located(text: str, file: str, budget: Budget | None = None) -> Any:
    """Parse YAML text into plain values whose mappings and lists know their lines."""
    budget = budget or Budget()
    bad = _NON_PRINTABLE.search(text)
    if bad:
        raise RecipeError(
            Location(file, _line_at(text, bad.start())),
            f"invalid YAML: character U+{ord(bad.group()):04X} is not allowed in YAML text",
        )

    class Loader(_Base):
        def construct_object(self, node: yaml.Node, deep: bool = False) -> Any:
            """Any failure of a YAML type's constructor (`!!int abc`, `!!bool maybe`) as a RecipeError at the node."""
            try:
                return super().construct_object(node, deep)
            except (RecipeError, yaml.YAMLError):
                raise
            except (ValueError, TypeError, KeyError, IndexError, AttributeError, OverflowError) as exc:
                value = f" {shown(node.value)}" if isinstance(node, yaml.ScalarNode) else ""
                reason = (
                    "" if isinstance(exc, KeyError) else f": {clip(str(exc), 200)}"
                )  # a KeyError says only the key
                raise RecipeError(
                    _at(file, node), f"invalid {node.tag.replace('tag:yaml.org,2002:', '!!')} value{value}{reason}"
                ) from None

    def mapping(loader: Loader, node: yaml.Node) -> LocatedDict:
        if not isinstance(node, yaml.MappingNode):  # a tag such as !!map on a list
            raise yaml.constructor.ConstructorError(
                None, None, f"{node.tag} needs a mapping, found a {node.id}", node.start_mark
            )
        loader.flatten_mapping(node)
        result = LocatedDict()
        result.location, result.key_locations = _at(file, node), {}
        for key_node, value_node in node.value:
            key = loader.construct_object(key_node, deep=True)
            if not isinstance(key, (str, int, float, bool)) and key is not None:
                raise RecipeError(_at(file, key_node), f"keys must be plain names, got {type(key).__name__}")
            if key in result:
                raise RecipeError(_at(file, key_node), f"duplicate key {shown(key)}")
            result[key] = loader.construct_object(value_node, deep=True)
            result.key_locations[key] = _at(file, key_node)
        return result

    def sequence(loader: Loader, node: yaml.Node) -> LocatedList:
        result = LocatedList(loader.construct_sequence(node, deep=True))  # checks that the node is a sequence
        result.location = _at(file, node)
        result.item_locations = [_at(file, item) for item in node.value]
        return result

    def number(construct: Any) -> Any:
        def bounded(loader: Loader, node: yaml.Node) -> Any:
            if isinstance(node, yaml.ScalarNode) and len(node.value) > MAX_NUMBER_CHARS:
                raise RecipeError(
                    _at(file, node),
                    f"a number of {len(node.value)} characters ({shown(node.value, 40)}); "
                    f"the limit is {MAX_NUMBER_CHARS}",
                )
            return construct(loader, node)

        return bounded

    Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, mapping)
    Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_SEQUENCE_TAG, sequence)
    Loader.add_constructor("tag:yaml.org,2002:int", number(yaml.constructor.SafeConstructor.construct_yaml_int))
    Loader.add_constructor("tag:yaml.org,2002:float", number(yaml.constructor.SafeConstructor.construct_yaml_float))
    try:
        _check_shape(text, file, budget)
        return yaml.load(text, Loader=Loader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = min(mark.line + 1, _line_at(text, len(text))) if mark else 1  # the end may be past the last line
        raise RecipeError(Location(file, line), f"invalid YAML: {exc.problem or exc}") from None
    except yaml.YAMLError as exc:
        raise RecipeError(Location(file, 1), f"invalid YAML: {clip(str(exc), 200)}") from None


@dataclass
class _Open:
    """A mapping or list whose end the parser has not reached yet."""

    anchor: str | None
    values: int = 1  # itself and everything in it, aliases expanded
    height: int = 1  # levels of mappings and lists from it down (a scalar has none)


def _check_shape(text: str, file: str, budget: Budget) -> None:
    """Check the nesting depth and the number of values, aliases expanded, on the parser's events:
    composing a node tree is recursive, and an alias is cheap to write but costly to walk."""
    anchors: dict[str, tuple[int, int]] = {}  # anchor -> (values, height) of its node
    stack: list[_Open] = []
    for event in yaml.parse(text, Loader=_Base):
        if isinstance(event, yaml.CollectionEndEvent):
            done = stack.pop()
            if done.anchor:
                anchors[done.anchor] = (done.values, done.height)
            if stack:
                stack[-1].values += done.values
                stack[-1].height = max(stack[-1].height, done.height + 1)
            continue
        if not isinstance(event, yaml.NodeEvent):
            continue
        if isinstance(event, yaml.AliasEvent):
            # an alias of a node still open (recursive) counts as a scalar here: the constructor refuses it
            values, height = anchors.get(event.anchor, (1, 0))
        else:  # a scalar, or the start of a mapping or list (one level high until its end event)
            values = 1
            height = 1 if isinstance(event, yaml.CollectionStartEvent) else 0
        budget.values -= values
        where = Location(file, event.start_mark.line + 1)
        if len(stack) + height > MAX_DEPTH:
            raise RecipeError(where, f"nested deeper than {MAX_DEPTH} levels (aliases counted as what they stand for)")
        if budget.values < 0:
            raise RecipeError(
                where,
                f"more than {MAX_VALUES:,} values (aliases counted as what they stand for) "
                "in the recipe and the files it extends",
            )
        if isinstance(event, yaml.CollectionStartEvent):
            stack.append(_Open(event.anchor))
            continue
        if isinstance(event, yaml.ScalarEvent) and event.anchor:
            anchors[event.anchor] = (1, 0)
        if stack:
            stack[-1].values += values
            stack[-1].height = max(stack[-1].height, height + 1)


def _over_size() -> str:
    return f"recipe text over {MAX_BYTES:,} bytes (the limit for a recipe and the files it extends, together)"


def _line_at(text: str, index: int) -> int:
    """The 1-based line of `text[index]`, counting line breaks as YAML does."""
    return len(_BREAK.findall(text, 0, index)) + 1


def _at(file: str, node: yaml.Node) -> Location:
    return Location(file, node.start_mark.line + 1)
