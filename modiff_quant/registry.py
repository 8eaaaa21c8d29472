"""Name -> class registries for schemes, base quantizers and observers.

Each kind has a decorator for code that is imported anyway and an entry-point group for
plugins in other packages (the bitsandbytes pattern, but lazy: a plugin is imported only
when its name is first looked up, so a broken plugin cannot break `import modiff_quant`).
"""

from __future__ import annotations

import difflib
import warnings
from collections.abc import Callable
from importlib.metadata import entry_points
from typing import Generic, TypeVar

from .quoting import shown

T = TypeVar("T")


class UnknownNameError(KeyError):
    """A registry lookup named nothing registered; the message lists the nearest names."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


def nearest(name: str, candidates: list[str], limit: int = 3) -> list[str]:
    """Closest spellings of `name` among `candidates`, best first."""
    return difflib.get_close_matches(name, candidates, n=limit, cutoff=0.5)


def did_you_mean(name: str, candidates: list[str]) -> str:
    close = nearest(name, candidates)
    return f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""


class Registry(Generic[T]):
    """Registered objects of one kind, extended by the entry points of `group`."""

    def __init__(self, kind: str, group: str) -> None:
        self.kind = kind
        self.group = group
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator: register the decorated object under `name`."""

        def decorate(obj: T) -> T:
            self.add(name, obj)
            return obj

        return decorate

    def add(self, name: str, obj: T) -> None:
        known = self._items.get(name)
        if known is not None and known is not obj:
            raise ValueError(f"{self.kind} {name!r} is already registered as {known!r}")
        target = f"{getattr(obj, '__module__', '')}:{getattr(obj, '__qualname__', '')}"
        for ep in entry_points(group=self.group, name=name):
            if known is None and ep.value != target:
                raise ValueError(
                    f"{self.kind} name {name!r} belongs to the plugin {ep.value} (entry point group {self.group})"
                )
        self._items[name] = obj

    def get(self, name: str) -> T:
        if name not in self._items:
            self._load_plugin(name)
        if name not in self._items:
            suggestion = did_you_mean(name, self.names())
            raise UnknownNameError(f"unknown {self.kind} {shown(name)}{suggestion} (known: {', '.join(self.names())})")
        return self._items[name]

    def __contains__(self, name: str) -> bool:
        try:
            self.get(name)
        except UnknownNameError:
            return False
        return True

    def names(self) -> list[str]:
        """Registered and plugin-provided names (plugins are listed without being imported)."""
        return sorted(set(self._items) | {ep.name for ep in entry_points(group=self.group)})

    def _load_plugin(self, name: str) -> None:
        for ep in entry_points(group=self.group, name=name):
            try:
                obj = ep.load()
            except Exception as exc:  # a third-party plugin may fail in any way; it must not break us
                warnings.warn(
                    f"modiff_quant: {self.kind} plugin {name!r} ({ep.value}) failed to load: {exc!r}",
                    RuntimeWarning,
                    stacklevel=3,
                )
                continue
            self.add(name, obj)
            return


SCHEMES: Registry[type] = Registry("scheme", "modiff_quant.schemes")
BASE_QUANTIZERS: Registry[type] = Registry("base quantizer", "modiff_quant.base_quantizers")
OBSERVERS: Registry[type] = Registry("observer", "modiff_quant.observers")


def register_scheme(name: str) -> Callable[[type], type]:
    """Class decorator: make a `Scheme` subclass available to recipes as `scheme: <name>`."""
    return SCHEMES.register(name)


def register_base_quantizer(name: str) -> Callable[[type], type]:
    """Class decorator: make a `BaseQuantizer` subclass available as `base_quantizer: <name>`."""
    return BASE_QUANTIZERS.register(name)


def register_observer(name: str) -> Callable[[type], type]:
    """Class decorator: make an `Observer` subclass available to calibrated base quantizers."""
    return OBSERVERS.register(name)
