"""The one owner of a run's checkpoints: save (commit order, retention) and resume.

A checkpoint is DeepSpeed's engine state (ZeRO partitions, optimizer, scheduler) plus mico_ds' client
state per rank (data stream positions, RNG states) and ``meta.json`` (step, resolved config, world
size, metric history); the layout is in :mod:`mico_ds.checkpoint.layout`.

Commit order: every rank writes its DeepSpeed files and its client file, hashing them as they are
written (:mod:`mico_ds.checkpoint.saving`); the ranks agree (one ``all_gather_object`` of what each
wrote and whether a write failed); rank 0 writes ``mico_manifest.json`` (every file, size, CRC-32:
:mod:`mico_ds.checkpoint.manifest`), then ``meta.json`` (so a directory with ``meta.json`` is complete),
then rewrites ``latest`` (temp file + rename), and tells the others how the commit went. A crash
anywhere in a save leaves the previous checkpoint as ``latest``; the incomplete directory is refused by
``--resume TAG`` and removed when the run saves that step again.

A write that fails (a full disk, a quota, an I/O error) on any rank ends the save on every rank at the
agreement, with one :class:`~mico_ds.checkpoint.saving.CheckpointSaveError` naming the directory, the
rank, the file and the space the checkpoint needs; the partial directory is removed and ``latest`` stays.
Before writing, the save compares the free space with the size of the previous checkpoint
(``checkpoint.check_free_space``).

A resume verifies the checkpoint against its manifest (``checkpoint.verify``: each rank checks a share
of the files, balanced by bytes, and the ranks agree); ``latest`` falls back to the newest intact
checkpoint, a named tag that is damaged is an error. The ``checkpoint`` settings are read from the
run config handed to :meth:`CheckpointManager.save` (``meta["config"]``) and :meth:`~CheckpointManager.load`.

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
import socket
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from mico_ds import distributed as mdist
from mico_ds.checkpoint import client, manifest
from mico_ds.checkpoint.layout import (
    CHECKPOINTS,
    CLIENT_DIR,
    MANIFEST_FILE,
    META_FILE,
    TAG_RE,
    is_partitioned,
    is_universal,
    list_tags,
    load_meta,
    locate,
    read_best,
    read_latest,
    select_to_delete,
    tag_for,
    write_latest,
)
from mico_ds.checkpoint.saving import (
    CheckpointSaveError,
    RankWrites,
    checkpoint_size,
    describe_error,
    failure_message,
    fmt_bytes,
    free_bytes,
    short_of_space_message,
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


@dataclass(frozen=True)
class _Options:
    """The ``checkpoint`` settings the manager acts on (defaults: those of ``CheckpointConfig``)."""

    verify: str = "checksum"
    check_free_space: bool = True

    @classmethod
    def of(cls, config: dict[str, Any] | None) -> _Options:
        sec = (config or {}).get("checkpoint") or {}
        return cls(
            str(sec.get("verify", cls.verify)), bool(sec.get("check_free_space", cls.check_free_space))
        )


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
        """Save on every rank; ``latest`` moves after all ranks are done. Returns the checkpoint dir.

        Raises:
            CheckpointSaveError: on every rank, when a write failed on any rank (or the up-front free
                space check refused); ``latest`` still names the previous checkpoint.
        """
        tag, rank, ckpt_dir = tag_for(step), self.rank, self.ckpt_dir
        tag_dir = ckpt_dir / tag
        self._prepare(tag, _Options.of(meta.get("config")))
        writes = RankWrites(tag_dir, rank)
        stall = _stall_requested(step, rank)
        with writes.hooked(self.engine):
            if stall == "deepspeed":
                _stall_inside_deepspeed(self.engine, ckpt_dir, tag, rank)
            self.engine.save_checkpoint(
                str(ckpt_dir), tag=tag, client_state={"step": step}, save_latest=False
            )
        if stall == "client":
            _stall(ckpt_dir, tag, rank, "DeepSpeed's files")
        state = {"data": self.data.state_dict(), "rng": client.rng_state(), "step": step}
        writes.save_torch(state, client.client_file(ckpt_dir, tag, rank), atomic=True)
        meta_bytes = b""
        if rank == 0:
            meta_bytes = json.dumps({**meta, "step": step, "world_size": self.world}, indent=1).encode()
            writes.expect(len(meta_bytes))
        # The agreement: after it every rank knows whether every partition and client file is on disk.
        parts = mdist.all_gather_object(writes.part())
        errors = [p["error"] for p in parts if p["error"]]
        if errors:
            self._abandon(tag, writes, errors, need=sum(p["size"] for p in parts))
        failed = self._commit(tag, parts, meta_bytes) if rank == 0 else None
        failed = mdist.broadcast_object(failed)  # also the barrier: latest has moved when it returns
        if failed is not None:
            raise CheckpointSaveError(failed)
        return tag_dir

    def _prepare(self, tag: str, opts: _Options) -> None:
        """Before anything is written: the checkpoints dir, a leftover directory of this tag removed (a
        crashed save of this step, or a damaged checkpoint a resume fell back from), and the free space
        compared with the previous checkpoint's size. Every rank raises the same error, or none."""
        ckpt_dir, tag_dir = self.ckpt_dir, self.ckpt_dir / tag
        latest, error = self.latest(), None
        try:
            ckpt_dir.mkdir(parents=True, exist_ok=True)
            if self.rank == 0 and tag_dir.exists() and tag != latest:
                shutil.rmtree(tag_dir)
        except OSError as e:
            error = f"rank {self.rank}: {e}"
        mdist.barrier()  # the leftover is gone before any rank measures the free space
        need = free = None
        if (
            opts.check_free_space
            and error is None
            and latest not in (None, tag)
            and (ckpt_dir / latest).is_dir()
        ):
            need, free = checkpoint_size(ckpt_dir / latest), free_bytes(ckpt_dir)
        checks = mdist.all_gather_object({"error": error, "need": need, "free": free})
        errors = [c["error"] for c in checks if c["error"]]
        if errors:
            raise CheckpointSaveError(
                f"checkpoint {tag} could not be started in {ckpt_dir}: {'; '.join(errors)}; nothing was "
                f"written and `latest` still names {latest}"
            )
        short = [
            c for c in checks if c["need"] is not None and c["free"] is not None and c["free"] < c["need"]
        ]
        if short:
            raise CheckpointSaveError(
                short_of_space_message(tag, ckpt_dir, str(latest), short[0]["need"], short[0]["free"])
            )

    def _abandon(self, tag: str, writes: RankWrites, errors: list[dict[str, Any]], need: int) -> None:
        """A rank failed to write: remove every rank's part, then raise the same error on every rank."""
        writes.remove_written()
        mdist.barrier()
        free = None
        if self.rank == 0:
            shutil.rmtree(self.ckpt_dir / tag, ignore_errors=True)
            free = free_bytes(self.ckpt_dir)
        free = mdist.broadcast_object(free)
        raise CheckpointSaveError(failure_message(tag, self.ckpt_dir, errors, need, free, self.latest()))

    def _commit(self, tag: str, parts: list[dict[str, Any]], meta_bytes: bytes) -> str | None:
        """Rank 0: the manifest, ``meta.json``, ``latest``, retention. Returns the error, if any."""
        ckpt_dir, tag_dir = self.ckpt_dir, self.ckpt_dir / tag
        files = {name: rec for p in parts for name, rec in p["files"].items()}
        files[f"{CLIENT_DIR}/{META_FILE}"] = {
            "size": len(meta_bytes),
            manifest.ALGORITHM: manifest.crc_hex(zlib.crc32(meta_bytes)),
            "rank": 0,
        }
        previous = self.latest()
        meta_file = tag_dir / CLIENT_DIR / META_FILE
        current = str(tag_dir / MANIFEST_FILE)
        try:
            manifest.write(tag_dir, manifest.build(tag, files))  # before meta.json, which marks completeness
            current = str(meta_file)
            tmpj = meta_file.with_name(f".{META_FILE}.tmp")
            try:
                tmpj.write_bytes(meta_bytes)
                os.replace(tmpj, meta_file)  # the directory is complete
            finally:
                tmpj.unlink(missing_ok=True)
            current = str(ckpt_dir / "latest")
            write_latest(ckpt_dir, tag)  # the run's newest checkpoint
        except OSError as e:
            shutil.rmtree(tag_dir, ignore_errors=True)
            err = {
                "rank": 0,
                "host": socket.gethostname(),
                "file": current,
                "written": 0,
                **describe_error(e),
            }
            need = sum(p["size"] for p in parts)
            return failure_message(tag, ckpt_dir, [err], need, free_bytes(ckpt_dir), previous)
        best = read_best(ckpt_dir)
        protect = [best["tag"]] if best else []
        for old in select_to_delete(list_tags(ckpt_dir), tag, self.keep_last, self.keep_every, protect):
            shutil.rmtree(ckpt_dir / old, ignore_errors=True)
        return None

    # ------------------------------------------------------------------ resume

    def load(self, resume: str, config: dict[str, Any], allow_config_change: bool) -> Resumed:
        """Restore the engine, the data streams and the RNG states from ``resume`` (``latest`` or a tag).

        The checkpoint is first verified against its manifest (``checkpoint.verify`` of ``config``).
        ``latest`` takes the newest intact checkpoint, pointing ``latest`` at it when that is an older
        one, so this is also the call that rolls a running job back (every rank, at the same step).

        Args:
            config: the plain form of this run's (new) config, checked against the checkpoint's.
            allow_config_change: resume even when an exactness key or the world size changed.

        Raises:
            ValueError: an incomplete, unknown or damaged (named) checkpoint, no intact one for
                ``latest``, a change that breaks exactness (without ``allow_config_change``), or ZeRO
                partitions of another world size.
        """
        from mico_ds.distributed.zero_checkpoint import load_engine_checkpoint

        tag, verified = self._choose(resume, _Options.of(config).verify)
        tag_dir = self.ckpt_dir / tag
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
            log.info("resumed from %s at step %d (%s)", tag_dir, step, verified)
        return Resumed(step=step, history=list(meta.get("history", [])))

    def _choose(self, resume: str, verify: str) -> tuple[str, str]:
        """The checkpoint to load and what its verification found.

        ``latest``: the tag it names if intact, else the newest older complete checkpoint that is,
        with a warning naming what is wrong with each one passed over. A named tag: that one, or
        ``ValueError`` naming its damaged files.
        """
        first = self.latest() if resume == "latest" else None
        if first is None:  # a named tag, or no `latest` (locate says so, with the tags there are)
            tag = locate(self.ckpt_dir, resume, flag="--resume").tag
            assert tag is not None
            load_meta(self.ckpt_dir, tag)  # an incomplete checkpoint is refused as such
            problems, verified = self._verify(tag, verify)
            if problems:
                raise ValueError(
                    f"{self.ckpt_dir / tag} is damaged: {'; '.join(problems)}. Resume from another "
                    f"checkpoint (--resume latest takes the newest intact one), or set "
                    f"--checkpoint.verify=off to load it anyway"
                )
            return tag, verified
        older = [t for t in list_tags(self.ckpt_dir) if TAG_RE.match(t) and t < first]
        passed: list[str] = []
        for tag in [first, *reversed(older)]:
            problems, verified = self._verify(tag, verify)
            if not problems:
                if passed and self.rank == 0:
                    log.warning(
                        "resuming from %s, the newest intact checkpoint (`latest` names %s)", tag, first
                    )
                    self._repoint_latest(tag)
                return tag, verified
            if self.rank == 0:
                log.warning(
                    "checkpoint %s is damaged, not resuming from it: %s",
                    self.ckpt_dir / tag,
                    "; ".join(problems),
                )
            passed.append(f"{tag}: {'; '.join(problems)}")
        raise ValueError(f"no intact checkpoint in {self.ckpt_dir}: {' | '.join(passed)}")

    def _repoint_latest(self, tag: str) -> None:
        """Rank 0, after a fall-back: ``latest`` names the intact checkpoint. The damaged ones are then
        newer than ``latest``, like a save that never finished: retention leaves them alone and the
        run's next save of their step replaces them (and the end of the run saves its last step)."""
        try:
            write_latest(self.ckpt_dir, tag)
        except OSError as e:
            log.warning("could not point %s at %s: %s", self.ckpt_dir / "latest", tag, e)
        else:
            log.warning("%s now names %s", self.ckpt_dir / "latest", tag)

    def _verify(self, tag: str, verify: str) -> tuple[list[str], str]:
        """Check ``tag`` against its manifest, every rank a share of the files; the ranks agree (one
        ``all_gather_object``). Returns ``(problems, a phrase saying what was checked)``."""
        tag_dir = self.ckpt_dir / tag
        local: list[manifest.Problem] = []
        said = f"not verified: checkpoint.verify={verify}"
        t0 = time.perf_counter()
        if not (tag_dir / CLIENT_DIR / META_FILE).is_file():
            local.append(
                manifest.Problem(f"{CLIENT_DIR}/{META_FILE}", "incomplete", "its save did not finish")
            )
        elif verify != "off":
            try:
                m = manifest.read(tag_dir)
            except manifest.ManifestError as e:
                local.append(manifest.Problem(MANIFEST_FILE, "manifest", str(e)))
            else:
                if m is None:
                    said = f"not verified: no {MANIFEST_FILE} (written by an older mico_ds, or by DeepSpeed)"
                else:
                    local += manifest.verify(
                        tag_dir, m, rank=self.rank, world=self.world, checksums=verify == "checksum"
                    )
                    what = "sizes and CRC-32 checksums" if verify == "checksum" else "sizes"
                    said = (
                        f"verified {len(m['files'])} files, {fmt_bytes(manifest.total_size(m))}: {what}, "
                        f"{time.perf_counter() - t0:.2f} s on rank {self.rank} of {self.world}"
                    )
                    extra = manifest.unlisted(tag_dir, m) if self.rank == 0 else []
                    if extra:
                        said += f"; not in the manifest, not checked: {', '.join(extra[:8])}"
        problems = sorted({p for part in mdist.all_gather_object(local) for p in part})
        return [str(p) for p in problems], said

    def _check_compatible(self, meta: dict[str, Any], new: dict[str, Any], allow: bool) -> None:
        from mico_ds.config import config_from_dict, to_dict

        # Through the parser (strict: the old config must still parse), so that a key added since the
        # checkpoint was written compares as its default, not as a change.
        old = to_dict(config_from_dict(meta["config"]))
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
