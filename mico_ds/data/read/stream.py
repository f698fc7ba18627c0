"""The worker side of a sample stream: one logical stream per data-loader worker, handing the main
process typed messages (:class:`WorkerMessage`), never reserved keys inside the batch.

A rank with W workers runs W logical streams (one when W = 0); the global stream id is
``rank * W + j``. torch's DataLoader hands out an IterableDataset's items round-robin over workers, so
after N consumed messages the next one belongs to logical stream ``(rotation + N) % W``; DataLoader
worker w runs logical stream ``(w + rotation) % W``, so that worker 0, which delivers first,
continues the stream that was next when the state was saved (``mico_ds.data.read.loader``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from mico_ds.config import DecodeLimits, InputConfig
from mico_ds.data import schema
from mico_ds.data.read.batch import collate, eval_extras, tokenize_into
from mico_ds.data.read.decode import SampleDecoder
from mico_ds.data.read.plan import Position, StreamPlan
from mico_ds.data.read.skips import DECODE_ERROR, SkipSample, SkipStats
from mico_ds.data.remote import SHARD_FAILED
from mico_ds.data.tokenizer import resolve_tokenizer

log = logging.getLogger(__name__)
LOGGED_DECODE_ERRORS = 3  # per worker: the first tracebacks of decode_error skips (a bug shows there)
NAMED_FAILED_SHARDS = 10  # failed shards the max_failed_shards error names (then "and N more")


@dataclass
class WorkerMessage:
    """What a worker hands the main process.

    Attributes:
        stream: the logical stream (of this rank) that produced it.
        position: the stream's position after it (None with ``error``).
        stats: skip counts since the stream's previous message (``SkipStats.as_dict()``).
        batch: the batch (schema keys only), or None for a message that only carries counts (the end
            of a finite stream) or an error.
        fields: the per-sample caption fields of the batch (by ``schema.CAPTION_FIELDS``), which a
            join merges field by field.
        error: a fatal error (the skip-rate bound, the failed-shard bound): the main process raises
            it, the workers stop.
    """

    stream: int
    position: Position | None = None
    stats: dict[str, Any] | None = None
    batch: dict[str, Any] | None = None
    fields: list[dict[str, str]] | None = None
    error: str | None = None

    def pin_memory(self) -> WorkerMessage:
        """Called by the DataLoader's pin-memory thread: pins the batch's tensors."""
        if self.batch is not None:
            self.batch = {k: v.pin_memory() if torch.is_tensor(v) else v for k, v in self.batch.items()}
        return self


@dataclass
class StreamSpec:
    """Everything a worker needs (picklable: spawn-safe)."""

    corpus: str
    plan: StreamPlan
    modalities: tuple[str, ...]
    inputs: InputConfig
    batch_size: int
    train: bool
    tokenizer: Any  # path, object or None
    text_max_len: int
    rank: int
    workers: int  # logical streams of this rank (max(1, num_workers))
    positions: list[Position]
    rotation: int = 0
    infinite: bool = True
    drop_last: bool = True
    max_skip_rate: float = 1.0
    min_samples_for_skip_rate: int = 0
    max_samples: int | None = None  # per logical stream (eval)
    limits: DecodeLimits | None = None  # data.limits (None: its defaults)
    max_failed_shards: float = 0.01  # data.max_failed_shards: per stream and epoch, see failed_shard_limit
    caption_fields: tuple[str, ...] = schema.CAPTION_FIELDS  # data.corpora[].caption_fields
    task: Any = None  # a task's SampleTask (mico_ds.tasks.base); None: the captions as they are
    require_caption: bool = True  # False: a sample without captions is kept (a task reads other labels)


def failed_shard_limit(max_failed_shards: float, shards_per_epoch: int) -> float:
    """Failed shards one stream may meet in one epoch: a fraction (< 1) of its shards per epoch, or a
    count (>= 1). One more stops the run."""
    return max_failed_shards * shards_per_epoch if max_failed_shards < 1 else max_failed_shards


def failed_shards_error(
    corpus: str, stream: int, epoch: int, failed: list[str], bound: float, limit: float, per_epoch: int
) -> str:
    """The error that stops a run past ``data.max_failed_shards``: every failed shard named."""
    named = "; ".join(failed[:NAMED_FAILED_SHARDS])
    more = f"; and {len(failed) - NAMED_FAILED_SHARDS} more" if len(failed) > NAMED_FAILED_SHARDS else ""
    return (
        f"corpus {corpus!r}: {len(failed)} shards failed in epoch {epoch} of data stream {stream}, more "
        f"than data.max_failed_shards={bound:g} allows ({limit:g} of its {per_epoch} shards per epoch): "
        f"{named}{more}"
    )


class ShardStream(IterableDataset):
    """Messages of one logical stream per data-loader worker: it replays the stream from its position
    (skipping, without decoding, the items of the chunk already consumed), decodes, batches and
    tokenizes."""

    def __init__(self, spec: StreamSpec) -> None:
        super().__init__()
        self.spec = spec

    def logical_stream(self) -> int:
        info = get_worker_info()
        w = info.id if info is not None else 0
        return (w + self.spec.rotation) % self.spec.workers

    def __iter__(self) -> Iterator[WorkerMessage]:
        sp = self.spec
        j = self.logical_stream()
        stream = sp.rank * sp.workers + j
        decoder = SampleDecoder(
            sp.modalities,
            sp.inputs,
            sp.train,
            require_caption=sp.require_caption,
            limits=sp.limits,
            caption_fields=sp.caption_fields,
        )
        tokenizer = resolve_tokenizer(sp.tokenizer)
        stats = SkipStats()  # since the previous message (shipped as increments)
        local = SkipStats()  # since this worker started (for its own bound check)
        buf: list[dict] = []
        pos: Position = tuple(sp.positions[j])  # type: ignore[assignment]
        modalities = decoder.modalities
        taken = 0
        logged = 0
        per_epoch = sp.plan.shards_per_epoch(stream)
        fail_limit = failed_shard_limit(sp.max_failed_shards, per_epoch)
        failed: list[str] = []  # "URL (detail)" of the shards that failed in epoch failed_epoch
        failed_epoch = pos[0]

        def emit() -> WorkerMessage:
            if _worker_fault(sp.rank, taken // max(1, sp.batch_size) + 1):
                raise RuntimeError(f"MICO_TEST_FAULT: a data worker of rank {sp.rank} raises")
            batch = collate(buf, modalities, sp.inputs)
            if sp.task is None:
                tokenize_into(batch, batch[schema.CAPTIONS], tokenizer, sp.text_max_len)
            else:
                sp.task.tokenize(batch, buf, tokenizer)
            batch[schema.CORPUS] = sp.corpus
            return WorkerMessage(j, pos, stats.as_dict(), batch, [s["fields"] for s in buf])

        for (e, c, i), item in sp.plan.items(stream, pos, sp.infinite):
            pos = (e, c, i + 1)
            stats.seen += 1
            local.seen += 1
            reason = item.get("__error__")
            detail = ""
            if reason == SHARD_FAILED:  # a remote shard that failed on every attempt
                detail = item["__detail__"]
                if e != failed_epoch:
                    failed, failed_epoch = [], e
                failed.append(f"{item['__url__']} ({detail})")
                if len(failed) > fail_limit:
                    err = failed_shards_error(
                        sp.corpus, stream, e, failed, sp.max_failed_shards, fail_limit, per_epoch
                    )
                    yield WorkerMessage(j, error=err)  # the main process raises it, as for the skip rate
                    return
            if reason is None:
                rng = (
                    np.random.default_rng([sp.plan.seed, sp.plan.salt, e, stream, c, i, 2])
                    if sp.train
                    else None
                )
                try:
                    sample = decoder(item, rng)
                    if sp.task is not None:  # after decoding: the media draws are the pretraining ones
                        sp.task.prepare(item, sample, e, sp.plan.seed, tokenizer)
                    if not sp.train:  # evaluation-only fields; training batches stay as they are
                        sample.update(eval_extras(item, sample["fields"]))
                    buf.append(sample)
                except SkipSample as sk:
                    reason = sk.reason
                    if reason == DECODE_ERROR:
                        detail = sk.detail
                        if logged < LOGGED_DECODE_ERRORS:
                            logged += 1
                            log.warning("sample %s skipped: %s", item["__key__"], sk, exc_info=sk)
                except Exception as e:  # anything else about one sample (eval_extras ...): not the worker
                    reason, detail = DECODE_ERROR, f"{type(e).__name__}: {e}"
                    if logged < LOGGED_DECODE_ERRORS:
                        logged += 1
                        log.warning("sample %s skipped: %s", item["__key__"], detail, exc_info=e)
            if reason is not None:
                stats.add(reason, item["__key__"], detail=detail)
                local.add(reason, item["__key__"], detail=detail)
                try:
                    local.check(sp.corpus, sp.max_skip_rate, sp.min_samples_for_skip_rate)
                except ValueError as err:
                    # Handed to the main process as a message (it raises): a clean error, and the
                    # DataLoader's workers shut down promptly, unlike after an exception in a worker.
                    yield WorkerMessage(j, error=str(err))
                    return
            if len(buf) == sp.batch_size:
                yield emit()
                taken += len(buf)
                buf, stats = [], SkipStats()
            if sp.max_samples is not None and taken + len(buf) >= sp.max_samples:
                break
        if buf and not sp.drop_last:
            yield emit()
        elif stats.seen and not sp.infinite:  # skip counts after the last batch still get reported
            yield WorkerMessage(j, pos, stats.as_dict())


def _worker_fault(rank: int, batch: int) -> bool:
    """Test hook: ``MICO_TEST_FAULT=N:RANK:worker`` (see mico_ds/train/guard.py) makes each data worker
    of rank RANK raise as it collates its N-th batch, outside the per-sample skips, as a bug would."""
    return f"{batch}:{rank}:worker" in os.environ.get("MICO_TEST_FAULT", "").split(",")
