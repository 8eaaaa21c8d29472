"""YAML loading that remembers where every mapping key and list item came from.

Recipe errors must name the file and line; PyYAML's plain loader forgets both, so this
loader builds dict/list subclasses that carry line numbers.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml


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


def load_located(text: str, file: str) -> Any:
    """Parse YAML text into plain values whose mappings and lists know their lines."""

    class Loader(yaml.SafeLoader):
        pass

    def mapping(loader: Loader, node: yaml.MappingNode) -> LocatedDict:
        loader.flatten_mapping(node)
        result = LocatedDict()
        result.location, result.key_locations = _at(file, node), {}
        for key_node, value_node in node.value:
            key = loader.construct_object(key_node, deep=True)
            if not isinstance(key, (str, int, float, bool)) and key is not None:
                raise RecipeError(_at(file, key_node), f"keys must be plain names, got {type(key).__name__}")
            if key in result:
                raise RecipeError(_at(file, key_node), f"duplicate key {key!r}")
            result[key] = loader.construct_object(value_node, deep=True)
            result.key_locations[key] = _at(file, key_node)
        return result

    def sequence(loader: Loader, node: yaml.SequenceNode) -> LocatedList:
        result = LocatedList(loader.construct_object(item, deep=True) for item in node.value)
        result.location, result.item_locations = _at(file, node), [_at(file, item) for item in node.value]
        return result

    Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, mapping)
    Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_SEQUENCE_TAG, sequence)
    try:
        return yaml.load(text, Loader=Loader)  # noqa: S506 - a SafeLoader subclass
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        raise RecipeError(Location(file, mark.line + 1) if mark else None, f"invalid YAML: {exc.problem or exc}") from None


def _at(file: str, node: yaml.Node) -> Location:
    return Location(file, node.start_mark.line + 1)


def read_located(path: Path) -> Any:
    return load_located(path.read_text(encoding="utf-8"), str(path))
