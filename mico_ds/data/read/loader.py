"""What the trainer and the evaluation hold in the main process: one corpus's training stream with
exact resume (:class:`CorpusLoader`) and one pass over held-out shards (:class:`EvalLoader`).

Each wraps a ``DataLoader(batch_size=None)`` over a :class:`~mico_ds.data.read.stream.ShardStream`
and records the positions of *consumed* batches, so ``state_dict()`` describes exactly what the
trainer has seen and ``load_state_dict()`` makes the next batch the one an uninterrupted run would
have produced next (the round-robin bookkeeping is explained in ``mico_ds.data.read.stream``).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from typing import Any

from torch.utils.data import DataLoader

from mico_ds import distributed
from mico_ds.config import CorpusConfig, DataConfig, InputConfig
from mico_ds.data import schema
from mico_ds.data.io import expand_urls
from mico_ds.data.read.batch import truncate
from mico_ds.data.read.plan import Position, StreamPlan, salt_of
from mico_ds.data.read.skips import SkipStats
from mico_ds.data.read.stream import ShardStream, StreamSpec, WorkerMessage
from mico_ds.data.sizing import corpus_sizes
from mico_ds.data.tokenizer import TextTokenizer, resolve_tokenizer

log = logging.getLogger(__name__)

STATE_VERSION = 1
FROM_DATA = "<data.tokenizer>"  # default tokenizer argument: the path in DataConfig.tokenizer


class CorpusLoader:
    """The training stream of one corpus on this rank, with exact resume.

    Iterate it (``next(loader)``) for batches (dicts per ``mico_ds.data.schema``); it never ends.
    ``state_dict()`` describes the batches consumed so far; ``load_state_dict()`` makes the next
    batch the one an uninterrupted run would have produced next.

    Args:
        corpus: name, shards, modalities, batch_size of the corpus.
        inputs: decoding geometry.
        data: root, tokenizer, text_max_len, num_workers, shuffle_buffer, shards_per_chunk, the
            skip-rate bound, the retries of failed remote shards and their bound.
        seed: data-order seed (train.seed); epochs reshuffle shards with seed + epoch (a resampled
            corpus, ``corpus.resampled``, draws each epoch's shards with replacement instead).
        tokenizer: tokenizer object or ``tokenizer.model`` path; default ``data.tokenizer``;
            ``None``/"" gives batches without ``text_ids``/``text_mask``.
        rank, world_size: default from ``mico_ds.distributed`` (RANK / WORLD_SIZE without a group).
        num_workers: data-loader workers (default ``data.num_workers``); 0 decodes in-process.
        train: training-mode decoding (random crops/frames/clips) and shuffling.
        salt: distinguishes streams of the same shards (e.g. a joined corpus's copy of a source).
        pin_memory, multiprocessing_context, prefetch_factor: passed to ``torch.utils.data.DataLoader``.
        task: a task's :class:`~mico_ds.tasks.base.SampleTask` (what each sample trains; None: its captions).
    """

    def __init__(
        self,
        corpus: CorpusConfig,
        inputs: InputConfig,
        data: DataConfig,
        *,
        seed: int = 0,
        tokenizer: str | TextTokenizer | None = FROM_DATA,
        rank: int | None = None,
        world_size: int | None = None,
        num_workers: int | None = None,
        train: bool = True,
        salt: str | None = None,
        pin_memory: bool = False,
        multiprocessing_context: str | None = None,
        prefetch_factor: int = 2,
        task: Any = None,
    ) -> None:
        if corpus.batch_size < 1:
            raise ValueError(f"corpus {corpus.name!r}: batch_size must be >= 1, got {corpus.batch_size}")
        self.corpus = corpus
        self.inputs = inputs
        self.data = data
        self.rank = distributed.get_rank() if rank is None else rank
        self.world_size = distributed.get_world_size() if world_size is None else world_size
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} out of range for world_size {self.world_size}")
        self.num_workers = data.num_workers if num_workers is None else num_workers
        self.workers = max(1, self.num_workers)
        self.tokenizer = data.tokenizer if tokenizer == FROM_DATA else tokenizer
        urls = expand_urls(corpus.shards, data.root)
        self.plan = StreamPlan(
            urls=tuple(urls),
            num_streams=self.world_size * self.workers,
            seed=seed,
            salt=salt_of(salt or corpus.name),
            shards_per_chunk=data.shards_per_chunk,
            shuffle_buffer=data.shuffle_buffer if train else 0,
            shuffle=train,
            max_member_bytes=data.limits.member_bytes,
            resampled=corpus.resampled,
            shard_retries=data.shard_retries,
            shard_retry_backoff_s=data.shard_retry_backoff_s,
        )
        if self.plan.split_by_sample and self.rank == 0:
            known = corpus_sizes(urls, open_missing=False)  # sizes.json / *_stats.json: never opens a tar
            log.warning(
                "corpus %r: %d shard(s)%s for %d streams (%d ranks x %d workers): every stream reads every "
                "shard and keeps every %d-th sample",
                corpus.name,
                len(urls),
                f", {known.short()}," if known.sizes else "",
                self.plan.num_streams,
                self.world_size,
                self.workers,
                self.plan.num_streams,
            )
        self.train = train
        self.pin_memory = pin_memory
        self.multiprocessing_context = multiprocessing_context
        self.prefetch_factor = prefetch_factor
        self.task = task
        self.positions: list[Position] = [(0, 0, 0)] * self.workers
        self.rotation = 0
        self.consumed = 0
        self.stats = SkipStats()
        self._it: Iterator[dict] | None = None
        self._loader: DataLoader | None = None

    # -- iteration

    def _spec(self) -> StreamSpec:
        return StreamSpec(
            corpus=self.corpus.name,
            plan=self.plan,
            modalities=tuple(self.corpus.modalities),
            inputs=self.inputs,
            batch_size=self.corpus.batch_size,
            train=self.train,
            tokenizer=self.tokenizer,
            text_max_len=self.data.text_max_len,
            rank=self.rank,
            workers=self.workers,
            positions=list(self.positions),
            rotation=self.rotation,
            max_skip_rate=self.data.max_skip_rate,
            min_samples_for_skip_rate=self.data.min_samples_for_skip_rate,
            limits=self.data.limits,
            max_failed_shards=self.data.max_failed_shards,
            caption_fields=tuple(self.corpus.caption_fields),
            task=self.task,
            require_caption=getattr(self.task, "needs_captions", True),
        )

    def _start(self) -> Iterator[WorkerMessage]:
        ds = ShardStream(self._spec())
        if self.num_workers == 0:
            return iter(ds)
        if self.multiprocessing_context in (None, "fork"):
            resolve_tokenizer(self.tokenizer)  # load once here; forked workers inherit it
        self._loader = DataLoader(
            ds,
            batch_size=None,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            prefetch_factor=self.prefetch_factor,
            multiprocessing_context=self.multiprocessing_context,
            in_order=True,  # round-robin over workers: what the resume bookkeeping relies on
        )
        return iter(self._loader)

    def next_with_fields(self) -> tuple[dict, list[dict[str, str]]]:
        """The next batch and its per-sample caption fields (a join merges them field by field)."""
        if self._it is None:
            self._it = self._start()
        msg = next(self._it)
        if msg.error is not None:
            self.close()
            raise ValueError(msg.error)
        expected = (self.rotation + self.consumed) % self.workers
        if msg.stream != expected:  # the DataLoader stopped delivering round-robin: resume would be wrong
            raise RuntimeError(
                f"corpus {self.corpus.name!r}: batch from stream {msg.stream}, expected {expected}"
            )
        assert msg.position is not None and msg.stats is not None and msg.batch is not None
        self.positions[msg.stream] = tuple(msg.position)  # type: ignore[assignment]
        self.consumed += 1
        st = msg.stats
        self.stats.merge(st["seen"], st["skipped"], st["examples"])
        self.stats.check(self.corpus.name, self.data.max_skip_rate, self.data.min_samples_for_skip_rate)
        return msg.batch, msg.fields or []

    def __iter__(self) -> CorpusLoader:
        return self

    def __next__(self) -> dict:
        return self.next_with_fields()[0]

    def close(self) -> None:
        """Stop the workers (they are restarted lazily by the next ``next()``)."""
        self._it = None
        self._loader = None

    # -- state

    def state_dict(self) -> dict:
        """Small JSON-able state: each logical stream's position after its last consumed batch,
        which stream is next, and the skip counters."""
        return {
            "version": STATE_VERSION,
            "corpus": self.corpus.name,
            "rank": self.rank,
            "world_size": self.world_size,
            "workers": self.workers,
            "next": (self.rotation + self.consumed) % self.workers,
            "positions": [list(p) for p in self.positions],
            "stats": self.stats.as_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue exactly after the batches recorded in ``state`` (same rank count and workers);
        with another topology the exact stream cannot be rebuilt: a warning is logged and every
        stream starts the epoch after the furthest one recorded (no sample seen twice in the epoch)."""
        if state.get("version") != STATE_VERSION:
            raise ValueError(
                f"corpus {self.corpus.name!r}: data state version {state.get('version')} != {STATE_VERSION}"
            )
        if state.get("corpus") != self.corpus.name:
            raise ValueError(f"data state is for corpus {state.get('corpus')!r}, not {self.corpus.name!r}")
        self.close()
        same = (state["rank"], state["world_size"], state["workers"]) == (
            self.rank,
            self.world_size,
            self.workers,
        )
        if same:
            self.positions = [tuple(p) for p in state["positions"]]  # type: ignore[misc]
            self.rotation = int(state["next"])
        else:
            epoch = max(p[0] for p in state["positions"]) + 1
            log.warning(
                "corpus %r: data state saved with rank %s/%s x %s workers, now rank %s/%s x %s: "
                "exact resume impossible, restarting every stream at epoch %d",
                self.corpus.name, state["rank"], state["world_size"], state["workers"],
                self.rank, self.world_size, self.workers, epoch,
            )  # fmt: skip
            self.positions = [(epoch, 0, 0)] * self.workers
            self.rotation = 0
        self.consumed = 0
        st = state.get("stats", {})
        self.stats = SkipStats()
        self.stats.merge(st.get("seen", 0), st.get("skipped", {}), st.get("examples", {}))

    def skip_stats(self) -> dict:
        """``{"seen": n, "skipped": {reason: n}, "examples": {reason: [keys]}}`` on this rank."""
        return self.stats.as_dict()


class EvalLoader:
    """One pass over held-out shards: no shuffle, eval-mode decoding, this rank's disjoint part.

    Each iteration (``for batch in loader``) is a fresh pass. Shards are split over ranks x workers
    (every n-th sample when there are fewer shards); the last batch of each worker may be short.

    Args:
        shards: URL spec (see :func:`mico_ds.data.io.expand_urls`), relative to ``data.root``.
        modalities: modalities every sample must carry.
        batch_size: per-rank batch size.
        max_samples: at most this many samples on this rank (split over its workers).
        caption_fields: the caption fields of the texts (default ``data.val_caption_fields``).
        require_caption: False keeps samples without a caption (QA or classification splits).
        Others as :class:`CorpusLoader`.
    """

    def __init__(
        self,
        shards: str | Sequence[str],
        modalities: Sequence[str],
        inputs: InputConfig,
        data: DataConfig,
        *,
        batch_size: int,
        tokenizer: str | TextTokenizer | None = FROM_DATA,
        rank: int | None = None,
        world_size: int | None = None,
        num_workers: int = 0,
        max_samples: int | None = None,
        name: str = "val",
        caption_fields: Sequence[str] | None = None,
        require_caption: bool = True,
    ) -> None:
        self.name = name
        self.require_caption = require_caption
        self.caption_fields = tuple(data.val_caption_fields if caption_fields is None else caption_fields)
        self.modalities = tuple(modalities)
        self.inputs, self.data = inputs, data
        self.batch_size = batch_size
        self.tokenizer = data.tokenizer if tokenizer == FROM_DATA else tokenizer
        self.rank = distributed.get_rank() if rank is None else rank
        self.world_size = distributed.get_world_size() if world_size is None else world_size
        self.num_workers = num_workers
        self.workers = max(1, num_workers)
        self.max_samples = max_samples
        self.plan = StreamPlan(
            urls=tuple(expand_urls(shards, data.root)),
            num_streams=self.world_size * self.workers,
            shards_per_chunk=1,  # shards read one after another
            shuffle_buffer=0,
            shuffle=False,
            max_member_bytes=data.limits.member_bytes,
            shard_retries=data.shard_retries,
            shard_retry_backoff_s=data.shard_retry_backoff_s,
        )
        self.stats = SkipStats()

    def __iter__(self) -> Iterator[dict]:
        per_worker = None
        if self.max_samples is not None:
            per_worker = -(-self.max_samples // self.workers)
        spec = StreamSpec(
            corpus=self.name,
            plan=self.plan,
            modalities=self.modalities,
            inputs=self.inputs,
            batch_size=self.batch_size,
            train=False,
            tokenizer=self.tokenizer,
            text_max_len=self.data.text_max_len,
            rank=self.rank,
            workers=self.workers,
            positions=[(0, 0, 0)] * self.workers,
            infinite=False,
            drop_last=False,
            max_skip_rate=self.data.max_skip_rate,
            min_samples_for_skip_rate=self.data.min_samples_for_skip_rate,
            limits=self.data.limits,
            max_samples=per_worker,
            max_failed_shards=self.data.max_failed_shards,
            caption_fields=self.caption_fields,
            require_caption=self.require_caption,
        )
        ds = ShardStream(spec)
        it = (
            iter(ds)
            if self.num_workers == 0
            else iter(DataLoader(ds, batch_size=None, num_workers=self.num_workers))
        )
        self.stats = SkipStats()
        n = 0
        for msg in it:
            if msg.error is not None:
                raise ValueError(msg.error)
            assert msg.stats is not None
            self.stats.merge(msg.stats["seen"], msg.stats["skipped"], msg.stats["examples"])
            if msg.batch is None:
                continue
            batch = msg.batch
            if self.max_samples is not None:
                room = self.max_samples - n
                if room <= 0:
                    break
                if len(batch[schema.KEYS]) > room:
                    batch = truncate(batch, room)
            n += len(batch[schema.KEYS])
            yield batch
        self.stats.check(self.name, self.data.max_skip_rate, self.data.min_samples_for_skip_rate)

    def skip_stats(self) -> dict:
        return self.stats.as_dict()
