"""Resampled streams (``data.corpora[].resampled``): shards drawn with replacement per stream and
epoch, seeded, independent per stream, and positions that resume exactly (docs/data.md, "Resampled
streams"). The kill -9 case in fresh processes is tests/integration/test_loader_resume.py."""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from mico_ds.config import CorpusConfig, DataConfig, InputConfig
from mico_ds.data import schema
from mico_ds.data.read.loader import CorpusLoader
from mico_ds.data.read.plan import StreamPlan
from mico_ds.data.write import media
from mico_ds.data.write.tar import write_tar

INP = InputConfig(image_size=16)


def draws(plan: StreamPlan, stream: int, epoch: int) -> list[str]:
    """The draws computed directly: what the plan promises."""
    rng = np.random.default_rng([plan.seed, plan.salt, epoch, stream, 3])
    return [plan.urls[i] for i in rng.integers(len(plan.urls), size=plan.draws_per_epoch)]


def test_draws_are_seeded_with_replacement_and_independent_per_stream() -> None:
    urls = tuple(f"u{i}" for i in range(10))
    plan = StreamPlan(urls, num_streams=4, seed=7, salt=11, shards_per_chunk=2, resampled=True)
    assert not plan.split_by_sample
    assert plan.draws_per_epoch == 3  # ceil(10 / 4) >= 2 shards per chunk
    epochs = [[plan.epoch_shards(s, e) for s in range(4)] for e in range(200)]
    assert all(ep[s] == draws(plan, s, e) for e, ep in enumerate(epochs) for s in range(4))
    assert plan.chunks(1, 5) == [epochs[5][1][:2], epochs[5][1][2:]]
    assert all(plan.shards_per_epoch(s) == 3 for s in range(4))
    # With replacement: some stream draws a shard twice in one epoch, and streams are not a partition.
    assert any(len(set(d)) < len(d) for ep in epochs for d in ep)
    assert any(set(ep[0]) & set(ep[1]) for ep in epochs)
    assert epochs[0][0] != epochs[0][1] and epochs[0][0] != epochs[1][0]
    # Uniform over the shards: 2400 draws, 240 expected each (sd about 15).
    counts = Counter(u for ep in epochs for d in ep for u in d)
    assert set(counts) == set(urls) and all(170 < n < 310 for n in counts.values()), counts
    # Seeded: the same plan draws the same, another seed or salt draws otherwise.
    assert (
        StreamPlan(urls, 4, seed=7, salt=11, shards_per_chunk=2, resampled=True).epoch_shards(2, 3)
        == epochs[3][2]
    )
    assert (
        StreamPlan(urls, 4, seed=8, salt=11, shards_per_chunk=2, resampled=True).epoch_shards(2, 3)
        != epochs[3][2]
    )
    assert (
        StreamPlan(urls, 4, seed=7, salt=12, shards_per_chunk=2, resampled=True).epoch_shards(2, 3)
        != epochs[3][2]
    )


def test_shards_per_epoch_matches_the_epochs() -> None:
    for n, streams, resampled in [(10, 4, False), (3, 8, False), (3, 8, True), (100_000, 16, True)]:
        plan = StreamPlan(tuple(f"u{i}" for i in range(n)), streams, shards_per_chunk=4, resampled=resampled)
        for s in (0, streams - 1):
            assert plan.shards_per_epoch(s) == len(plan.epoch_shards(s, 0)), (n, streams, resampled, s)
    # Fewer shards than streams: no split by sample, each stream draws whole shards.
    assert StreamPlan(("a", "b"), 8, shards_per_chunk=1, resampled=True).draws_per_epoch == 1


@pytest.fixture
def shards(tmp_path: Path) -> tuple[str, ...]:
    """Three shards of unequal sizes (5, 3, 4 samples) with txt members only (the plan reads, never
    decodes)."""
    urls = []
    for s, n in enumerate([5, 3, 4]):
        path = tmp_path / f"r-{s}.tar"
        write_tar(path, [(f"s{s}k{i}", {"txt": f"{s} {i}".encode()}) for i in range(n)])
        urls.append(str(path))
    return tuple(urls)


def test_items_are_whole_drawn_shards_and_resume_from_any_position(shards: tuple[str, ...]) -> None:
    plan = StreamPlan(shards, num_streams=2, seed=3, shards_per_chunk=1, shuffle_buffer=3, resampled=True)
    assert plan.draws_per_epoch == 2  # two chunks of one shard per epoch
    for stream in range(2):
        it = plan.items(stream, (0, 0, 0), infinite=True)
        full = [next(it) for _ in range(60)]
        # Each epoch is exactly the samples of its drawn shards (a shard drawn twice: its samples twice).
        by_epoch: dict[int, Counter] = {}
        for (e, _, _), item in full:
            by_epoch.setdefault(e, Counter())[item["__key__"]] += 1
        for e in list(by_epoch)[:-1]:  # the last epoch may be cut by the 60
            want = Counter(f"s{shards.index(u)}k{i}" for u in draws(plan, stream, e)
                           for i in range([5, 3, 4][shards.index(u)]))  # fmt: skip
            assert by_epoch[e] == want, (stream, e)
        assert len(by_epoch) >= 6
        # Resuming from the position after any item gives the items an uninterrupted stream gives next.
        for k in (0, 4, 11, 23, 38):
            (e, c, i), _ = full[k]
            resumed = plan.items(stream, (e, c, i + 1), infinite=True)
            assert [next(resumed)[1]["__key__"] for _ in range(15)] == [
                x["__key__"] for _, x in full[k + 1 : k + 16]
            ]


def test_a_resampled_corpus_of_empty_shards_raises(tmp_path: Path) -> None:
    for s in range(3):
        write_tar(tmp_path / f"e-{s}.tar", [])
    urls = tuple(str(tmp_path / f"e-{s}.tar") for s in range(3))
    plan = StreamPlan(urls, num_streams=2, shards_per_chunk=1, resampled=True)
    with pytest.raises(ValueError, match="no samples in any of the 3 shards.*every shard drawn"):
        next(plan.items(0, (0, 0, 0), infinite=True))


def image_corpus(root: Path) -> None:
    """Two shards of 3 and 5 tiny JPEG + txt samples (unequal on purpose)."""
    rng = np.random.default_rng(0)
    for s, n in enumerate([3, 5]):
        write_tar(root / f"img-{s}.tar", [
            (f"i{s}k{i}", {"jpg": media.encode_jpeg(rng.integers(0, 255, (12, 12, 3), dtype=np.uint8)),
                           "txt": f"picture {s} {i}".encode()})
            for i in range(n)
        ])  # fmt: skip


def test_corpus_loader_resumes_exactly_and_survives_another_world_size(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    image_corpus(tmp_path)
    corpus = CorpusConfig(
        name="img", shards="img-{0..1}.tar", modalities=["image"], batch_size=3, resampled=True
    )
    data = DataConfig(root=str(tmp_path), tokenizer="", num_workers=0, shuffle_buffer=4, shards_per_chunk=1)

    def make(rank: int = 0, world: int = 1) -> CorpusLoader:
        return CorpusLoader(corpus, INP, data, seed=5, rank=rank, world_size=world)

    def keys(loader: CorpusLoader, n: int) -> list[list[str]]:
        return [next(loader)[schema.KEYS] for _ in range(n)]

    full = make()
    assert full.plan.resampled and full.plan.draws_per_epoch == 2
    want = keys(full, 9)
    first = make()
    head = keys(first, 4)
    state = json.loads(json.dumps(first.state_dict()))
    resumed = make()
    resumed.load_state_dict(state)
    assert head + keys(resumed, 5) == want
    flat = [k for b in want for k in b]
    assert len(flat) > len(set(flat))  # 27 draws of 8 samples: repeats
    # Elastic: two ranks (2 streams for 2 shards, no split by sample) from a one-rank state: new
    # draws, no error, each rank gets whole shards' samples.
    with caplog.at_level(logging.WARNING):
        for rank in range(2):
            other = make(rank, 2)
            other.load_state_dict(state)
            assert not other.plan.split_by_sample
            got = keys(other, 3)
            assert all(k.startswith(("i0k", "i1k")) for b in got for k in b)
    assert "exact resume impossible" in caplog.text
