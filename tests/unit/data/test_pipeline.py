"""Shard streams: URL expansion, tar reading, batches per schema, bad data, sharding, exact resume."""

from __future__ import annotations

import io
import json
import logging
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from mico_ds.config import CorpusConfig, DataConfig, InputConfig
from mico_ds.data import schema
from mico_ds.data.io import expand_urls, iter_tar
from mico_ds.data.read.loader import CorpusLoader, EvalLoader
from mico_ds.data.read.plan import StreamPlan
from mico_ds.data.write import media as media
from mico_ds.demo.corpus import make_demo_corpus

INP = InputConfig(image_size=32, num_frames=4, mel_bins=32, clip_frames=48, num_clips=2)
OMNI = list(schema.MODALITIES)


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny demo corpus (16 omni train samples in 4 shards, 8 val in 2)."""
    out = tmp_path_factory.mktemp("demo")
    make_demo_corpus(
        out, num_train=16, num_val=8, samples_per_shard=4, image_size=32, num_frames=4, audio_seconds=1.0,
        num_single_pair=8, vocab_size=300, progress=False,
    )  # fmt: skip
    return out


def data_cfg(root: Path, **kw) -> DataConfig:
    base = dict(root=str(root), tokenizer=str(root / "tokenizer" / "tokenizer.model"), text_max_len=32,
                num_workers=0, shuffle_buffer=5, shards_per_chunk=2)  # fmt: skip
    base.update(kw)
    return DataConfig(**base)


def write_tar(path: Path, samples: list[tuple[str, dict[str, bytes]]]) -> Path:
    with tarfile.open(path, "w") as tf:
        for key, members in samples:
            for ext, data in members.items():
                ti = tarfile.TarInfo(f"{key}.{ext}")
                ti.size = len(data)
                tf.addfile(ti, io.BytesIO(data))
    return path


def checksum(batch: dict) -> list[float]:
    return [float(batch[m].double().sum()) for m in schema.MODALITIES if m in batch]


def take(loader, n: int) -> list[tuple[list[str], list[float]]]:
    out = []
    for _ in range(n):
        b = next(loader)
        out.append((b[schema.KEYS], checksum(b)))
    return out


# ----------------------------------------------------------------------------- URLs and tars


def test_expand_urls(tmp_path: Path) -> None:
    for i in range(3):
        write_tar(tmp_path / f"c-{i:03d}.tar", [(f"k{i}", {"txt": b"x"})])
    names = [str(tmp_path / f"c-{i:03d}.tar") for i in range(3)]
    assert expand_urls("c-{000..002}.tar", str(tmp_path)) == names
    assert expand_urls("c-*.tar", str(tmp_path)) == names
    assert expand_urls(str(tmp_path)) == names
    assert expand_urls(["c-000.tar", "c-002.tar"], str(tmp_path)) == [names[0], names[2]]
    assert expand_urls("c-000.tar::c-001.tar", str(tmp_path)) == names[:2]
    assert expand_urls("pipe:cat x-{0..1}.tar", str(tmp_path)) == ["pipe:cat x-0.tar", "pipe:cat x-1.tar"]
    with pytest.raises(ValueError, match=r"7 of 10 shards of 'c-\{000..009\}.tar' not found.*c-003.tar"):
        expand_urls("c-{000..009}.tar", str(tmp_path))
    with pytest.raises(ValueError, match="matches no file"):
        expand_urls("nothing-*.tar", str(tmp_path))


def test_iter_tar_groups_members_and_reads_pipes(tmp_path: Path) -> None:
    p = write_tar(tmp_path / "a.tar", [("d/k1", {"jpg": b"1", "depth.png": b"2"}), ("d/k2", {"txt": b"3"})])
    direct = list(iter_tar(str(p)))
    assert [(s["__key__"], sorted(k for k in s if not k.startswith("__"))) for s in direct] == [
        ("d/k1", ["depth.png", "jpg"]),
        ("d/k2", ["txt"]),
    ]
    piped = list(iter_tar(f"pipe:cat {p}"))
    assert [s["__key__"] for s in piped] == ["d/k1", "d/k2"] and piped[0]["depth.png"] == b"2"
    failing = list(iter_tar("pipe:exit 3"))
    assert [s.get("__error__") for s in failing] == ["shard_error"]
    (tmp_path / "junk.tar").write_bytes(b"this is not a tar" * 100)
    assert [s.get("__error__") for s in iter_tar(str(tmp_path / "junk.tar"))] == ["shard_error"]


def truncated_tar(path: Path, samples: list[tuple[str, dict[str, bytes]]]) -> Path:
    """A tar cut in the middle of the last sample's first member."""
    write_tar(path, samples)
    with tarfile.open(path) as tf:
        last = [m for m in tf.getmembers() if m.name.startswith(samples[-1][0] + ".")][0]
    data = path.read_bytes()
    path.write_bytes(data[: last.offset_data + max(1, last.size // 2)])
    return path


def test_truncated_tar_yields_what_it_can(tmp_path: Path) -> None:
    blob = b"x" * 3000
    p = truncated_tar(tmp_path / "t.tar", [(f"k{i}", {"txt": b"cap", "jpg": blob}) for i in range(3)])
    items = list(iter_tar(str(p)))
    assert [s["__key__"] for s in items[:-1]] == ["k0", "k1"]
    assert items[-1]["__error__"] == "truncated_tar"


# ----------------------------------------------------------------------------- batches


def test_batches_follow_the_schema(demo: Path) -> None:
    corpus = CorpusConfig(name="omni", shards="omni/train-*.tar", modalities=OMNI, batch_size=3)
    loader = CorpusLoader(corpus, INP, data_cfg(demo), seed=0, rank=0, world_size=1)
    b = next(loader)
    assert b["image"].shape == (3, 3, 32, 32) and b["image"].dtype == torch.float32
    assert b["video"].shape == (3, 4, 3, 32, 32)
    assert b["audio"].shape == (3, 2, 1, 32, 48)
    assert b["depth"].shape == (3, 1, 32, 32)
    assert b["normal"].shape == (3, 3, 32, 32) and b["normal"].abs().max() <= 1.0
    assert b[schema.TEXT_IDS].dtype == torch.int64 and b[schema.TEXT_IDS].shape[0] == 3
    assert b[schema.TEXT_MASK].shape == b[schema.TEXT_IDS].shape and b[schema.TEXT_MASK][:, 0].all()
    assert torch.equal(b[schema.SAMPLE_SOURCE], torch.zeros(3, 5, dtype=torch.int64))
    assert b[schema.CORPUS] == "omni" and len(set(b[schema.KEYS])) == 3
    assert all(schema.CAPTION_SEP in c for c in b[schema.CAPTIONS])  # vision ; audio ; subtitle ; depth
    assert not [k for k in b if k.startswith("_")]
    # The captions are tokenized: decoding the ids gives the caption text back.
    from mico_ds.data.tokenizer import Tokenizer

    tok = Tokenizer.from_path(demo / "tokenizer" / "tokenizer.model")
    assert tok.decode(b[schema.TEXT_IDS][0]).split()[:3] == b[schema.CAPTIONS][0].split()[:3]


def test_img2dataset_layout_loads(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    for s in range(2):
        samples = []
        for i in range(4):
            meta = {"url": f"http://example.com/{s}/{i}.jpg", "key": f"{s}{i:04d}", "status": "success"}
            samples.append((f"{s}{i:04d}", {
                "jpg": media.encode_jpeg(rng.integers(0, 255, (50, 70, 3), dtype=np.uint8)),
                "txt": f"photo {s} {i}".encode(),
                "json": json.dumps(meta).encode(),
            }))  # fmt: skip
        write_tar(tmp_path / f"{s:05d}.tar", samples)
    corpus = CorpusConfig(name="laion", shards="{00000..00001}.tar", modalities=["image"], batch_size=4)
    loader = CorpusLoader(corpus, INP, data_cfg(tmp_path, tokenizer=""), seed=0, rank=0, world_size=1)
    b1, b2 = next(loader), next(loader)
    assert b1["image"].shape == (4, 3, 32, 32)
    assert sorted(b1[schema.CAPTIONS] + b2[schema.CAPTIONS]) == sorted(
        f"photo {s} {i}" for s in range(2) for i in range(4)
    )


# ----------------------------------------------------------------------------- bad data


def bad_data_shards(root: Path) -> list[str]:
    frames = np.stack([np.full((32, 32, 3), 40 * i, np.uint8) for i in range(6)])
    good = {"jpg": media.encode_jpeg(frames[0]), "mp4": media.encode_mp4(frames),
            "json": json.dumps({"captions": {"vision": "grey"}}).encode()}  # fmt: skip
    write_tar(root / "bad-0.tar", [
        ("good0", dict(good)),
        ("zero_jpeg", {**good, "jpg": b""}),
        ("bad_json", {**good, "json": b'{"captions": '}),
        ("fake_mp4", {**good, "mp4": b"\x00\x00\x00\x20ftypisom" + b"\x11" * 500}),
        ("no_video", {k: v for k, v in good.items() if k != "mp4"}),
        ("good1", dict(good)),
    ])  # fmt: skip
    truncated_tar(root / "bad-1.tar", [("good2", dict(good)), ("good3", dict(good)), ("cut", dict(good))])
    return ["bad-0.tar", "bad-1.tar"]


def test_corrupt_inputs_are_skipped_and_counted(tmp_path: Path) -> None:
    shards = bad_data_shards(tmp_path)
    ev = EvalLoader(shards, ["image", "video"], INP, data_cfg(tmp_path, tokenizer="", max_skip_rate=1.0),
                    batch_size=4, rank=0, world_size=1)  # fmt: skip
    keys = [k for b in ev for k in b[schema.KEYS]]
    assert sorted(keys) == ["good0", "good1", "good2", "good3"]
    st = ev.skip_stats()
    assert st["skipped"] == {
        "bad_image": 1, "bad_json": 1, "bad_video": 1, "missing_modality": 1, "truncated_tar": 1,
    }  # fmt: skip
    assert st["seen"] == 9
    assert st["examples"]["bad_video"] == ["fake_mp4"] and st["examples"]["bad_image"] == ["zero_jpeg"]


@pytest.mark.parametrize("num_workers", [0, 1])
def test_skip_rate_bound_raises(tmp_path: Path, num_workers: int) -> None:
    shards = bad_data_shards(tmp_path)
    corpus = CorpusConfig(name="dirty", shards="::".join(shards), modalities=["image", "video"], batch_size=2)
    data = data_cfg(tmp_path, tokenizer="", max_skip_rate=0.2, min_samples_for_skip_rate=8)
    loader = CorpusLoader(corpus, INP, data, seed=0, rank=0, world_size=1, num_workers=num_workers)
    with pytest.raises(ValueError) as e:
        for _ in range(20):
            next(loader)
    msg = str(e.value)
    assert "'dirty'" in msg and "data.max_skip_rate" in msg
    assert "bad_video" in msg and "fake_mp4" in msg


def test_all_bad_corpus_raises_instead_of_hanging(tmp_path: Path) -> None:
    write_tar(tmp_path / "x.tar", [(f"k{i}", {"jpg": b"", "txt": b"c"}) for i in range(5)])
    corpus = CorpusConfig(name="broken", shards="x.tar", modalities=["image"], batch_size=2)
    data = data_cfg(tmp_path, tokenizer="", min_samples_for_skip_rate=10)
    loader = CorpusLoader(corpus, INP, data, seed=0, rank=0, world_size=1, num_workers=1)
    with pytest.raises(ValueError, match="'broken'.*bad_image"):
        next(loader)


# ----------------------------------------------------------------------------- sharding


def test_fewer_shards_than_streams_splits_by_sample(tmp_path: Path) -> None:
    write_tar(tmp_path / "s-0.tar", [(f"a{i}", {"txt": b"c"}) for i in range(7)])
    write_tar(tmp_path / "s-1.tar", [(f"b{i}", {"txt": b"c"}) for i in range(6)])
    urls = tuple(expand_urls("s-{0..1}.tar", str(tmp_path)))
    plan = StreamPlan(urls, num_streams=4, seed=3, shuffle_buffer=4, shards_per_chunk=1)
    assert plan.split_by_sample
    per_stream = [[it["__key__"] for _, it in plan.items(s, (0, 0, 0), infinite=False)] for s in range(4)]
    flat = [k for ks in per_stream for k in ks]
    assert sorted(flat) == sorted([f"a{i}" for i in range(7)] + [f"b{i}" for i in range(6)])  # each once
    assert all(len(ks) >= 2 for ks in per_stream)


def test_split_by_sample_is_exactly_balanced_over_the_run_and_resumes(tmp_path: Path) -> None:
    """8 shards of 3 over 16 streams, 4 shards a chunk (12 items a chunk): every epoch each item goes
    to one stream and each stream keeps 1 or 2 (a rotation by the chunk index left 3 with none, which
    stopped the run). 4 shards (12 items) over 16 streams: streams 12-15 keep nothing in epoch 0 and
    are fed in epoch 1 instead of failing. A stream resumed at any chunk keeps what it kept."""
    for s in range(8):
        write_tar(tmp_path / f"s-{s}.tar", [(f"k{s}_{i}", {"txt": b"c"}) for i in range(3)])
    urls = tuple(expand_urls("s-{0..7}.tar", str(tmp_path)))
    plan = StreamPlan(urls, num_streams=16, seed=3, shuffle_buffer=0, shards_per_chunk=4)

    def keys(p: StreamPlan, s: int, start: tuple, n: int | None = None) -> list[tuple]:
        it = p.items(s, start, infinite=n is not None)
        return [(pos, item["__key__"]) for pos, item in (it if n is None else (next(it) for _ in range(n)))]

    for epoch in range(3):
        per = [keys(plan, s, (epoch, 0, 0)) for s in range(16)]
        assert sorted(k for ks in per for _, k in ks) == sorted(
            f"k{s}_{i}" for s in range(8) for i in range(3)
        )
        assert sorted(len(ks) for ks in per) == [1] * 8 + [2] * 8
    run = keys(plan, 5, (0, 0, 0), n=6)
    for j, (pos, _) in enumerate(run):
        assert keys(plan, 5, pos, n=len(run) - j) == run[j:]  # resumed at (epoch, chunk, emitted)
    small = StreamPlan(urls[:4], num_streams=16, seed=3, shuffle_buffer=0, shards_per_chunk=4)
    assert keys(small, 13, (0, 0, 0)) == []
    (pos, key), *_ = keys(small, 13, (0, 0, 0), n=1)  # no 'found no samples' error: epoch 1 feeds it
    assert pos[0] == 1 and keys(small, 13, pos, n=1) == [(pos, key)]


def test_fewer_shards_than_ranks_x_workers_loader_works(demo: Path, caplog: pytest.LogCaptureFixture) -> None:
    corpus = CorpusConfig(name="val", shards="omni/val-*.tar", modalities=["image"], batch_size=2)
    seen = []
    with caplog.at_level(logging.WARNING):
        for rank in range(2):
            loader = CorpusLoader(corpus, INP, data_cfg(demo), seed=0, rank=rank, world_size=2, num_workers=2)
            seen.append({k for _ in range(2) for k in next(loader)[schema.KEYS]})  # 4 streams x 1 batch
            loader.close()
    assert "every stream reads every shard" in caplog.text
    assert not seen[0] & seen[1] and len(seen[0] | seen[1]) == 8  # 8 val samples, each once


def test_epochs_reshuffle_shards_and_seed_matters(tmp_path: Path) -> None:
    urls = tuple(f"u{i}" for i in range(8))
    plan = StreamPlan(urls, num_streams=2, seed=0)
    assert plan.epoch_shards(0, 0) != plan.epoch_shards(0, 1)
    assert sorted(plan.epoch_shards(0, 0) + plan.epoch_shards(1, 0)) == sorted(urls)  # disjoint cover
    assert StreamPlan(urls, num_streams=2, seed=1).epoch_shards(0, 0) != plan.epoch_shards(0, 0)


# ----------------------------------------------------------------------------- resume


@pytest.mark.parametrize("num_workers", [0, 1, 2])
def test_resume_is_exact_across_epochs(demo: Path, num_workers: int) -> None:
    corpus = CorpusConfig(name="omni", shards="omni/train-*.tar", modalities=OMNI, batch_size=3)
    data = data_cfg(demo)

    def make() -> CorpusLoader:
        return CorpusLoader(corpus, INP, data, seed=5, rank=0, world_size=1, num_workers=num_workers)

    k, m = 5, 4  # 27 samples of a 16-sample corpus: the resumed part crosses an epoch boundary
    full = take(make(), k + m)
    first = make()
    head = take(first, k)
    state = json.loads(json.dumps(first.state_dict()))
    first.close()
    resumed = make()
    resumed.load_state_dict(state)
    tail = take(resumed, m)
    assert head + tail == full
    assert max(p[0] for p in resumed.state_dict()["positions"]) >= 1  # really crossed into epoch 1
    assert len({k for keys, _ in full for k in keys}) == 16  # every sample appears


def test_load_state_from_another_topology_restarts_at_next_epoch(
    demo: Path, caplog: pytest.LogCaptureFixture
) -> None:
    corpus = CorpusConfig(name="omni", shards="omni/train-*.tar", modalities=["image"], batch_size=2)
    a = CorpusLoader(corpus, INP, data_cfg(demo), seed=0, rank=0, world_size=1)
    next(a)
    b = CorpusLoader(corpus, INP, data_cfg(demo), seed=0, rank=0, world_size=2)
    with caplog.at_level(logging.WARNING):
        b.load_state_dict(a.state_dict())
    assert "exact resume impossible" in caplog.text
    assert b.state_dict()["positions"] == [[1, 0, 0]]
    with pytest.raises(ValueError, match="corpus"):
        b.load_state_dict({**a.state_dict(), "corpus": "other"})


def test_eval_loader_splits_ranks_and_is_deterministic(demo: Path) -> None:
    data = data_cfg(demo)
    parts = []
    for rank in range(2):
        ev = EvalLoader("omni/val-*.tar", OMNI, INP, data, batch_size=3, rank=rank, world_size=2)
        p1 = [(b[schema.KEYS], checksum(b)) for b in ev]
        p2 = [(b[schema.KEYS], checksum(b)) for b in ev]
        assert p1 == p2  # eval decoding has no randomness
        parts.append([k for keys, _ in p1 for k in keys])
    assert not set(parts[0]) & set(parts[1]) and len(parts[0]) + len(parts[1]) == 8
    capped = EvalLoader(
        "omni/val-*.tar", ["image"], INP, data, batch_size=3, rank=0, world_size=1, max_samples=5
    )
    assert sum(len(b[schema.KEYS]) for b in capped) == 5


def test_training_augmentation_is_seeded(demo: Path) -> None:
    corpus = CorpusConfig(name="omni", shards="omni/train-*.tar", modalities=["image", "audio"], batch_size=4)
    runs = [
        take(CorpusLoader(corpus, INP, data_cfg(demo), seed=s, rank=0, world_size=1), 2) for s in (1, 1, 2)
    ]
    assert runs[0] == runs[1] and runs[0] != runs[2]
    assert Counter(k for keys, _ in runs[0] for k in keys).most_common(1)[0][1] == 1


# ----------------------------------------------------------------------------- tools/inspect_shards.py


def test_inspect_shards_tool(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    import importlib.util

    path = Path(__file__).resolve().parents[3] / "tools" / "inspect_shards.py"
    spec = importlib.util.spec_from_file_location("inspect_shards", path)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    bad_data_shards(tmp_path)
    argv = [
        "bad-{0..1}.tar",
        "--root",
        str(tmp_path),
        "--modalities",
        "image,video",
        "--json",
        "--image-size",
        "16",
    ]
    assert tool.main(argv) == 1  # 5 of 9 skipped > 5 %
    out = json.loads(capsys.readouterr().out)
    assert out["samples"] == 9 and out["decoded"] == {"image": 4, "video": 4, "text": 4}
    assert out["shapes"] == {"image": {"3x16x16": 4}, "video": {"8x3x16x16": 4}}
    assert out["skipped"] == {
        "bad_image": 1, "bad_json": 1, "bad_video": 1, "missing_modality": 1, "truncated_tar": 1,
    }  # fmt: skip
    assert tool.main([*argv, "--max-skip-rate", "0.6"]) == 0
