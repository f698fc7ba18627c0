"""How many samples each shard of a corpus holds, and where each figure came from, without opening
every tar when an index exists.

Per shard, the first source that knows (docs/data.md, "Sizing and indexing"):

``sizes.json``
    the shard directory's ``sizes.json`` ({shard file name: samples}), written by our writers and by
    ``tools/index_shards.py``: exact.
``*_stats.json``
    img2dataset's / video2dataset's ``NNNNN_stats.json`` next to ``NNNNN.tar``, its ``successes``: the
    samples that carry their media. img2dataset's tar holds exactly those; video2dataset's also holds
    metadata-only records of the failed downloads (which the loader skips), and with its clipping
    subsampler one success is several clips, so there the figure is the number of source videos.
``counted``
    the tar opened and its samples counted from the member headers alone (``tarfile`` seeks over the
    data): the rule of :func:`mico_ds.data.io.iter_tar` (a run of members sharing a key is one sample;
    members without an extension and ``__*`` metadata members are not samples).

Only shards no index knows are opened, and only when asked (``open_missing``): the loader's start-up
never opens a tar. ``pipe:`` and other remote URLs are never opened here. Builds on ``mico_ds.data.io``
alone, so the read and the write path may both use it.
"""

from __future__ import annotations

import contextlib
import json
import os
import tarfile
import zlib
from collections import Counter
from collections.abc import Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field

from mico_ds.data import schema
from mico_ds.data.io import read_sizes, split_member_name

SIZES = schema.SIZES_FILE  # the source names, as reported in CorpusSizes.sources
STATS = "*_stats.json"
COUNTED = "counted"
STATS_SUFFIX = "_stats.json"  # img2dataset / video2dataset: 00012.tar -> 00012_stats.json


def is_remote(url: str) -> bool:
    """A URL this module will not open: a ``pipe:`` command or a ``scheme://`` address."""
    return url.startswith("pipe:") or "://" in url


def _stem(name: str) -> str:
    for ext in (".tar.gz", ".tgz", ".tar"):
        if name.endswith(ext):
            return name[: -len(ext)]
    return name


def read_stats(path: str) -> int | None:
    """``successes`` of an img2dataset / video2dataset ``*_stats.json``; None if unreadable or absent."""
    try:
        with open(path) as f:
            stats = json.load(f)
    except (OSError, ValueError):
        return None
    n = stats.get("successes") if isinstance(stats, dict) else None
    return n if isinstance(n, int) and not isinstance(n, bool) and n >= 0 else None


def count_samples(path: str | os.PathLike) -> int:
    """Samples of one local tar, counted from its member headers (the data is seeked over, not read).

    Raises:
        ValueError: naming the file and what is wrong with it (not a tar, truncated, unreadable).
    """
    n, last = 0, None
    try:
        mode = "r:gz" if str(path).endswith((".tar.gz", ".tgz")) else "r:"  # r: seeks over member data
        with open(path, "rb") as f, tarfile.open(fileobj=f, mode=mode) as tf:
            while (ti := tf.next()) is not None:
                tf.members.clear()  # tarfile keeps every header it has read: not needed here
                if not ti.isfile():
                    continue
                key, ext = split_member_name(ti.name)
                if not ext or os.path.basename(key).startswith("__"):
                    continue
                if key != last:
                    n, last = n + 1, key
    except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
        raise ValueError(f"{path}: not a readable tar: {type(e).__name__}: {e}") from None
    return n


def _count_one(path: str) -> tuple[str, int | None, str | None]:
    try:
        return path, count_samples(path), None
    except ValueError as e:
        return path, None, str(e)


def count_shards(
    paths: Sequence[str], *, workers: int = 1, progress: bool = False
) -> tuple[dict[str, int], dict[str, str]]:
    """Count the samples of local tars, in ``workers`` processes (one shard at a time each).

    Returns ``({path: samples}, {path: error})``: a shard that cannot be read is an error entry,
    never an exception, so one bad shard does not lose the others' counts.
    """
    from tqdm import tqdm

    counts: dict[str, int] = {}
    errors: dict[str, str] = {}
    parallel = workers > 1 and len(paths) > 1
    with (
        ProcessPoolExecutor(min(workers, len(paths))) if parallel else contextlib.nullcontext() as pool,
        tqdm(total=len(paths), unit="shard", disable=not progress or None, desc="counting") as bar,
    ):
        chunk = max(1, min(64, len(paths) // (workers * 8)))
        results: Iterable = map(_count_one, paths)
        if parallel:
            results = pool.map(_count_one, paths, chunksize=chunk)
        for path, n, err in results:
            counts.update({path: n} if n is not None else {})
            errors.update({path: err} if err is not None else {})
            bar.update(1)
    return counts, errors


@dataclass
class CorpusSizes:
    """Samples per shard URL and the source of each figure; what could not be sized, and why."""

    sizes: dict[str, int] = field(default_factory=dict)
    sources: dict[str, str] = field(default_factory=dict)  # url -> SIZES | STATS | COUNTED
    unsized: dict[str, str] = field(default_factory=dict)  # url -> why (remote, not indexed, error)

    @property
    def total(self) -> int:
        """Samples of the sized shards."""
        return sum(self.sizes.values())

    @property
    def complete(self) -> bool:
        return not self.unsized

    def by_source(self) -> dict[str, int]:
        """Shards per source, in the order the sources are tried."""
        n = Counter(self.sources.values())
        return {s: n[s] for s in (SIZES, STATS, COUNTED) if n[s]}

    def describe(self) -> str:
        """``'2,048 samples (8 shards from sizes.json)'``; unsized shards named by count."""
        parts = [
            f"{n} shard{'s' if n != 1 else ''} " + ("counted" if s == COUNTED else f"from {s}")
            for s, n in self.by_source().items()
        ]
        if self.unsized:
            parts.append(f"{len(self.unsized)} unsized")
        prefix = "" if self.complete else "at least "
        return f"{prefix}{self.total:,} samples ({', '.join(parts) or 'no shards'})"

    def short(self) -> str:
        """``'2,048 samples (sizes.json)'``, for a log line."""
        tail = "" if self.complete else f"; {len(self.unsized)} shard(s) unsized"
        prefix = "" if self.complete else "at least "
        return f"{prefix}{self.total:,} samples ({', '.join(self.by_source())}{tail})"


def corpus_sizes(
    urls: Sequence[str], *, open_missing: bool = True, workers: int = 1, progress: bool = False
) -> CorpusSizes:
    """Samples per shard of ``urls`` (expanded URLs, as :func:`mico_ds.data.io.expand_urls` gives).

    Each shard directory's ``sizes.json`` is read once, its listing taken once (for ``*_stats.json``)
    only when ``sizes.json`` misses a shard. With ``open_missing`` the local shards no index knows are
    counted (:func:`count_shards`, ``workers`` processes); without, they are left in ``unsized``.
    """
    out = CorpusSizes()
    by_dir: dict[str, list[str]] = {}
    for u in urls:
        if is_remote(u):
            out.unsized[u] = "remote URL (not opened)"
        else:
            by_dir.setdefault(os.path.dirname(u), []).append(u)
    to_count: list[str] = []
    for d, members in by_dir.items():
        index = read_sizes(d or ".")
        listing: set[str] | None = None
        for u in members:
            name = os.path.basename(u)
            n = index.get(name)
            if n is not None:
                out.sizes[u], out.sources[u] = n, SIZES
                continue
            if listing is None:
                try:
                    listing = set(os.listdir(d or "."))
                except OSError:
                    listing = set()
            stats = _stem(name) + STATS_SUFFIX
            n = read_stats(os.path.join(d, stats)) if stats in listing else None
            if n is not None:
                out.sizes[u], out.sources[u] = n, STATS
            elif open_missing:
                to_count.append(u)
            else:
                out.unsized[u] = "not indexed (no sizes.json entry, no *_stats.json)"
    if to_count:
        counts, errors = count_shards(to_count, workers=workers, progress=progress)
        for u in to_count:  # in URL order, as the rest
            if u in counts:
                out.sizes[u], out.sources[u] = counts[u], COUNTED
            else:
                out.unsized[u] = errors[u]
    return out
