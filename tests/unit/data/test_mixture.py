"""Corpus schedule (appendix B.2), joined samples (MiCo Eq. 3), mixture state, builders."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from mico_ds.config import CorpusConfig, load_config
from mico_ds.data import schema
from mico_ds.data.io import expand_urls, iter_tar
from mico_ds.data.read.decode import caption_fields, join_captions
from mico_ds.data.read.loader import CorpusLoader
from mico_ds.data.read.mixture import (
    MixtureLoader,
    Schedule,
    build_corpus_loader,
    build_eval_loader,
    build_train_loader,
    step_counts,
)
from mico_ds.data.tokenizer import Tokenizer
from mico_ds.demo.corpus import make_demo_corpus


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("demo")
    make_demo_corpus(
        out, num_train=16, num_val=8, samples_per_shard=4, image_size=32, num_frames=4, audio_seconds=1.0,
        num_single_pair=8, vocab_size=300, progress=False,
    )  # fmt: skip
    return out


def demo_cfg(root: Path, *overrides: str):
    base = [
        f"data.root={root}", f"data.tokenizer={root}/tokenizer/tokenizer.model", "data.num_workers=0",
        "data.shuffle_buffer=4", "train.max_steps=40", "eval.batch_size=3",
    ]  # fmt: skip
    cfg = load_config("demo", base + list(overrides))
    for c in cfg.data.corpora:
        c.batch_size = 2
    return cfg


# ----------------------------------------------------------------------------- schedule


def C(name: str, steps: int | None = None, weight: float = 1.0) -> CorpusConfig:
    return CorpusConfig(name=name, shards="x", steps=steps, weight=weight)


def test_step_counts() -> None:
    # The paper's appendix B.2 mix: 160k + 70k + 70k steps.
    assert step_counts([C("vast", 160_000), C("valor", 70_000), C("mix", 70_000)], 300_000) == [
        160_000,
        70_000,
        70_000,
    ]
    assert step_counts([C("a", weight=3), C("b", weight=1), C("c", weight=0)], 10) == [8, 2, 0]
    assert step_counts([C("a", 4), C("b", weight=1), C("c", weight=1)], 10) == [4, 3, 3]
    assert sum(step_counts([C("a", weight=1), C("b", weight=2)], None)) == 1000
    with pytest.raises(ValueError, match="max_steps"):
        step_counts([C("a", 4), C("b")], None)
    with pytest.raises(ValueError, match="total_steps=10"):
        step_counts([C("a", 10), C("b")], 10)
    with pytest.raises(ValueError, match="no corpus gets a step"):
        step_counts([C("a", weight=0)], 10)


def test_schedule_exact_counts_and_pure() -> None:
    counts = [5, 3, 0, 2]
    s = Schedule(counts, seed=4)
    for period in range(3):
        got = Counter(s(period * 10 + i) for i in range(10))
        assert [got[i] for i in range(4)] == counts
    orders = [[s(p * 10 + i) for i in range(10)] for p in range(3)]
    assert orders[0] != orders[1] or orders[1] != orders[2]  # periods are reshuffled
    # A pure function of (seed, step): another instance, queried in another order, agrees.
    t = Schedule(counts, seed=4)
    steps = list(range(40))
    np.random.default_rng(0).shuffle(steps)
    assert [t(i) for i in steps] == [s(i) for i in steps]
    assert [Schedule(counts, seed=5)(i) for i in range(30)] != [s(i) for i in range(30)]
    for n in (0, 7, 10, 23):
        assert s.counts_before(n) == [sum(1 for i in range(n) if s(i) == c) for c in range(4)]


# ----------------------------------------------------------------------------- mixture


def test_mixture_follows_the_schedule_and_resumes(demo: Path) -> None:
    cfg = demo_cfg(demo, "train.max_steps=10")
    cfg.data.corpora[0].steps = 6  # omni
    cfg.data.corpora[4].steps = 4  # joined
    ranks = [build_train_loader(cfg, rank=r, world_size=2) for r in range(2)]
    seqs = [[next(ld)[schema.CORPUS] for _ in range(10)] for ld in ranks]
    assert seqs[0] == seqs[1]  # every rank draws the same corpus at the same step
    assert Counter(seqs[0]) == {"omni": 6, "joined": 4}
    assert seqs[0] == [ranks[0].names[ranks[0].schedule(i)] for i in range(10)]

    def run(n: int, state: dict | None = None) -> tuple[list, dict]:
        ld = build_train_loader(cfg, rank=0, world_size=1)
        if state is not None:
            ld.load_state_dict(state)
        out = []
        for _ in range(n):
            b = next(ld)
            out.append((b[schema.CORPUS], b[schema.KEYS], float(b["image"].sum())))
        return out, json.loads(json.dumps(ld.state_dict()))

    full, _ = run(9)
    head, state = run(4)
    tail, _ = run(5, state)
    assert head + tail == full
    assert state["step"] == 4 and set(state["corpora"]) == {"omni", "joined"}


def test_mixture_needs_a_loader_per_scheduled_corpus() -> None:
    with pytest.raises(ValueError, match="no loader"):
        MixtureLoader({}, [C("a", 3)], seed=0)


# ----------------------------------------------------------------------------- joined samples


def shard_captions(root: Path, pattern: str) -> dict[str, dict[str, str]]:
    return {s["__key__"]: caption_fields(s) for u in expand_urls(pattern, str(root)) for s in iter_tar(u)}


def test_joined_samples_carry_their_sources(demo: Path) -> None:
    cfg = demo_cfg(demo, "data.text_max_len=512")  # no caption is cut: every source keeps its span
    tok = Tokenizer.from_path(cfg.data.tokenizer)
    by_name = {c.name: c for c in cfg.data.corpora}
    joined = build_corpus_loader(
        by_name["joined"], by_name, cfg.inputs, cfg.data, seed=0, tokenizer=cfg.data.tokenizer
    )
    caps = {}
    for name in ("image_text", "audio_text", "video_text"):
        caps[name] = shard_captions(demo, by_name[name].shards)
    for _ in range(3):
        b = next(joined)
        assert b[schema.CORPUS] == "joined"
        assert set(b) >= {"image", "video", "audio", schema.TEXT_IDS, schema.TEXT_MASK}
        assert "depth" not in b and "normal" not in b
        assert b["image"].shape == (2, 3, 32, 32) and b["video"].shape[1:3] == (cfg.inputs.num_frames, 3)
        # Modalities present, in MODALITIES order: image, video, audio -> source ids 1, 3, 2.
        assert torch.equal(b[schema.SAMPLE_SOURCE], torch.tensor([[1, 3, 2]] * 2))
        # One source group per joined sample, from all of its parts.
        assert b[schema.SOURCE_GROUP].shape == (2,) and len(set(b[schema.SOURCE_GROUP].tolist())) == 2
        for key, caption in zip(b[schema.KEYS], b[schema.CAPTIONS]):
            ki, ka, kv = key.split("+")  # one pair from each source, in joined_from order
            fi, fa, fv = caps["image_text"][ki], caps["audio_text"][ka], caps["video_text"][kv]
            expected = {"vision": f"{fi['vision']}{schema.CAPTION_SEP}{fv['vision']}", "audio": fa["audio"]}
            assert caption == join_captions(expected)  # vision (image, then video) before audio: Eq. 2
        # text_source: each source's token span decodes to its own caption (the separator before it
        # goes with it); the spans come in join order, and padding is 0.
        src, ids, mask = b[schema.TEXT_SOURCE], b[schema.TEXT_IDS], b[schema.TEXT_MASK]
        assert src.shape == ids.shape and src.dtype == torch.int64
        for row, key in enumerate(b[schema.KEYS]):
            ki, ka, kv = key.split("+")
            want = {
                1: caps["image_text"][ki]["vision"],
                3: caps["video_text"][kv]["vision"],
                2: caps["audio_text"][ka]["audio"],
            }
            n = int(mask[row].sum())
            assert torch.unique_consecutive(src[row, :n]).tolist() == [1, 3, 2]
            assert (src[row, n:] == 0).all()
            for sid, text in want.items():
                span = tok.decode(ids[row, :n][src[row, :n] == sid]).strip()
                assert span.removeprefix(schema.CAPTION_SEP.strip()).strip() == text, (sid, span, text)


def test_joined_corpus_validates_modalities(demo: Path) -> None:
    cfg = demo_cfg(demo)
    by_name = {c.name: c for c in cfg.data.corpora}
    bad = CorpusConfig(name="j", joined_from=["image_text", "audio_text"], modalities=["image"], batch_size=2)
    with pytest.raises(ValueError, match="declares modalities"):
        build_corpus_loader(bad, by_name, cfg.inputs, cfg.data, seed=0, tokenizer=None)
    twice = CorpusConfig(
        name="j", joined_from=["image_text", "image_text"], modalities=["image"], batch_size=2
    )
    with pytest.raises(ValueError, match="comes from two sources"):
        build_corpus_loader(twice, by_name, cfg.inputs, cfg.data, seed=0, tokenizer=None)


# ----------------------------------------------------------------------------- builders


def test_build_loaders_from_the_demo_recipe(demo: Path) -> None:
    assert set(build_train_loader(demo_cfg(demo), rank=0, world_size=1).loaders) == {"omni"}  # as shipped
    cfg = demo_cfg(demo, "data.corpora.4.weight=1")  # the joined corpus on
    mix = build_train_loader(cfg, rank=0, world_size=1)
    assert set(mix.loaders) == {"omni", "joined"}  # weight-0 single-pair corpora only feed the join
    assert isinstance(mix.loaders["omni"], CorpusLoader)
    b = next(mix)
    assert b[schema.TEXT_IDS].shape[0] == 2
    counts = mix.skip_counts()
    assert counts[f"{b[schema.CORPUS]}/seen"] >= 2
    ev = build_eval_loader(cfg, rank=1, world_size=2)
    keys = [k for batch in ev for k in batch[schema.KEYS]]
    assert len(keys) == 4 and all(k.startswith("omni-val") for k in keys)
