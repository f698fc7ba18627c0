"""Sharded WebDataset-style sample streams with exact resume (DESIGN.md §4).

Layers, from shards to the trainer:

* :func:`expand_urls` -- brace patterns, globs, directories, lists and ``pipe:`` commands;
* :func:`iter_tar` -- raw samples of one tar (members grouped by key); a truncated or unreadable
  shard yields an error marker instead of raising, so bad data never stops a run;
* :class:`StreamPlan` -- which shards a *logical stream* reads in each epoch, in which chunks, and
  the seeded shuffle: a stream's position is ``(epoch, chunk, items emitted in the chunk)``;
* :class:`ShardStream` -- the ``IterableDataset`` run inside each data-loader worker: it replays the
  stream from a position (skipping, without decoding, the items of the chunk already consumed),
  decodes, batches, tokenizes, and tags every batch with its logical stream and the position after it;
* :class:`CorpusLoader` -- what the trainer holds (main process): a ``DataLoader(batch_size=None)``
  over a ShardStream, recording the positions of *consumed* batches for ``state_dict()``;
* :class:`EvalLoader` -- one pass, no shuffle, eval-mode decoding, each rank a disjoint part.

Logical streams. A rank with W workers runs W logical streams (one when W = 0); the global stream id
is ``rank * W + j``. Shards are split over the ``world_size * W`` streams; with fewer shards than
streams every stream reads every shard and keeps every n-th sample (logged once). torch's DataLoader
hands out an IterableDataset's batches round-robin over workers, so after N consumed batches the
next batch belongs to logical stream ``(rotation + N) % W``. The state stores that index; on resume
``rotation`` is set to it, so DataLoader worker w runs logical stream ``(w + rotation) % W`` and
worker 0 -- which delivers first -- continues the stream that was next. An interrupted and resumed
run thus yields exactly the batches of an uninterrupted one.
"""

from __future__ import annotations

import glob as globlib
import json
import logging
import os
import subprocess
import tarfile
import zlib
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from mico_ds import distributed
from mico_ds.config import CorpusConfig, DataConfig, InputConfig
from mico_ds.data import schema
from mico_ds.data.decode import SampleDecoder, SkipSample, finalize, join_captions

log = logging.getLogger(__name__)

STATE_VERSION = 1
EXAMPLES_PER_REASON = 3
FROM_DATA = "<data.tokenizer>"  # default tokenizer argument: the path in DataConfig.tokenizer
Position = tuple[int, int, int]  # (epoch, chunk, items of the chunk already emitted)


# ----------------------------------------------------------------------------- URLs


def _braceexpand(pattern: str) -> list[str]:
    import braceexpand

    return list(braceexpand.braceexpand(pattern))


def expand_urls(spec: str | Sequence[str], root: str | None = None) -> list[str]:
    """Shard URLs of ``spec``: brace patterns (``a-{000..009}.tar``), globs, a directory (its
    ``*.tar``, sorted), a list of any of these, or several joined by ``::`` (WebDataset style).
    Local paths are relative to ``root``; ``pipe:CMD`` URLs pass through unchanged.

    Raises:
        ValueError: naming the pattern when it matches nothing or a named file does not exist.
    """
    parts: list[str] = []
    for s in [spec] if isinstance(spec, str) else list(spec):
        parts += [p.strip() for p in str(s).split("::") if p.strip()]
    if not parts:
        raise ValueError(f"no shard URLs in {spec!r}")
    urls: list[str] = []
    for part in parts:
        missing: list[str] = []
        expanded = _braceexpand(part)
        for u in expanded:
            if u.startswith("pipe:"):
                urls.append(u)
                continue
            path = u if os.path.isabs(u) or not root else os.path.join(root, u)
            if any(ch in path for ch in "*?["):
                found = sorted(globlib.glob(path))
                if not found:
                    raise ValueError(f"shard pattern {u!r} (as {path!r}) matches no file")
                urls += found
            elif os.path.isdir(path):
                found = sorted(globlib.glob(os.path.join(path, "*.tar")))
                if not found:
                    raise ValueError(f"shard directory {path!r} holds no *.tar file")
                urls += found
            elif os.path.exists(path):
                urls.append(path)
            else:
                missing.append(path)
        if missing:
            raise ValueError(
                f"{len(missing)} of {len(expanded)} shards of {part!r} not found (data.root={root!r}), "
                f"e.g. {missing[:3]}"
            )
    return urls


def shard_sizes(urls: Sequence[str]) -> dict[str, int]:
    """Samples per shard from the ``sizes.json`` files next to local shards (missing entries omitted)."""
    out: dict[str, int] = {}
    cache: dict[str, dict] = {}
    for u in urls:
        if u.startswith("pipe:"):
            continue
        d = os.path.dirname(u)
        if d not in cache:
            try:
                with open(os.path.join(d, schema.SIZES_FILE)) as f:
                    cache[d] = json.load(f)
            except (OSError, ValueError):
                cache[d] = {}
        n = cache[d].get(os.path.basename(u))
        if isinstance(n, int):
            out[u] = n
    return out


# ----------------------------------------------------------------------------- tar reading


def _split_name(name: str) -> tuple[str, str]:
    """``dir/000123.depth.png`` -> (``dir/000123``, ``depth.png``) (WebDataset: first dot of the basename)."""
    d, base = os.path.split(name)
    if "." not in base:
        return name, ""
    stem, ext = base.split(".", 1)
    return (os.path.join(d, stem) if d else stem), ext


def _error(reason: str, url: str, detail: str) -> dict:
    return {"__error__": reason, "__key__": os.path.basename(url), "__url__": url, "__detail__": detail}


def iter_tar(url: str) -> Iterator[dict]:
    """Raw samples ``{"__key__", "__url__", ext: bytes}`` of one tar, in file order.

    Never raises for bad data: an unreadable shard, a truncated tar or a failing ``pipe:`` command
    yields an error marker ``{"__error__": "shard_error" | "truncated_tar", ...}`` after the samples
    read before the damage (the sample being read when it happened is dropped).
    """
    proc = None
    try:
        if url.startswith("pipe:"):
            proc = subprocess.Popen(url[5:], shell=True, stdout=subprocess.PIPE, bufsize=1 << 20)
            stream = proc.stdout
        else:
            stream = open(url, "rb", buffering=1 << 20)  # noqa: SIM115 - closed in finally
    except OSError as e:
        yield _error("shard_error", url, f"{type(e).__name__}: {e}")
        return
    cur: dict | None = None
    err: dict | None = None
    rc = 0
    try:
        try:
            tf = tarfile.open(fileobj=stream, mode="r|*")  # noqa: SIM115 - `stream` is closed below
        except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
            err = _error("shard_error", url, f"not a readable tar: {type(e).__name__}: {e}")
        else:
            for ti in tf:
                if not ti.isfile():
                    continue
                key, ext = _split_name(ti.name)
                if not ext or os.path.basename(key).startswith("__"):
                    continue  # WebDataset metadata members (__index__ ...) and extension-less files
                if cur is not None and cur["__key__"] != key:
                    yield cur  # complete: a new key starts (before reading it, which may fail)
                    cur = None
                if cur is None:
                    cur = {"__key__": key, "__url__": url}
                data = tf.extractfile(ti).read()
                if len(data) != ti.size:
                    raise tarfile.ReadError(f"member {ti.name} truncated ({len(data)} of {ti.size} bytes)")
                cur[ext] = data
            if cur is not None:
                yield cur
                cur = None
            if proc is not None:
                while stream.read(1 << 16):  # drain the end-of-archive padding: no SIGPIPE for the writer
                    pass
    except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
        dropped = f" (dropped the partial sample {cur['__key__']})" if cur is not None else ""
        err = _error("truncated_tar", url, f"{type(e).__name__}: {e}{dropped}")
    finally:
        stream.close()
        if proc is not None:
            if proc.poll() is None and err is not None:
                proc.kill()
            rc = proc.wait()
    if err is not None:
        yield err
    elif rc != 0:
        yield _error("shard_error", url, f"pipe command exited with status {rc}")


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


# ----------------------------------------------------------------------------- the plan


def _salt(name: str) -> int:
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

    @property
    def split_by_sample(self) -> bool:
        """Fewer shards than streams: every stream reads every shard and keeps every n-th sample."""
        return len(self.urls) < self.num_streams

    def epoch_shards(self, stream: int, epoch: int) -> list[str]:
        n = len(self.urls)
        order = np.arange(n)
        if self.shuffle:
            order = np.random.default_rng([self.seed, self.salt, epoch, 0]).permutation(n)
        urls = [self.urls[i] for i in order]
        return urls if self.split_by_sample else urls[stream :: self.num_streams]

    def chunks(self, stream: int, epoch: int) -> list[list[str]]:
        shards = self.epoch_shards(stream, epoch)
        k = max(1, self.shards_per_chunk)
        return [shards[i : i + k] for i in range(0, len(shards), k)]

    def raw_chunk(self, stream: int, index: int, chunk: list[str]) -> Iterator[dict]:
        """The chunk's samples interleaved over its shards, this stream's share only."""
        it = _round_robin([iter_tar(u) for u in chunk])
        if not self.split_by_sample:
            yield from it
            return
        for i, item in enumerate(it):
            # Every stream sees the same sequence and keeps every n-th item; rotating the start by
            # the chunk index spreads the remainders of short chunks over the streams.
            if (i + index) % self.num_streams == stream:
                yield item

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
        while True:
            produced = False
            for c, shards in enumerate(self.chunks(stream, epoch)):
                if c < chunk0:
                    continue
                for i, item in enumerate(self.shuffled(self.raw_chunk(stream, c, shards), stream, epoch, c)):
                    produced = True
                    if c == chunk0 and i < skip:
                        continue
                    yield (epoch, c, i), item
            if not infinite:
                return
            if not produced and chunk0 == 0 and skip == 0:
                raise ValueError(
                    f"stream {stream} found no samples in a whole epoch of shards {list(self.urls)}"
                )
            epoch, chunk0, skip = epoch + 1, 0, 0


# ----------------------------------------------------------------------------- tokenizer


class TextTokenizer(Protocol):
    def encode(self, texts: list[str], max_len: int) -> tuple[Any, Any]: ...


_TOKENIZERS: dict[str, TextTokenizer] = {}


def resolve_tokenizer(tok: str | TextTokenizer | None) -> TextTokenizer | None:
    """A tokenizer object from a ``tokenizer.model`` path (loaded once per process) or as given."""
    if tok is None or tok == "":
        return None
    if not isinstance(tok, str):
        return tok
    if tok not in _TOKENIZERS:
        from mico_ds.data.tokenizer import Tokenizer

        _TOKENIZERS[tok] = Tokenizer.from_path(tok)
    return _TOKENIZERS[tok]


def tokenize_into(batch: dict, texts: list[str], tokenizer: TextTokenizer | None, max_len: int) -> None:
    if tokenizer is None:
        return
    ids, mask = tokenizer.encode(texts, max_len)
    batch[schema.TEXT_IDS] = torch.as_tensor(ids, dtype=torch.int64)
    batch[schema.TEXT_MASK] = torch.as_tensor(mask, dtype=torch.int64)


# ----------------------------------------------------------------------------- skip accounting


@dataclass
class SkipStats:
    """Samples seen and skipped per reason, with a few example keys per reason."""

    seen: int = 0
    skipped: Counter = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)

    def add(self, reason: str, key: str, n: int = 1) -> None:
        self.skipped[reason] += n
        ex = self.examples.setdefault(reason, [])
        if len(ex) < EXAMPLES_PER_REASON and key not in ex:
            ex.append(key)

    def merge(self, seen: int, skipped: dict[str, int], examples: dict[str, list[str]]) -> None:
        self.seen += seen
        for r, n in skipped.items():
            self.skipped[r] += n
        for r, keys in examples.items():
            ex = self.examples.setdefault(r, [])
            ex += [k for k in keys if k not in ex][: EXAMPLES_PER_REASON - len(ex)]

    @property
    def total_skipped(self) -> int:
        return sum(self.skipped.values())

    def check(self, corpus: str, max_skip_rate: float, min_samples: int) -> None:
        """Raise when the skip rate passes the bound (after ``min_samples`` seen)."""
        if self.seen >= max(1, min_samples) and self.total_skipped / self.seen > max_skip_rate:
            raise ValueError(
                f"corpus {corpus!r}: {self.total_skipped} of {self.seen} samples skipped "
                f"({self.total_skipped / self.seen:.1%} > data.max_skip_rate={max_skip_rate:.1%}); "
                f"by reason {dict(self.skipped)}; example keys {self.examples}"
            )

    def as_dict(self) -> dict:
        return {"seen": self.seen, "skipped": dict(self.skipped), "examples": dict(self.examples)}


# ----------------------------------------------------------------------------- worker side


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


def collate(samples: list[dict], modalities: Sequence[str], inputs: InputConfig) -> dict:
    """Decoded samples -> batch dict per schema (tensors stacked, captions joined; no tokens yet)."""
    batch: dict = {}
    for m in schema.MODALITIES:
        if m in modalities:
            batch[m] = finalize(m, torch.stack([s[m] for s in samples]), inputs)
    batch[schema.KEYS] = [s["key"] for s in samples]
    batch[schema.CAPTIONS] = [join_captions(s["fields"]) for s in samples]
    batch[schema.SAMPLE_SOURCE] = torch.zeros((len(samples), len(modalities)), dtype=torch.int64)
    batch["_fields"] = [s["fields"] for s in samples]
    for key in (schema.EVAL_TEXTS, schema.QA):
        if all(key in s for s in samples):
            batch[key] = [s[key] for s in samples]
    return batch


def to_device(batch: dict[str, Any], device: torch.device | str, bf16: bool) -> dict[str, Any]:
    """A collated batch's tensors to ``device`` (floating ones to bf16 when asked); lists and strings
    as they are."""
    out = {}
    for k, v in batch.items():
        if isinstance(v, torch.Tensor):
            v = v.to(device, non_blocking=True)
            if bf16 and v.is_floating_point():
                v = v.to(torch.bfloat16)
        out[k] = v
    return out


def eval_extras(item: dict, fields: dict[str, str]) -> dict:
    """Evaluation-only fields of a raw sample (schema: ``eval_texts``, ``qa``).

    ``eval_texts``: one concatenated caption per caption alternative -- text j takes the j-th entry of
    every caption field that holds a list (cycling through shorter lists) and the single caption of the
    others; text 0 is the batch's ``captions`` entry. Duplicates are dropped.
    ``qa``: the json's ``"qa"`` list of ``{"q": str, "a": str, ...}``; malformed entries are ignored.
    """
    meta: dict = {}
    raw = item.get(schema.JSON_EXT)
    if raw is not None:
        try:
            meta = json.loads(raw)
        except ValueError:
            meta = {}  # the decoder already accepted or skipped this sample: nothing more to read
    caps = meta.get("captions") if isinstance(meta, dict) else None
    alts: dict[str, list[str]] = {}
    if isinstance(caps, dict):
        for f in schema.CAPTION_FIELDS:
            v = caps.get(f)
            if isinstance(v, list):
                v = [x.strip() for x in v if isinstance(x, str) and x.strip()]
                if v:
                    alts[f] = v
    n = max((len(v) for v in alts.values()), default=1)
    texts: list[str] = []
    for j in range(n):
        t = join_captions({**fields, **{f: v[j % len(v)] for f, v in alts.items()}})
        if t not in texts:
            texts.append(t)
    qa = meta.get("qa") if isinstance(meta, dict) else None
    pairs = [
        dict(p)
        for p in (qa if isinstance(qa, list) else [])
        if isinstance(p, dict) and isinstance(p.get("q"), str) and isinstance(p.get("a"), str)
    ]
    return {schema.EVAL_TEXTS: texts, schema.QA: pairs}


class ShardStream(IterableDataset):
    """Batches of one logical stream per data-loader worker (see module docstring)."""

    def __init__(self, spec: StreamSpec) -> None:
        super().__init__()
        self.spec = spec

    def logical_stream(self) -> int:
        info = get_worker_info()
        w = info.id if info is not None else 0
        return (w + self.spec.rotation) % self.spec.workers

    def __iter__(self) -> Iterator[dict]:
        sp = self.spec
        j = self.logical_stream()
        stream = sp.rank * sp.workers + j
        decoder = SampleDecoder(sp.modalities, sp.inputs, sp.train)
        tokenizer = resolve_tokenizer(sp.tokenizer)
        stats = SkipStats()  # since the previous batch (shipped as increments)
        local = SkipStats()  # since this worker started (for its own bound check)
        buf: list[dict] = []
        pos: Position = tuple(sp.positions[j])  # type: ignore[assignment]
        modalities = decoder.modalities
        taken = 0

        def emit() -> dict:
            batch = collate(buf, modalities, sp.inputs)
            tokenize_into(batch, batch[schema.CAPTIONS], tokenizer, sp.text_max_len)
            batch[schema.CORPUS] = sp.corpus
            batch["_stream"] = j
            batch["_pos"] = list(pos)
            batch["_stats"] = stats.as_dict()
            return batch

        for (e, c, i), item in sp.plan.items(stream, pos, sp.infinite):
            pos = (e, c, i + 1)
            stats.seen += 1
            local.seen += 1
            reason = item.get("__error__")
            if reason is None:
                rng = (
                    np.random.default_rng([sp.plan.seed, sp.plan.salt, e, stream, c, i, 2])
                    if sp.train
                    else None
                )
                try:
                    sample = decoder(item, rng)
                    if not sp.train:  # evaluation-only fields; training batches stay as they are
                        sample.update(eval_extras(item, sample["fields"]))
                    buf.append(sample)
                except SkipSample as sk:
                    reason = sk.reason
            if reason is not None:
                stats.add(reason, item["__key__"])
                local.add(reason, item["__key__"])
                try:
                    local.check(sp.corpus, sp.max_skip_rate, sp.min_samples_for_skip_rate)
                except ValueError as err:
                    # Handed to the main process as a message (it raises): a clean error, and the
                    # DataLoader's workers shut down promptly, unlike after an exception in a worker.
                    yield {"_stream": j, "_error": str(err)}
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
            yield {"_stream": j, "_pos": list(pos), "_stats": stats.as_dict(), "_empty": True}


# ----------------------------------------------------------------------------- main process


def _public(batch: dict) -> dict:
    return {k: v for k, v in batch.items() if not k.startswith("_")}


class CorpusLoader:
    """The training stream of one corpus on this rank, with exact resume.

    Iterate it (``next(loader)``) for batches (dicts per ``mico_ds.data.schema``); it never ends.
    ``state_dict()`` describes the batches consumed so far; ``load_state_dict()`` makes the next
    batch the one an uninterrupted run would have produced next.

    Args:
        corpus: name, shards, modalities, batch_size of the corpus.
        inputs: decoding geometry.
        data: root, tokenizer, text_max_len, num_workers, shuffle_buffer, shards_per_chunk and
            the skip-rate bound.
        seed: data-order seed (train.seed); epochs reshuffle shards with seed + epoch.
        tokenizer: tokenizer object or ``tokenizer.model`` path; default ``data.tokenizer``;
            ``None``/"" gives batches without ``text_ids``/``text_mask``.
        rank, world_size: default from ``mico_ds.distributed`` (RANK / WORLD_SIZE without a group).
        num_workers: data-loader workers (default ``data.num_workers``); 0 decodes in-process.
        train: training-mode decoding (random crops/frames/clips) and shuffling.
        salt: distinguishes streams of the same shards (e.g. a joined corpus's copy of a source).
        pin_memory, multiprocessing_context, prefetch_factor: passed to ``torch.utils.data.DataLoader``.
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
            salt=_salt(salt or corpus.name),
            shards_per_chunk=data.shards_per_chunk,
            shuffle_buffer=data.shuffle_buffer if train else 0,
            shuffle=train,
        )
        if self.plan.split_by_sample and self.rank == 0:
            log.warning(
                "corpus %r: %d shard(s) for %d streams (%d ranks x %d workers): every stream reads every "
                "shard and keeps every %d-th sample",
                corpus.name,
                len(urls),
                self.plan.num_streams,
                self.world_size,
                self.workers,
                self.plan.num_streams,
            )
        self.train = train
        self.pin_memory = pin_memory
        self.multiprocessing_context = multiprocessing_context
        self.prefetch_factor = prefetch_factor
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
        )

    def _start(self) -> Iterator[dict]:
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

    def next_with_fields(self) -> dict:
        """The next batch including ``_fields`` (per-sample caption dicts; used by joins)."""
        if self._it is None:
            self._it = self._start()
        batch = next(self._it)
        if "_error" in batch:
            self.close()
            raise ValueError(batch["_error"])
        j = batch.pop("_stream")
        expected = (self.rotation + self.consumed) % self.workers
        if j != expected:  # the DataLoader stopped delivering round-robin: resume would be wrong
            raise RuntimeError(f"corpus {self.corpus.name!r}: batch from stream {j}, expected {expected}")
        self.positions[j] = tuple(batch.pop("_pos"))
        self.consumed += 1
        st = batch.pop("_stats")
        self.stats.merge(st["seen"], st["skipped"], st["examples"])
        self.stats.check(self.corpus.name, self.data.max_skip_rate, self.data.min_samples_for_skip_rate)
        return batch

    def __iter__(self) -> CorpusLoader:
        return self

    def __next__(self) -> dict:
        batch = self.next_with_fields()
        batch.pop("_fields", None)
        return batch

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
        shards: URL spec (see :func:`expand_urls`), relative to ``data.root``.
        modalities: modalities every sample must carry.
        batch_size: per-rank batch size.
        max_samples: at most this many samples on this rank (split over its workers).
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
    ) -> None:
        self.name = name
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
            max_samples=per_worker,
        )
        ds = ShardStream(spec)
        it = (
            iter(ds)
            if self.num_workers == 0
            else iter(DataLoader(ds, batch_size=None, num_workers=self.num_workers))
        )
        self.stats = SkipStats()
        n = 0
        for batch in it:
            if "_error" in batch:
                raise ValueError(batch["_error"])
            st = batch["_stats"]
            self.stats.merge(st["seen"], st["skipped"], st["examples"])
            if batch.get("_empty"):
                continue
            batch = _public(batch)
            if self.max_samples is not None:
                room = self.max_samples - n
                if room <= 0:
                    break
                if len(batch[schema.KEYS]) > room:
                    batch = _truncate(batch, room)
            n += len(batch[schema.KEYS])
            yield batch
        self.stats.check(self.name, self.data.max_skip_rate, self.data.min_samples_for_skip_rate)

    def skip_stats(self) -> dict:
        return self.stats.as_dict()


def _truncate(batch: dict, n: int) -> dict:
    return {k: (v[:n] if isinstance(v, (torch.Tensor, list)) else v) for k, v in batch.items()}
