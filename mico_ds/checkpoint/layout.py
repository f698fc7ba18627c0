"""Where checkpoints live and how they are named: run directories, tags, ``latest``, the one locator
and the one run-config reader.

Layout under ``<run_dir>/checkpoints``::

    step00000100/                 DeepSpeed's files (ZeRO partitions, optimizer, scheduler)
    step00000100/client/rankR.pt  per-rank client state: data stream positions, RNG states
    step00000100/mico_manifest.json
                                  every file of the checkpoint with its size and CRC-32, recorded
                                  while it was written (rank 0, in the commit step, before meta.json);
                                  checked before the checkpoint is used (mico_ds.checkpoint.manifest)
    step00000100/client/meta.json step, resolved config, world size, metric history (rank 0);
                                  written last: a directory with meta.json is complete
    latest                        name of the newest COMPLETE checkpoint (DeepSpeed's convention)
    step00000100_universal/       written by tools/to_universal.py: DeepSpeed's universal layout
                                  (zero/<param>/...), client/ copied, and mico_universal.json (marker)

This module reads files only (``torch.load`` of optimizer headers included); it imports neither
DeepSpeed nor ``torch.distributed``.
"""

from __future__ import annotations

import glob
import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from mico_ds.checkpoint import safe_load

TAG_RE = re.compile(r"^step(\d{8})$")
CHECKPOINTS = "checkpoints"
CONFIG_FILE = "config.yaml"
CLIENT_DIR = "client"
META_FILE = "meta.json"
# Written into a tag dir by tools/to_universal.py: load it with DeepSpeed's checkpoint.load_universal.
UNIVERSAL_MARKER = "mico_universal.json"
# Sizes and checksums of a checkpoint's files (mico_ds.checkpoint.manifest); not in client/, which
# tools/to_universal.py copies into a checkpoint with other files.
MANIFEST_FILE = "mico_manifest.json"
MODEL_STATES = "*_model_states.pt"
OPTIM_STATES = "*_optim_states.pt"
STATE_DICT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
STATE_DICT_DIR_FILES = (
    "model.safetensors.index.json", "model.safetensors", "pytorch_model.bin.index.json", "pytorch_model.bin",
)  # fmt: skip


def tag_for(step: int) -> str:
    return f"step{step:08d}"


def step_of(tag: str) -> int | None:
    m = TAG_RE.match(tag)
    return int(m.group(1)) if m else None


def read_latest(ckpt_dir: Path) -> str | None:
    f = Path(ckpt_dir) / "latest"
    return f.read_text().strip() if f.exists() else None


def write_latest(ckpt_dir: Path, tag: str) -> None:
    """Point ``latest`` at ``tag`` atomically (temporary file, then rename)."""
    tmp = Path(ckpt_dir) / f".latest.{os.getpid()}.tmp"
    try:
        tmp.write_text(tag)
        os.replace(tmp, Path(ckpt_dir) / "latest")
    finally:
        tmp.unlink(missing_ok=True)  # left only by a failed write (a full disk)


BEST_FILE = "best.json"  # checkpoint.keep_best: {"tag", "step", "metric", "value"}


def read_best(ckpt_dir: Path) -> dict[str, Any] | None:
    """The best checkpoint's record (``checkpoint.keep_best``), or None."""
    f = Path(ckpt_dir) / BEST_FILE
    try:
        return json.loads(f.read_text()) if f.exists() else None
    except json.JSONDecodeError as e:
        raise ValueError(f"{f} is not JSON ({e}): remove it to forget the best checkpoint") from None


def write_best(ckpt_dir: Path, record: dict[str, Any]) -> None:
    """Name the best checkpoint atomically (temporary file, then rename)."""
    tmp = Path(ckpt_dir) / f".{BEST_FILE}.{os.getpid()}.tmp"
    try:
        tmp.write_text(json.dumps(record, indent=1))
        os.replace(tmp, Path(ckpt_dir) / BEST_FILE)
    finally:
        tmp.unlink(missing_ok=True)


def is_tag_dir(p: Path) -> bool:
    """A checkpoint directory: DeepSpeed's model states, or mico_ds' client state, are in it."""
    return p.is_dir() and (bool(glob.glob(str(p / MODEL_STATES))) or (p / CLIENT_DIR).is_dir())


def list_tags(ckpt_dir: Path) -> list[str]:
    """Every checkpoint under ``ckpt_dir`` (regular and universal), sorted by name."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return []
    return sorted(p.name for p in ckpt_dir.iterdir() if is_tag_dir(p))


def select_to_delete(
    tags: list[str], latest: str | None, keep_last: int, keep_every: int, protect: Sequence[str] = ()
) -> list[str]:
    """Regular tags retention removes: all but the newest ``keep_last`` and multiples of ``keep_every``.

    ``latest`` is never removed, nor anything newer than it (a save in progress), nor a universal
    checkpoint (its name is not ``stepNNNNNNNN``), nor a tag of ``protect`` (the best checkpoint).
    """
    if latest is None:
        return []
    done = [t for t in tags if TAG_RE.match(t) and t <= latest]
    keep = set(done[-keep_last:]) if keep_last > 0 else set()
    keep.add(latest)
    keep |= set(protect)
    if keep_every > 0:
        keep |= {t for t in done if step_of(t) % keep_every == 0}  # type: ignore[operator]
    return [t for t in done if t not in keep]


def load_meta(ckpt_dir: Path, tag: str) -> dict[str, Any]:
    """A checkpoint's ``client/meta.json`` (step, config, world size, history)."""
    f = Path(ckpt_dir) / tag / CLIENT_DIR / META_FILE
    if not f.exists():
        raise ValueError(f"{f} is missing: {tag} is not a complete mico_ds checkpoint")
    return json.loads(f.read_text())


def is_universal(tag_dir: Path) -> bool:
    """A universal checkpoint written by ``tools/to_universal.py`` (its marker file is there)."""
    return (Path(tag_dir) / UNIVERSAL_MARKER).is_file()


def is_partitioned(tag_dir: Path) -> bool:
    """True when the optimizer state is split per rank (ZeRO >= 1, or DeepSpeed's bf16 optimizer): such a
    checkpoint loads only on the world size that wrote it, unless converted to a universal one."""
    return any(Path(tag_dir).glob(OPTIM_STATES)) and not is_universal(tag_dir)


def describe(tag_dir: Path) -> dict[str, Any]:
    """``{"zero_stage", "world_size", "universal"}`` of a checkpoint directory, from its files."""
    tag_dir = Path(tag_dir)
    if is_universal(tag_dir):
        info = json.loads((tag_dir / UNIVERSAL_MARKER).read_text())
        return {"zero_stage": info["zero_stage"], "world_size": info["source_world_size"], "universal": True}
    optim = sorted(glob.glob(str(tag_dir / OPTIM_STATES)))
    if not optim:  # ZeRO-0: one file with the module and the (unpartitioned) optimizer
        meta = tag_dir / CLIENT_DIR / META_FILE
        world = json.loads(meta.read_text()).get("world_size") if meta.is_file() else None
        return {"zero_stage": 0, "world_size": world, "universal": False}
    sd = safe_load.load(optim[0], map_location="cpu", mmap=True)
    stage = sd.get("optimizer_state_dict", {}).get("zero_stage")
    if stage is None:
        raise ValueError(f"{optim[0]}: its optimizer state has no zero_stage: not a ZeRO checkpoint")
    return {"zero_stage": int(stage), "world_size": len(optim), "universal": False}


# ----------------------------------------------------------------------------- the locator


@dataclass(frozen=True)
class Location:
    """What an operator pointed at, resolved.

    ``kind="zero"``: a DeepSpeed checkpoint; ``path`` is its checkpoints directory and ``tag`` the
    checkpoint in it. ``kind="state_dict"``: consolidated weights (a ``.safetensors``/``.bin``/``.pt``
    file, or a directory of them as ``tools/zero_to_fp32.py`` writes); ``tag`` is None.
    """

    kind: Literal["zero", "state_dict"]
    path: Path
    tag: str | None = None

    @property
    def tag_dir(self) -> Path:
        return self.path / self.tag if self.tag else self.path

    @property
    def run_dir(self) -> Path | None:
        return self.path.parent if self.kind == "zero" else None


def _is_state_dict(p: Path) -> bool:
    if p.is_file():
        return p.name.endswith(STATE_DICT_SUFFIXES)
    return p.is_dir() and any((p / f).is_file() for f in STATE_DICT_DIR_FILES)


def locate(
    path: str | Path, tag: str | None = None, *, state_dicts: bool = False, flag: str = "--tag"
) -> Location:
    """Resolve a run directory, its ``checkpoints/`` directory, one checkpoint directory (or, with
    ``state_dicts``, consolidated weights) and a tag (None / ``latest``: the committed one).

    Raises:
        ValueError: the path is missing, ``latest`` is missing, or the tag is unknown; the message
            lists the tags that exist. ``flag`` names the option that gives a tag in the message.
    """
    p = Path(path)
    kinds = "a run dir, its checkpoints/ dir or a checkpoint dir" + (
        " or a state-dict file" if state_dicts else ""
    )
    if not p.exists():
        raise ValueError(f"{p}: no such directory (give {kinds})")
    if state_dicts and _is_state_dict(p) and not (p / CHECKPOINTS).is_dir():
        return Location("state_dict", p)
    if p.is_file():
        raise ValueError(f"{p} is a file; give {kinds}")
    if (p / CHECKPOINTS).is_dir():
        p = p / CHECKPOINTS
    elif is_tag_dir(p):
        if tag not in (None, "latest", p.name):
            raise ValueError(f"{p} is the checkpoint {p.name!r} itself; {flag} {tag} names another one")
        return Location("zero", p.parent, p.name)
    have = list_tags(p)
    if tag in (None, "latest"):
        t = read_latest(p)
        if t is None:
            raise ValueError(
                f"{p / 'latest'} does not exist (no checkpoint was committed there); "
                f"pass {flag}, one of: {have or 'none found'}"
            )
        tag = t
    if tag not in have:
        raise ValueError(f"no checkpoint {tag!r} in {p}; available tags: {have or 'none found'}")
    return Location("zero", p, tag)


def run_config_file(loc: Location, config: str | Path | None = None) -> Path:
    """The resolved config a checkpoint was written with: ``config`` when given, else the run's
    ``config.yaml``, else the checkpoint's own ``client/meta.json`` (a state dict: a ``config.yaml``
    beside it or one directory up).

    Raises:
        ValueError: naming every place looked at.
    """
    if config is not None:
        return Path(config)
    if loc.kind == "zero":
        candidates = [loc.path.parent / CONFIG_FILE, loc.tag_dir / CLIENT_DIR / META_FILE]
    else:
        base = loc.path if loc.path.is_dir() else loc.path.parent
        candidates = [base / CONFIG_FILE, base.parent / CONFIG_FILE]
    for c in candidates:
        if c.is_file():
            return c
    raise ValueError(
        f"no run configuration for {loc.tag_dir} (looked for {[str(c) for c in candidates]}); pass --config"
    )


def read_run_config(loc: Location, config: str | Path | None = None, overrides: list[str] | None = None):
    """The :class:`~mico_ds.config.RunConfig` of a checkpoint (see :func:`run_config_file`), with
    dotted overrides."""
    from mico_ds.config import load_config_file

    return load_config_file(run_config_file(loc, config), overrides)
