"""Loading a run configuration: YAML recipes with shared fragments, dotted overrides, strict building.

A recipe is a YAML file in ``mico_ds/recipes/`` (or any path) whose top-level keys are the sections of
:class:`~mico_ds.config.sections.RunConfig`. It may name shared fragments (model flavours, corpus
mixtures) under ``include:``; they are merged first, in order, and the recipe's own keys win::

    include: [models/llama2_7b.yaml, corpora/mico_b2.yaml]

Mappings merge key by key; any other value (a list of corpora included) is replaced whole. Include
paths are looked up next to the including file, then in ``mico_ds/recipes/``. Every error names the
file, the dotted key, the value and what is allowed.

    cfg = load_config("demo", overrides=["optim.lr=3e-4", "train.max_steps=100"])
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any

import yaml

from mico_ds import resources
from mico_ds.config.base import field_types, literal_error
from mico_ds.config.sections import RunConfig

INCLUDE_KEY = "include"


def find_recipe(name_or_path: str) -> Traversable | Path:
    """A recipe by YAML path or by name in ``mico_ds/recipes/``."""
    return resources.find(resources.RECIPES, name_or_path, ".yaml", "recipe")


def list_recipes() -> list[str]:
    """The recipes shipped in ``mico_ds/recipes/`` (fragments in its subdirectories excluded)."""
    return resources.names(resources.RECIPES, ".yaml")


# ----------------------------------------------------------------------------- building


def _build(tp: Any, value: Any, where: str) -> Any:
    """Construct ``tp`` from plain YAML data, strictly (unknown keys and disallowed choices raise)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _build(args[0], value, where)
    if origin is typing.Literal:
        err = literal_error(tp, value)
        if err:
            raise ValueError(f"{where}: {err}")
        return value
    if dataclasses.is_dataclass(tp):
        if value is None:
            return tp()
        if not isinstance(value, dict):
            raise ValueError(f"{where}: expected a mapping, got {value!r}")
        hints = field_types(tp)
        names = [f.name for f in dataclasses.fields(tp)]
        unknown = sorted(set(value) - set(names))
        if unknown:
            raise ValueError(
                f"{where or 'top level'}: unknown key(s) {unknown}; "
                f"valid keys of {tp.__name__}: {sorted(names)}"
            )
        kwargs = {k: _build(hints[k], v, f"{where}.{k}" if where else k) for k, v in value.items()}
        try:
            return tp(**kwargs)
        except ValueError as e:
            raise ValueError(f"{where}: {e}" if where else str(e)) from None
    if origin is list:
        (inner,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ValueError(f"{where}: expected a list, got {value!r}")
        return [_build(inner, v, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ValueError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is float and not isinstance(value, bool):
        try:  # YAML 1.1 reads "3e-4" (no dot) as a string: the field's type decides
            return float(value)
        except (TypeError, ValueError):
            raise ValueError(f"{where}: expected a number, got {value!r}") from None
    if tp is Any:
        return value
    if tp in (int, str, bool) and not isinstance(value, tp):
        raise ValueError(f"{where}: expected {tp.__name__}, got {value!r}")
    return value


def config_from_dict(raw: dict) -> RunConfig:
    """Rebuild a RunConfig from its plain form (e.g. a run directory's config.yaml)."""
    return _build(RunConfig, raw, "")


# ----------------------------------------------------------------------------- recipe files


def _merge(base: dict, top: dict) -> dict:
    """``top`` over ``base``: mappings merge key by key, everything else is replaced."""
    out = dict(base)
    for k, v in top.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _locate_include(name: str, parent: Traversable | Path) -> Traversable | Path:
    candidates: list[Traversable | Path] = []
    if isinstance(parent, Path):
        candidates.append(parent.parent / name)
    candidates.append(resources.package_dir(resources.RECIPES).joinpath(*name.split("/")))
    for c in candidates:
        if c.is_file():
            return c
    raise ValueError(f"{parent}: include {name!r} not found (looked in {[str(c) for c in candidates]})")


def read_recipe(path: Traversable | Path, _chain: tuple[str, ...] = ()) -> dict:
    """A recipe file as plain data, its ``include:`` fragments merged underneath."""
    if str(path) in _chain:
        raise ValueError(f"{path}: include cycle {' -> '.join([*_chain, str(path)])}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: a recipe must be a mapping of sections, got {type(raw).__name__}")
    includes = raw.pop(INCLUDE_KEY, None) or []
    if isinstance(includes, str):
        includes = [includes]
    if not isinstance(includes, list) or not all(isinstance(i, str) for i in includes):
        raise ValueError(f"{path}: {INCLUDE_KEY} must be a list of YAML paths, got {includes!r}")
    merged: dict = {}
    for name in includes:
        merged = _merge(merged, read_recipe(_locate_include(name, path), (*_chain, str(path))))
    return _merge(merged, raw)


# ----------------------------------------------------------------------------- overrides


def set_dotted(d: dict, dotted: str, value: Any) -> None:
    """Set ``a.b.c`` in nested dicts; an integer part indexes a list (``data.corpora.0.weight``)."""
    parts = dotted.split(".")
    cur: Any = d
    for i, p in enumerate(parts):
        last = i == len(parts) - 1
        if isinstance(cur, list):
            if not p.isdigit() or int(p) >= len(cur):
                raise ValueError(
                    f"override {dotted}: {'.'.join(parts[:i])} is a list of {len(cur)}, "
                    f"{p!r} is not an index into it"
                )
            if last:
                cur[int(p)] = value
                return
            cur = cur[int(p)]
            continue
        if last:
            cur[p] = value
            return
        if cur.get(p) is None:
            cur[p] = {}
        if not isinstance(cur[p], (dict, list)):
            raise ValueError(f"override {dotted}: {p} is not a section")
        cur = cur[p]


def parse_override(text: str) -> tuple[str, Any]:
    """``"optim.lr=3e-4"`` or ``"--optim.lr=3e-4"`` -> ("optim.lr", 3e-4) (value parsed as YAML)."""
    text = text[2:] if text.startswith("--") else text
    if "=" not in text:
        raise ValueError(f"override {text!r} must look like section.key=value")
    key, raw = text.split("=", 1)
    return key, (yaml.safe_load(raw) if raw != "" else "")


def apply_overrides(raw: dict, overrides: list[str] | None) -> dict:
    """``raw`` with every dotted override set (in place; returned for chaining)."""
    for ov in overrides or []:
        k, v = parse_override(ov)
        set_dotted(raw, k, v)
    return raw


def parse_args_and_overrides(p: argparse.ArgumentParser, argv: list[str]) -> tuple[Any, list[str]]:
    """``p.parse_known_args(argv)`` where everything left over must be a ``--section.key=value``
    override; anything else is an argparse error."""
    args, rest = p.parse_known_args(argv)
    bad = [a for a in rest if not a.startswith("--") or "=" not in a]
    if bad:
        p.error(f"unrecognized arguments {bad}; config overrides look like --section.key=value")
    return args, rest


def load_config(recipe: str, overrides: list[str] | None = None) -> RunConfig:
    """Load a recipe (name or path) with its includes, apply dotted overrides, validate strictly."""
    path = find_recipe(recipe)
    raw = apply_overrides(read_recipe(path), overrides)
    try:
        return config_from_dict(raw)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None


def load_config_file(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    """A resolved config saved by a run (``config.yaml``, or the ``config`` of a checkpoint's
    ``meta.json``), with dotted overrides."""
    import json

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"config {path} not found")
    text = path.read_text()
    raw = json.loads(text)["config"] if path.suffix == ".json" else yaml.safe_load(text)
    raw = apply_overrides(raw, overrides)
    try:
        return config_from_dict(raw)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None


def help_text(tp: Any = RunConfig, prefix: str = "") -> str:
    """Every configurable key with its type, default and help line."""
    lines = []
    hints = field_types(tp)
    for f in dataclasses.fields(tp):
        ftp = hints[f.name]
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(ftp):
            lines.append(f"[{key}] {f.metadata.get('help', '')}")
            lines.append(help_text(ftp, key + "."))
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        shown = getattr(ftp, "__name__", None) if typing.get_origin(ftp) is None else None
        lines.append(f"  --{key}={default!r}  ({shown or ftp}) {f.metadata.get('help', '')}")
    return "\n".join(lines)
