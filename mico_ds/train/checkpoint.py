"""Checkpoints: DeepSpeed engine state + per-rank client state, committed by moving ``latest``.

Layout under ``<run_dir>/checkpoints``::

    step00000100/                DeepSpeed's files (ZeRO partitions, optimizer, scheduler)
    step00000100/client/rank0.pt per-rank client state: data stream position, RNG states
    step00000100/client/meta.json step, resolved config, world size, metric history (rank 0)
    latest                       name of the newest COMPLETE checkpoint (DeepSpeed's convention)
    step00000100_universal/      written by tools/to_universal.py: DeepSpeed's universal layout
                                 (zero/<param>/...), client/ copied, and mico_universal.json (marker)

Commit order: every rank writes its DeepSpeed files and its client file; a barrier; rank 0 writes
``meta.json`` (so a directory with ``meta.json`` is complete) and then rewrites ``latest`` (temp file +
rename). A crash anywhere in a save leaves the previous checkpoint as ``latest``; the incomplete
directory is refused by ``--resume TAG`` and overwritten when the run reaches that step again.

Test hook: ``MICO_TEST_STALL_SAVE=STEP:RANK[:client]`` makes rank RANK stop in its save of step STEP
and wait there to be killed: in the middle of DeepSpeed's save, after its first file, or with
``:client`` after DeepSpeed's files and before its client state. It first creates
``<checkpoints>/.stalled-<tag>-rank<RANK>`` so a test knows when to kill.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import re
import shutil
import time
from collections.abc import Iterator
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


@contextlib.contextmanager
def rng_preserved() -> Iterator[None]:
    """Leave the global CPU RNGs (python, numpy, torch) as they were before the block.

    Around a data fetch: a DataLoader draws its workers' base seed from torch's global RNG whenever it
    starts them, which a resumed run does at another step than the uninterrupted one; the samples do not
    depend on it (the pipeline seeds its own generators), but everything after the fetch that draws from
    the global RNG (dropout, stochastic depth) would be shifted by one draw.
    """
    py, npy, pt = random.getstate(), np.random.get_state(), torch.get_rng_state()
    try:
        yield
    finally:
        random.setstate(py)
        np.random.set_state(npy)
        torch.set_rng_state(pt)


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
    rank = mdist.get_rank()
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    stall = _stall_requested(step, rank)
    if stall == "deepspeed":
        _stall_inside_deepspeed(engine, ckpt_dir, tag, rank)
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state={"step": step}, save_latest=False)
    if stall == "client":
        _stall(ckpt_dir, tag, rank, "DeepSpeed's files")
    cdir = ckpt_dir / tag / "client"
    cdir.mkdir(parents=True, exist_ok=True)
    tmp = cdir / f".rank{rank}.pt.tmp"
    torch.save({**client, "rng": rng_state(), "step": step}, tmp)
    os.replace(tmp, cdir / f"rank{rank}.pt")
    mdist.barrier()  # every rank's partition and client file is on disk
    if rank == 0:
        tmpj = cdir / ".meta.json.tmp"
        tmpj.write_text(json.dumps({**meta, "step": step, "world_size": mdist.get_world_size()}, indent=1))
        os.replace(tmpj, cdir / "meta.json")  # the directory is complete
        write_latest(ckpt_dir, tag)  # the run's newest checkpoint
        for old in select_to_delete(list_tags(ckpt_dir), tag, keep_last, keep_every):
            shutil.rmtree(ckpt_dir / old, ignore_errors=True)
    mdist.barrier()
    return ckpt_dir / tag


def _stall_requested(step: int, rank: int) -> str | None:
    """Test hook (see the module docstring): where this rank stalls in the save of ``step``, if at all."""
    parts = os.environ.get("MICO_TEST_STALL_SAVE", "").split(":")
    if parts[:2] != [str(step), str(rank)]:
        return None
    return parts[2] if len(parts) > 2 else "deepspeed"


def _stall(ckpt_dir: Path, tag: str, rank: int, written: str) -> None:
    (ckpt_dir / f".stalled-{tag}-rank{rank}").write_text(f"{os.getpid()} {written}\n")
    log.warning("MICO_TEST_STALL_SAVE: rank %d stalls in saving %s after writing %s", rank, tag, written)
    while True:  # until killed
        time.sleep(60)


def _stall_inside_deepspeed(engine: Any, ckpt_dir: Path, tag: str, rank: int) -> None:
    ce = engine.checkpoint_engine
    save_file = ce.save

    def save_then_stall(state_dict: Any, path: str) -> None:
        save_file(state_dict, path)
        _stall(ckpt_dir, tag, rank, path)

    ce.save = save_then_stall


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
