"""Which shards a *logical stream* reads in each epoch, in which chunks, and the seeded shuffle.

Every quantity is a pure function of (seed, salt, epoch, stream, chunk), which is what makes a
stream's position ``(epoch, chunk, items emitted in the chunk)`` enough to resume exactly.
Shards are split over the ``world_size * workers`` streams; with fewer shards than streams every
stream reads every shard and keeps every n-th sample.

A *resampled* plan (``data.corpora[].resampled``, OpenCLIP's ``--dataset-resampled``) splits nothing:
its "epoch" is a block of :attr:`StreamPlan.draws_per_epoch` shards each stream draws with
replacement from all the shards, seeded by (seed, salt, epoch, stream), so positions and exact
resume work as above while any number of streams reads any number of shards (docs/data.md,
"Resampled streams").

Remote shards (``http(s)://``, ``pipe:``) that fail are read again up to ``shard_retries`` times,
then skipped as one ``shard_failed`` marker (``mico_ds.data.remote``).
"""

from __future__ import annotations

import functools
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np

from mico_ds.data.io import iter_tar
from mico_ds.data.remote import iter_with_retries

Position = tuple[int, int, int]  # (epoch, chunk, items of the chunk already emitted)


def _round_robin(iters: list[Iterator[dict]]) -> Iterator[dict]:
    """Interleave shards one sample at a time (deterministic: no randomness before the buffer)."""
    live = list(iters)
    while live:
        nxt = []
        for it in live:
            try:
                yield next(it)
                nxt.append(it)
            except StopIteration:
                pass
        live = nxt


def salt_of(name: str) -> int:
    """A stream-order salt from a name (a corpus, or a join's copy of a source)."""
    return zlib.crc32(name.encode("utf-8"))


@dataclass(frozen=True)
class StreamPlan:
    """Deterministic assignment of shards to logical streams, chunking and shuffling.

    Every quantity is a pure function of (seed, salt, epoch, stream, chunk), which is what makes a
    position ``(epoch, chunk, emitted)`` enough to resume.
    """

    urls: tuple[str, ...]
    num_streams: int
    seed: int = 0
    salt: int = 0
    shards_per_chunk: int = 4
    shuffle_buffer: int = 256
    shuffle: bool = True
    max_member_bytes: int = 0  # members larger are not read (data.limits.member_bytes; 0: no cap)
    resampled: bool = False  # each epoch: draws with replacement per stream (data.corpora[].resampled)
    shard_retries: int = 3  # further reads of a remote shard that failed (data.shard_retries)
    shard_retry_backoff_s: float = 1.0  # wait before the first retry, doubled each time

    @property
    def split_by_sample(self) -> bool:
        """Fewer shards than streams: every stream reads every shard and keeps every n-th sample
        (never for a resampled plan, whose streams draw shards independently)."""
        return not self.resampled and len(self.urls) < self.num_streams

    @property
    def draws_per_epoch(self) -> int:
        """Shards a resampled stream draws per epoch: its share of the corpus, at least one chunk."""
        return max(max(1, self.shards_per_chunk), -(-len(self.urls) // self.num_streams))

    def shards_per_epoch(self, stream: int) -> int:
        """``len(self.epoch_shards(stream, e))`` for any epoch, without drawing the order."""
        n = len(self.urls)
        if self.resampled:
            return self.draws_per_epoch
        return n if self.split_by_sample else len(range(stream, n, self.num_streams))

    def epoch_shards(self, stream: int, epoch: int) -> list[str]:
        n = len(self.urls)
        if self.resampled:
            rng = np.random.default_rng([self.seed, self.salt, epoch, stream, 3])
            return [self.urls[i] for i in rng.integers(n, size=self.draws_per_epoch)]
        order = np.arange(n)
        if self.shuffle:
            order = np.random.default_rng([self.seed, self.salt, epoch, 0]).permutation(n)
        if not self.split_by_sample:
            order = order[stream :: self.num_streams]  # map only this stream's share to URLs
        return [self.urls[i] for i in order]

    def chunks(self, stream: int, epoch: int) -> list[list[str]]:
        shards = self.epoch_shards(stream, epoch)
        k = max(1, self.shards_per_chunk)
        return [shards[i : i + k] for i in range(0, len(shards), k)]

    def _read(self, chunk: list[str]) -> Iterator[dict]:
        open_tar = functools.partial(iter_tar, max_member_bytes=self.max_member_bytes)
        retries, backoff = self.shard_retries, self.shard_retry_backoff_s
        return _round_robin([iter_with_retries(u, open_tar, retries, backoff) for u in chunk])

    def raw_chunk(
        self, stream: int, index: int, chunk: list[str], base: int = 0, read: list[int] | None = None
    ) -> Iterator[dict]:
        """The chunk's samples interleaved over its shards, this stream's share only; ``read[0]``, if
        given, counts every sample read, kept or not.

        Split by sample, every stream sees the same sequence and keeps the items whose run-wide index
        ``base + i`` (``base``: the items of the epochs and chunks before this one, see
        :meth:`split_base`) is ``stream`` modulo the stream count: each stream keeps its exact share of
        the run, and a corpus smaller than the stream count still reaches every stream in turn.
        """
        split = self.split_by_sample
        for i, item in enumerate(self._read(chunk)):
            if read is not None:
                read[0] += 1
            if not split or (base + i) % self.num_streams == stream:
                yield item

    def split_base(self, stream: int, epoch: int, chunk: int) -> int:
        """Split by sample: the run-wide index of the first item of ``chunk`` of ``epoch``. Resuming
        past the run's first chunk reads (without decoding) the chunks before it, which a stream in
        this mode reads every epoch anyway; a shard's item count is the same in every epoch."""
        if not self.split_by_sample or (epoch == 0 and chunk == 0):
            return 0
        counts: dict[str, int] = {}
        for u in self.urls:
            if u not in counts:
                counts[u] = sum(1 for _ in self._read([u]))
        per_epoch = sum(counts[u] for u in self.epoch_shards(stream, epoch))
        before = self.chunks(stream, epoch)[:chunk]
        return epoch * per_epoch + sum(counts[u] for c in before for u in c)

    def shuffled(self, raw: Iterable[dict], stream: int, epoch: int, chunk: int) -> Iterator[dict]:
        """A seeded shuffle buffer over one chunk, flushed at its end (so chunks are independent)."""
        if not self.shuffle or self.shuffle_buffer <= 1:
            yield from raw
            return
        rng = np.random.default_rng([self.seed, self.salt, epoch, stream, chunk, 1])
        size = self.shuffle_buffer
        buf: list[dict] = []
        for item in raw:
            if len(buf) < size:
                buf.append(item)
                continue
            k = int(rng.integers(size))
            out, buf[k] = buf[k], item
            yield out
        for k in rng.permutation(len(buf)):
            yield buf[k]

    def items(self, stream: int, start: Position, infinite: bool) -> Iterator[tuple[Position, dict]]:
        """``((epoch, chunk, index in chunk), raw item)`` from ``start`` on; the first ``start[2]``
        items of the start chunk are read but not returned (no decoding)."""
        epoch, chunk0, skip = start
        empty: set[str] = set()  # resampled: shards drawn since the last epoch that had an item
        base = self.split_base(stream, epoch, chunk0)
        while True:
            read = [0]  # samples read this epoch, kept or not: a stream may keep none of a small corpus
            for c, shards in enumerate(self.chunks(stream, epoch)):
                if c < chunk0:
                    continue
                before = read[0]
                raw = self.raw_chunk(stream, c, shards, base, read)
                for i, item in enumerate(self.shuffled(raw, stream, epoch, c)):
                    if c == chunk0 and i < skip:
                        continue
                    yield (epoch, c, i), item
                base += read[0] - before
            if not infinite:
                return
            produced = read[0] > 0
            if self.resampled:
                # A block of draws may hold only empty shards by chance; the corpus is empty only
                # when the empty blocks in a row have drawn every shard.
                empty = set() if produced else empty | set(self.epoch_shards(stream, epoch))
                if len(empty) == len(set(self.urls)):
                    raise ValueError(
                        f"stream {stream} found no samples in any of the {len(empty)} shards, e.g. "
                        f"{list(self.urls[:3])} (resampled: every shard drawn, each empty)"
                    )
            elif not produced and chunk0 == 0 and skip == 0:
                raise ValueError(
                    f"stream {stream} found no samples in a whole epoch of shards {list(self.urls)}"
                )
            epoch, chunk0, skip = epoch + 1, 0, 0
