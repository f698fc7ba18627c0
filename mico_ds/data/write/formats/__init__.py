"""Corpus formats of ``tools/make_shards.py --format F``: the published annotation layouts of corpora.

Each format is a module of this package defining ``FORMAT = Format(...)`` (see ``common``); a new
format is a new file, found here by name. The driver (``mico_ds.data.write.ingest``) does the rest:
worker processes, shards, the skip report and restarts.
"""

from __future__ import annotations

import importlib
import pkgutil

from mico_ds.data.write.formats.common import Format

_NOT_FORMATS = {"common"}


def available() -> dict[str, Format]:
    """Every format of the package by name, sorted."""
    found: dict[str, Format] = {}
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if info.name in _NOT_FORMATS or info.name.startswith("_"):
            continue
        fmt = getattr(importlib.import_module(f"{__name__}.{info.name}"), "FORMAT", None)
        if isinstance(fmt, Format):
            found[fmt.name] = fmt
    return dict(sorted(found.items()))


def get(name: str) -> Format:
    """The format called ``name``; a ValueError lists the known ones."""
    formats = available()
    if name not in formats:
        raise ValueError(f"unknown --format {name!r}; known: {', '.join(formats)} (or manifest)")
    return formats[name]
