"""Checkpoints: DeepSpeed engine state + per-rank client state, committed by moving ``latest``.

Layout under ``<run_dir>/checkpoints``::

    step00000100/                DeepSpeed's files (ZeRO partitions, optimizer, scheduler)
    step00000100/client/rank0.pt per-rank client state: data stream position, RNG states
    step00000100/client/meta.json step, resolved config, world size, metric history (rank 0)
    latest                       name of the newest COMPLETE checkpoint (DeepSpeed's convention)
    step00000100_universal/      written by tools/to_universal.py: DeepSpeed's universal layout
                                 (zero/<param>/...), client/ copied, and mico_universal.json (marker)

``latest`` is rewritten (temp file + rename) only after every rank has finished writing, so a crash
in the middle of a save leaves the previous checkpoint as ``latest``.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mico_ds import distributed as mdist

log = logging.getLogger("mico_ds")
TAG_RE = re.compile(r"^step(\d{8})$")
# Written into a tag dir by tools/to_universal.py: load it with DeepSpeed's checkpoint.load_universal.
UNIVERSAL_MARKER = "mico_universal.json"


def tag_for(step: int) -> str:
    return f"step{step:08d}"


def read_latest(ckpt_dir: Path) -> str | None:
    f = ckpt_dir / "latest"
    return f.read_text().strip() if f.exists() else None


def write_latest(ckpt_dir: Path, tag: str) -> None:
    tmp = ckpt_dir / f".latest.{os.getpid()}.tmp"
    tmp.write_text(tag)
    os.replace(tmp, ckpt_dir / "latest")


def rng_state() -> dict[str, Any]:
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def set_rng_state(s: dict[str, Any]) -> None:
    random.setstate(s["python"])
    np.random.set_state(s["numpy"])
    torch.set_rng_state(s["torch"])
    if s.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def list_tags(ckpt_dir: Path) -> list[str]:
    return sorted(p.name for p in ckpt_dir.iterdir() if p.is_dir() and TAG_RE.match(p.name))


def select_to_delete(tags: list[str], latest: str | None, keep_last: int, keep_every: int) -> list[str]:
    """Tags retention removes: all but the newest ``keep_last`` and multiples of ``keep_every``.

    ``latest`` is never removed, nor anything newer than it (a save in progress).
    """
    if latest is None:
        return []
    done = [t for t in tags if t <= latest]
    keep = set(done[-keep_last:]) if keep_last > 0 else set()
    keep.add(latest)
    if keep_every > 0:
        keep |= {t for t in done if int(TAG_RE.match(t).group(1)) % keep_every == 0}
    return [t for t in done if t not in keep]


def save(
    engine: Any,
    ckpt_dir: Path,
    step: int,
    client: dict[str, Any],
    meta: dict[str, Any],
    keep_last: int,
    keep_every: int,
) -> Path:
    """Save on every rank; ``latest`` moves after all ranks are done. Returns the checkpoint dir."""
    tag = tag_for(step)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state={"step": step}, save_latest=False)
    cdir = ckpt_dir / tag / "client"
    cdir.mkdir(parents=True, exist_ok=True)
    rank = mdist.get_rank()
    tmp = cdir / f".rank{rank}.pt.tmp"
    torch.save({**client, "rng": rng_state(), "step": step}, tmp)
    os.replace(tmp, cdir / f"rank{rank}.pt")
    if rank == 0:
        tmpj = cdir / ".meta.json.tmp"
        tmpj.write_text(json.dumps({**meta, "step": step, "world_size": mdist.get_world_size()}, indent=1))
        os.replace(tmpj, cdir / "meta.json")
    mdist.barrier()  # every rank's partition and client file is on disk
    if rank == 0:
        write_latest(ckpt_dir, tag)
        for old in select_to_delete(list_tags(ckpt_dir), tag, keep_last, keep_every):
            shutil.rmtree(ckpt_dir / old, ignore_errors=True)
    mdist.barrier()
    return ckpt_dir / tag


def resolve_tag(ckpt_dir: Path, resume: str) -> str:
    """``latest`` -> the committed tag; otherwise the tag itself, validated."""
    if resume == "latest":
        tag = read_latest(ckpt_dir)
        if tag is None:
            raise ValueError(f"--resume latest: no {ckpt_dir / 'latest'} (no complete checkpoint yet)")
        return tag
    if not (ckpt_dir / resume).is_dir():
        have = list_tags(ckpt_dir) if ckpt_dir.exists() else []
        raise ValueError(f"--resume {resume}: no checkpoint {ckpt_dir / resume}; available: {have}")
    return resume


def load_meta(ckpt_dir: Path, tag: str) -> dict[str, Any]:
    f = ckpt_dir / tag / "client" / "meta.json"
    if not f.exists():
        raise ValueError(f"{f} is missing: {tag} is not a complete mico_ds checkpoint")
    return json.loads(f.read_text())


def load_client(ckpt_dir: Path, tag: str, rank: int) -> dict[str, Any] | None:
    f = ckpt_dir / tag / "client" / f"rank{rank}.pt"
    return torch.load(f, weights_only=False) if f.exists() else None


def is_universal(tag_dir: Path) -> bool:
    """A universal checkpoint written by ``tools/to_universal.py`` (its marker file is there)."""
    return (Path(tag_dir) / UNIVERSAL_MARKER).is_file()


def is_partitioned(tag_dir: Path) -> bool:
    """True when the optimizer state is split per rank (ZeRO >= 1, or DeepSpeed's bf16 optimizer): such a
    checkpoint loads only on the world size that wrote it, unless converted to a universal one."""
    return any(Path(tag_dir).glob("*_optim_states.pt")) and not is_universal(tag_dir)


def load_data_states(ckpt_dir: Path, tag: str, world_size: int) -> list[dict[str, Any]]:
    """Every rank's data-stream state of a checkpoint written by ``world_size`` ranks."""
    states = []
    for r in range(world_size):
        c = load_client(ckpt_dir, tag, r)
        if c is None:
            raise ValueError(f"{ckpt_dir / tag / 'client'} lacks rank{r}.pt ({world_size} ranks wrote it)")
        states.append(c["data"])
    return states


def merge_data_states(states: list[dict[str, Any]], rank: int) -> dict[str, Any]:
    """One data state for a rank of a NEW world size from all ranks' states of the old one.

    Each stream state (a ``CorpusLoader``'s: it has ``positions``) gets the positions of every old
    stream, so the loader's other-topology rule ("start every stream at the epoch after the furthest
    one recorded") sees the furthest epoch of ALL old ranks, not only of the old rank with the same
    index. Skip counters are old rank ``rank``'s (zero for a new rank). Everything else (schedule step,
    versions, names) is the same on every rank and is taken from rank 0.
    """

    def merge(parts: list[Any]) -> Any:
        first = parts[0]
        if not isinstance(first, dict):
            return first
        if "positions" in first:
            out = dict(first)
            out["positions"] = [p for s in parts for p in s["positions"]]
            own = parts[rank] if rank < len(parts) else None
            out["stats"] = own["stats"] if own is not None else {"seen": 0, "skipped": {}, "examples": {}}
            return out
        return {k: merge([s[k] for s in parts]) if isinstance(v, dict) else v for k, v in first.items()}

    return merge(states)
