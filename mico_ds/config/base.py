"""What every config section shares: documented fields (``_f``), nested sections, ``Literal`` checks."""

from __future__ import annotations

import dataclasses
import functools
import typing
from dataclasses import field
from typing import Any, Literal


def _f(default: Any, help: str) -> Any:
    """A dataclass field with a help string (mutable defaults via factory)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"help": help})
    return field(default=default, metadata={"help": help})


def _section(cls: type, help: str) -> Any:
    """A nested section, built with its own defaults."""
    return field(default_factory=cls, metadata={"help": help})


def literal_error(tp: Any, value: Any) -> str | None:
    """Why ``value`` is not allowed by a ``Literal[...]`` (or ``list[Literal[...]]``) type; None if it is."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        allowed = typing.get_args(tp)
        return None if value in allowed else f"unknown value {value!r}; allowed: {list(allowed)}"
    if origin is list and value is not None:
        (inner,) = typing.get_args(tp)
        if typing.get_origin(inner) is Literal:
            bad = [v for v in value if v not in typing.get_args(inner)]
            return f"unknown {bad}; allowed: {list(typing.get_args(inner))}" if bad else None
    return None


@functools.cache
def field_types(cls: type) -> dict[str, Any]:
    """The resolved annotations of a section (strings under ``from __future__ import annotations``)."""
    return typing.get_type_hints(cls)


class Section:
    """Base of every section: checks its ``Literal`` fields on construction."""

    def __post_init__(self) -> None:
        hints = field_types(type(self))
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            err = literal_error(hints[f.name], getattr(self, f.name))
            if err:
                raise ValueError(f"{type(self).__name__}.{f.name}: {err}")
