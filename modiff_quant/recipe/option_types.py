"""Base-quantizer options from a recipe, checked against the constructor's type annotations.

A recipe builds each base quantizer once at load, but a constructor may keep a wrong value
(`seed: x`) and fail only at calibration, minutes later; the annotations say what each option
takes, so a value that does not fit is an error at the recipe line instead.
"""

from __future__ import annotations

import math
import re
import types
import typing
from collections.abc import Mapping, Sequence
from functools import cache
from typing import Any

from ..quoting import shown


def option_problem(constructor: type, option: str, value: Any) -> str | None:
    """What is wrong with `value` for the constructor's parameter `option`, or None when it fits
    (or the parameter has no annotation this can check)."""
    hint = _option_hints(constructor).get(option)
    if hint is None or _conforms(value, hint):
        return None
    return f"expected {_type_name(hint)}, got {shown(value)}{_why_not(value, hint)}"


@cache
def _option_hints(quantizer: type) -> dict[str, Any]:
    """The resolved annotations of the constructor's parameters; none when they cannot be resolved
    (e.g. a plugin's names imported only for type checkers), so that those options go unchecked."""
    try:
        return typing.get_type_hints(quantizer.__init__)
    except (NameError, TypeError, AttributeError):
        return {}


def _conforms(value: Any, hint: Any) -> bool:
    """True when a recipe value fits an annotation: int, float (an int too; never NaN), bool, str,
    None, Literal, unions, Any, mappings and sequences (items checked), or else any class (isinstance)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any or isinstance(hint, typing.TypeVar):
        return True
    if hint is None or hint is type(None):
        return value is None
    if origin in (typing.Union, types.UnionType):
        return any(_conforms(value, arg) for arg in args)
    if origin is typing.Literal:
        return any(type(value) is type(arg) and value == arg for arg in args)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return (
            isinstance(value, (int, float))
            and not isinstance(value, bool)
            and not (isinstance(value, float) and math.isnan(value))
        )
    kind = origin or hint
    if not isinstance(kind, type):
        return True  # a typing construct without a runtime check (e.g. a ParamSpec)
    if issubclass(kind, Mapping):
        return isinstance(value, Mapping) and (
            len(args) != 2 or all(_conforms(k, args[0]) and _conforms(v, args[1]) for k, v in value.items())
        )
    if issubclass(kind, Sequence) and not issubclass(kind, (str, bytes)):
        if not isinstance(value, list if kind is list else (list, tuple)):
            return False
        if kind is tuple and args and args[-1] is not Ellipsis:
            return len(value) == len(args) and all(_conforms(v, arg) for v, arg in zip(value, args))
        return not args or all(_conforms(v, args[0]) for v in value)
    return isinstance(value, kind)


def _type_name(hint: Any) -> str:
    if hint is type(None):
        return "None"
    if typing.get_origin(hint) is typing.Literal:
        return f"one of {', '.join(map(repr, typing.get_args(hint)))}"
    if isinstance(hint, type) and not typing.get_args(hint):
        return hint.__name__
    return str(hint).replace("typing.", "").replace("collections.abc.", "").replace("NoneType", "None")


_EXPONENT_TEXT = re.compile(r"[-+]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)[eE][-+]?[0-9]+")
"""Exponent notation that YAML 1.1 reads as a string unless it has a dot and a signed exponent (`1e-3`, `1.0e3`)."""


def _why_not(value: Any, hint: Any) -> str:
    """The reason a value that looks right is refused, where there is a common one."""
    if isinstance(value, str) and len(value) <= 40 and _EXPONENT_TEXT.fullmatch(value) and _conforms(1.0, hint):
        number = repr(float(value))
        if "e" in number and "." not in number:  # 1e-05 -> 1.0e-05, as PyYAML writes floats
            number = number.replace("e", ".0e", 1)
        return (
            " (text: YAML 1.1 reads exponent notation as a number only with a dot and a signed exponent; "
            f"write {number})"
        )
    if isinstance(value, float) and math.isnan(value):
        return " (NaN is never a valid option)"
    return ""
