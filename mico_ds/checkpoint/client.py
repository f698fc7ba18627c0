"""mico_ds' own part of a checkpoint ("client state"): RNG states and data-stream positions per rank,
and the merge of every old rank's data state when the world size changes."""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mico_ds.checkpoint import safe_load
from mico_ds.checkpoint.layout import CLIENT_DIR


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


def client_file(ckpt_dir: Path, tag: str, rank: int) -> Path:
    return Path(ckpt_dir) / tag / CLIENT_DIR / f"rank{rank}.pt"


def load_client(ckpt_dir: Path, tag: str, rank: int) -> dict[str, Any] | None:
    """One rank's client state, or None when the checkpoint has no file for that rank."""
    f = client_file(ckpt_dir, tag, rank)
    return safe_load.load(f) if f.exists() else None


def load_data_states(ckpt_dir: Path, tag: str, world_size: int) -> list[dict[str, Any]]:
    """Every rank's data-stream state of a checkpoint written by ``world_size`` ranks."""
    states = []
    for r in range(world_size):
        c = load_client(ckpt_dir, tag, r)
        if c is None:
            raise ValueError(
                f"{Path(ckpt_dir) / tag / CLIENT_DIR} lacks rank{r}.pt ({world_size} ranks wrote it)"
            )
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
