"""The one owner of a run's checkpoints: save (commit order, retention) and resume.

A checkpoint is DeepSpeed's engine state (ZeRO partitions, optimizer, scheduler) plus mico_ds' client
state per rank (data stream positions, RNG states) and ``meta.json`` (step, resolved config, world
size, metric history); the layout is in :mod:`mico_ds.checkpoint.layout`.

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

import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from mico_ds import distributed as mdist
from mico_ds.checkpoint import client
from mico_ds.checkpoint.layout import (
    CHECKPOINTS,
    CLIENT_DIR,
    META_FILE,
    is_partitioned,
    is_universal,
    list_tags,
    load_meta,
    locate,
    read_latest,
    select_to_delete,
    tag_for,
    write_latest,
)

log = logging.getLogger("mico_ds")

# Changing these between a checkpoint and its resume breaks sample-exact continuation.
EXACTNESS_KEYS = (
    "train.seed",
    "optim.grad_accum",
    "data.corpora",
    "data.num_workers",
    "data.shuffle_buffer",
    "data.shards_per_chunk",
)


class DataStreams(Protocol):
    """What the manager saves and restores of the training data (``MixtureLoader``)."""

    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict) -> None: ...
    def fast_forward(self, step: int) -> None: ...


@dataclass
class Resumed:
    """What a resume restored besides the engine and the data streams."""

    step: int
    history: list[dict[str, Any]] = field(default_factory=list)


def _get(d: dict, dotted: str) -> Any:
    for p in dotted.split("."):
        d = d[p]
    return d


class CheckpointManager:
    """Saves and resumes one run: ``<run_dir>/checkpoints``, every rank calling every method.

    Args:
        run_dir: the run directory.
        engine: the DeepSpeed engine (``save_checkpoint`` / ``load_checkpoint``).
        data: the training data streams.
        keep_last, keep_every: retention (``checkpoint.keep_last`` / ``keep_every``).
    """

    def __init__(
        self, run_dir: Path, engine: Any, data: DataStreams, keep_last: int, keep_every: int
    ) -> None:
        self.ckpt_dir = Path(run_dir) / CHECKPOINTS
        self.engine, self.data = engine, data
        self.keep_last, self.keep_every = keep_last, keep_every
        self.rank, self.world = mdist.get_rank(), mdist.get_world_size()

    def latest(self) -> str | None:
        return read_latest(self.ckpt_dir)

    # ------------------------------------------------------------------ save

    def save(self, step: int, meta: dict[str, Any]) -> Path:
        """Save on every rank; ``latest`` moves after all ranks are done. Returns the checkpoint dir."""
        tag, rank, ckpt_dir = tag_for(step), self.rank, self.ckpt_dir
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        stall = _stall_requested(step, rank)
        if stall == "deepspeed":
            _stall_inside_deepspeed(self.engine, ckpt_dir, tag, rank)
        self.engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state={"step": step}, save_latest=False)
        if stall == "client":
            _stall(ckpt_dir, tag, rank, "DeepSpeed's files")
        cfile = client.client_file(ckpt_dir, tag, rank)
        cfile.parent.mkdir(parents=True, exist_ok=True)
        tmp = cfile.with_name(f".{cfile.name}.tmp")
        torch.save({"data": self.data.state_dict(), "rng": client.rng_state(), "step": step}, tmp)
        os.replace(tmp, cfile)
        mdist.barrier()  # every rank's partition and client file is on disk
        if rank == 0:
            cdir = ckpt_dir / tag / CLIENT_DIR
            tmpj = cdir / f".{META_FILE}.tmp"
            tmpj.write_text(json.dumps({**meta, "step": step, "world_size": self.world}, indent=1))
            os.replace(tmpj, cdir / META_FILE)  # the directory is complete
            write_latest(ckpt_dir, tag)  # the run's newest checkpoint
            for old in select_to_delete(list_tags(ckpt_dir), tag, self.keep_last, self.keep_every):
                shutil.rmtree(ckpt_dir / old, ignore_errors=True)
        mdist.barrier()
        return ckpt_dir / tag

    # ------------------------------------------------------------------ resume

    def load(self, resume: str, config: dict[str, Any], allow_config_change: bool) -> Resumed:
        """Restore the engine, the data streams and the RNG states from ``resume`` (``latest`` or a tag).

        Args:
            config: the plain form of this run's (new) config, checked against the checkpoint's.
            allow_config_change: resume even when an exactness key or the world size changed.

        Raises:
            ValueError: an incomplete or unknown checkpoint, a change that breaks exactness (without
                ``allow_config_change``), or ZeRO partitions of another world size.
        """
        from mico_ds.distributed.zero_checkpoint import load_engine_checkpoint

        loc = locate(self.ckpt_dir, resume, flag="--resume")
        tag, tag_dir = loc.tag, loc.tag_dir
        assert tag is not None
        meta = load_meta(self.ckpt_dir, tag)
        self._check_compatible(meta, config, allow_config_change)
        old_world = int(meta["world_size"])
        if old_world != self.world and is_partitioned(tag_dir):
            raise ValueError(
                f"{tag_dir} holds ZeRO partitions of {old_world} ranks and cannot load on {self.world}: "
                f"convert it first with `python tools/to_universal.py {self.ckpt_dir} --tag {tag}`, then "
                f"resume with --resume {tag}_universal --allow-config-change"
            )
        if load_engine_checkpoint(self.engine, self.ckpt_dir, tag, universal=is_universal(tag_dir)) is None:
            raise ValueError(f"DeepSpeed could not load {tag_dir}")
        step = int(meta["step"])
        own = client.load_client(self.ckpt_dir, tag, self.rank) if old_world == self.world else None
        if own is not None:
            self.data.load_state_dict(own["data"])
            client.set_rng_state(own["rng"])
        elif old_world == self.world:  # a checkpoint without this rank's client file
            self.data.fast_forward(step)
        else:
            # Another world size: no stream maps onto an old one. Every new stream starts the epoch
            # after the furthest any old stream reached (see docs/operations.md, "Change the GPU
            # count"); the corpus schedule continues at this step. RNG states stay as seeded.
            states = client.load_data_states(self.ckpt_dir, tag, old_world)
            merged = client.merge_data_states(states, self.rank)
            merged["step"] = step * int(config["optim"]["grad_accum"])  # schedule position in micro-batches
            self.data.load_state_dict(merged)
        if self.rank == 0:
            log.info("resumed from %s at step %d", tag_dir, step)
        return Resumed(step=step, history=list(meta.get("history", [])))

    def _check_compatible(self, meta: dict[str, Any], new: dict[str, Any], allow: bool) -> None:
        from mico_ds.config import config_from_dict

        old = meta["config"]
        diffs = [k for k in EXACTNESS_KEYS if _get(old, k) != _get(new, k)]
        if meta["world_size"] != self.world:
            diffs.append(f"world_size ({meta['world_size']} -> {self.world})")
        if diffs and not allow:
            raise ValueError(
                f"resuming would break exact continuation: changed {diffs}. Pass "
                f"--allow-config-change to resume anyway (the data order then differs from the "
                f"uninterrupted run's; see docs/operations.md)"
            )
        if diffs and self.rank == 0:
            log.warning("resuming with changed %s: the data order is not the uninterrupted run's", diffs)
        config_from_dict(old)  # the old config must still parse (strict)


# ----------------------------------------------------------------------------- test hook


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
