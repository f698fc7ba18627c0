"""Package data: the recipes and the DeepSpeed JSONs shipped inside ``mico_ds``.

Read through ``importlib.resources``, so the same code works from a checkout, an editable install
and a wheel (``pip install .``) run from any directory.
"""

from __future__ import annotations

from importlib.resources import files
from importlib.resources.abc import Traversable
from pathlib import Path

RECIPES = "recipes"
DS_CONFIGS = "ds_configs"


def package_dir(name: str) -> Traversable:
    """``mico_ds/<name>`` as a resource directory."""
    return files("mico_ds") / name


def names(kind: str, suffix: str) -> list[str]:
    """File names (without ``suffix``) directly inside ``mico_ds/<kind>``, sorted."""
    return sorted(
        p.name[: -len(suffix)] for p in package_dir(kind).iterdir() if p.is_file() and p.name.endswith(suffix)
    )


def find(kind: str, name_or_path: str, suffix: str, what: str) -> Traversable | Path:
    """A file given by path, or by name (with or without ``suffix``) inside ``mico_ds/<kind>``.

    Raises:
        ValueError: naming what was asked for and every name that exists.
    """
    p = Path(name_or_path)
    if p.suffix and p.is_file():
        return p
    stem = name_or_path[: -len(suffix)] if name_or_path.endswith(suffix) else name_or_path
    q = package_dir(kind) / f"{stem}{suffix}"
    if q.is_file():
        return q
    raise ValueError(f"{what} {name_or_path!r} not found (not a file, not one of {names(kind, suffix)})")
