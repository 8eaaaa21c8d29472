"""Values read from files, quoted in error messages within bounds.

A recipe, checkpoint or baselines file may come from a stranger: a value in it may be huge (a
YAML alias bomb stands for millions of items, an integer for thousands of digits), and an error
message that quotes it must stay short and cheap to make.
"""

from __future__ import annotations

import reprlib


class _Bounded(reprlib.Repr):
    """reprlib for values read from files: dict and list subclasses (a recipe's located mappings)
    are shown like dicts and lists, because reprlib would call their full `repr` first."""

    def __init__(self) -> None:
        super().__init__()
        self.maxlevel, self.maxdict, self.maxlist, self.maxtuple, self.maxset, self.maxfrozenset = 3, 4, 6, 6, 6, 6
        self.maxstring = self.maxother = 80

    def repr1(self, x: object, level: int) -> str:
        if isinstance(x, dict):
            return self.repr_dict(x, level)
        if isinstance(x, list):
            return self.repr_list(x, level)
        if isinstance(x, int) and x.bit_length() > 256:  # repr of a huge int is slow, or an error past 4300 digits
            return f"<{x.bit_length()}-bit integer>"
        return super().repr1(x, level)


_BOUNDED = _Bounded()


def shown(value: object, limit: int = 80) -> str:
    """`repr(value)` of at most `limit` characters, in time bounded whatever the value: a value read
    from a file may be huge (a YAML alias bomb expands to millions of items) and is shown in errors."""
    return clip(_BOUNDED.repr(value), limit)


def clip(text: str, limit: int = 80) -> str:
    """`text`, cut to `limit` characters with `...` when longer."""
    return text if len(text) <= limit else f"{text[: limit - 3]}..."


def excerpt(value: object, limit: int = 160) -> str:
    """A string as it is, anything else as its bounded repr, cut to `limit` characters."""
    return clip(value, limit) if isinstance(value, str) else shown(value, limit)


def first_few(names: list[str], limit: int = 3) -> str:
    """The first `limit` names, and ', ...' when there are more: a long list named in one line."""
    more = ", ..." if len(names) > limit else ""
    return ", ".join(names[:limit]) + more
