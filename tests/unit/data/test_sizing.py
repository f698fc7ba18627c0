"""Sizing corpora without opening every tar (sizes.json, img2dataset/video2dataset *_stats.json,
the header count), tools/index_shards.py, and the planning case of tools/bench_loader.py."""

from __future__ import annotations

import importlib.util
import io
import json
import logging
import shutil
import tarfile
from pathlib import Path

import pytest

from mico_ds.cli import index_shards
from mico_ds.config import CorpusConfig, DataConfig
from mico_ds.data import schema
from mico_ds.data.io import iter_tar
from mico_ds.data.read.loader import CorpusLoader
from mico_ds.data.sizing import COUNTED, SIZES, STATS, corpus_sizes, count_samples
from mico_ds.data.write.tar import write_tar

REPO = Path(__file__).resolve().parents[3]
NOT_A_TAR = b"this is not a tar file" * 40


def odd_tar(path: Path) -> Path:
    """A tar with what the loader does not count as samples: a directory, a member without an
    extension, a WebDataset metadata member; and a key that comes back after another (two samples)."""
    with tarfile.open(path, "w") as tf:
        d = tarfile.TarInfo("dir")
        d.type = tarfile.DIRTYPE
        tf.addfile(d)
        for name in ("dir/a.jpg", "dir/a.txt", "README", "__index__.json", "dir/b.jpg", "dir/b.depth.png",
                     "dir/a.json", "c.txt"):  # fmt: skip
            ti = tarfile.TarInfo(name)
            ti.size = 5
            tf.addfile(ti, io.BytesIO(b"12345"))
    return path


def samples_read(path: Path) -> int:
    """The loader's own count: what iter_tar yields."""
    items = list(iter_tar(str(path)))
    assert not any("__error__" in x for x in items)
    return len(items)


def small_shards(d: Path, counts: list[int]) -> list[Path]:
    d.mkdir(parents=True, exist_ok=True)
    out = []
    for i, n in enumerate(counts):
        out.append(d / f"c-{i:06d}.tar")
        write_tar(out[-1], [(f"k{i}_{j}", {"jpg": b"x" * (50 + j), "txt": b"a caption"}) for j in range(n)])
    return out


def test_count_samples_follows_the_loaders_rule(tmp_path: Path) -> None:
    path = odd_tar(tmp_path / "odd.tar")
    assert count_samples(path) == samples_read(path) == 4  # dir/a, dir/b, dir/a again, c
    write_tar(
        tmp_path / "whole.tar", [(f"k{j}", {"jpg": b"x" * 4000, "txt": b"a caption"}) for j in range(10)]
    )
    data = (tmp_path / "whole.tar").read_bytes()
    (tmp_path / "cut.tar").write_bytes(data[: len(data) // 2 + 700])  # inside a member's data
    assert [x.get("__error__") for x in iter_tar(str(tmp_path / "cut.tar"))][-1] == "truncated_tar"
    with pytest.raises(ValueError, match=r"cut\.tar: not a readable tar"):
        count_samples(tmp_path / "cut.tar")


def test_indexes_are_read_without_opening_the_tars(tmp_path: Path) -> None:
    ours, i2d = tmp_path / "ours", tmp_path / "img2dataset"
    ours.mkdir()
    i2d.mkdir()
    (ours / "a-000000.tar").write_bytes(NOT_A_TAR)  # listed in sizes.json: never opened
    odd_tar(ours / "a-000001.tar")  # not listed: opened and counted
    (ours / schema.SIZES_FILE).write_text(json.dumps({"a-000000.tar": 7}))
    (i2d / "00000.tar").write_bytes(NOT_A_TAR)  # img2dataset's layout, its stats file next to it
    stats = {"count": 10, "successes": 8, "failed_to_download": 2, "failed_to_resize": 0, "duration": 1.5}
    (i2d / "00000_stats.json").write_text(json.dumps(stats))
    (i2d / "00001.tar").write_bytes(NOT_A_TAR)  # no index: opened, and unreadable
    (i2d / "00002.tar").write_bytes(NOT_A_TAR)  # both indexes: sizes.json wins over the stats
    (i2d / "00002_stats.json").write_text(json.dumps(stats))
    (i2d / schema.SIZES_FILE).write_text(json.dumps({"00002.tar": 9}))
    urls = [
        str(ours / "a-000000.tar"),
        str(ours / "a-000001.tar"),
        *(str(i2d / f"0000{i}.tar") for i in range(3)),
    ]
    urls.append("pipe:curl -s https://host/x.tar")

    got = corpus_sizes(urls)
    assert got.sizes == {urls[0]: 7, urls[1]: 4, urls[2]: 8, urls[4]: 9}
    assert got.sources == {urls[0]: SIZES, urls[1]: COUNTED, urls[2]: STATS, urls[4]: SIZES}
    assert set(got.unsized) == {urls[3], urls[5]} and "00001.tar: not a readable tar" in got.unsized[urls[3]]
    assert got.total == 28 and not got.complete
    assert got.describe() == "at least 28 samples (2 shards from sizes.json, 1 shard from *_stats.json, " \
        "1 shard counted, 2 unsized)"  # fmt: skip

    cheap = corpus_sizes(urls, open_missing=False)  # the loader's start-up: indexes only
    assert cheap.sizes == {urls[0]: 7, urls[2]: 8, urls[4]: 9}
    assert cheap.unsized[urls[1]].startswith("not indexed") and cheap.unsized[urls[3]].startswith(
        "not indexed"
    )
    assert cheap.short() == "at least 24 samples (sizes.json, *_stats.json; 3 shard(s) unsized)"


def test_loader_start_up_names_the_indexed_samples(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "x-000000.tar").write_bytes(NOT_A_TAR)  # never opened by the constructor
    (tmp_path / "x-000001.tar").write_bytes(NOT_A_TAR)
    (tmp_path / schema.SIZES_FILE).write_text(json.dumps({"x-000000.tar": 1200, "x-000001.tar": 34}))
    corpus = CorpusConfig(name="x", shards="x-{000000..000001}.tar", batch_size=2)
    with caplog.at_level(logging.WARNING, logger="mico_ds.data.read.loader"):
        CorpusLoader(corpus, None, DataConfig(root=str(tmp_path)), tokenizer=None, rank=0, world_size=4,
                     num_workers=0)  # fmt: skip
    assert "corpus 'x': 2 shard(s), 1,234 samples (sizes.json), for 4 streams" in caplog.text


def run_tool(argv: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    rc = index_shards.main([*argv, "--no-progress"])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_index_shards_counts_in_parallel_and_merges_atomically(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    counts = [5, 9, 1, 13, 7, 3]
    shards = small_shards(tmp_path / "par", counts)
    shutil.copytree(tmp_path / "par", tmp_path / "ser")
    truth = {p.name: samples_read(p) for p in shards}
    assert list(truth.values()) == counts

    (tmp_path / "par" / schema.SIZES_FILE).write_text(json.dumps({"other.tar": 99, "c-000001.tar": 1}))
    rc, out, _ = run_tool([str(tmp_path / "par"), "--workers", "3"], capsys)
    assert rc == 0 and "5 counted, 1 already in sizes.json" in out
    par = json.loads((tmp_path / "par" / schema.SIZES_FILE).read_text())
    assert par == {**truth, "c-000001.tar": 1, "other.tar": 99}  # merged: listed entries kept
    rc, out, _ = run_tool([str(tmp_path / "par"), "--workers", "3", "--force"], capsys)
    assert rc == 0 and "6 counted" in out
    assert json.loads((tmp_path / "par" / schema.SIZES_FILE).read_text()) == {**truth, "other.tar": 99}
    assert sorted(p.name for p in (tmp_path / "par").iterdir()) == sorted([*truth, schema.SIZES_FILE])

    rc, _, _ = run_tool([str(tmp_path / "ser" / "c-{000000..000005}.tar"), "--workers", "1"], capsys)
    assert rc == 0 and json.loads((tmp_path / "ser" / schema.SIZES_FILE).read_text()) == truth  # serial


def test_index_shards_names_bad_shards_and_refuses_remote_urls(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    small_shards(tmp_path, [4, 6])
    (tmp_path / "c-000002.tar").write_bytes(NOT_A_TAR)
    rc, out, err = run_tool([str(tmp_path), "--workers", "2"], capsys)
    assert rc == 1 and "10 samples in 2 shard(s)" in out
    assert f"unreadable shard: {tmp_path / 'c-000002.tar'}: not a readable tar" in err
    assert json.loads((tmp_path / schema.SIZES_FILE).read_text()) == {"c-000000.tar": 4, "c-000001.tar": 6}
    rc, _, err = run_tool([str(tmp_path), "--skip-bad", "--json"], capsys)
    assert rc == 0 and "c-000002.tar" in err
    rc, _, err = run_tool(["pipe:curl -s https://host/x-{0..9}.tar"], capsys)
    assert rc == 2 and "not a local shard" in err


def test_bench_loader_planning_case_is_consistent(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("bench_loader", REPO / "tools" / "bench_loader.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    r = bench.plan_case(tmp_path, urls_n=1000, ranks=8, workers=8, few=30, real_shards=4, real_samples=10)
    assert r["streams"] == 64
    for kind in ("img2dataset", "clips"):
        b = r[f"balance_{kind}"]
        assert b["shards_per_stream"]["sum"] == 1000
        assert (b["shards_per_stream"]["min"], b["shards_per_stream"]["max"]) == (15, 16)  # 1000 / 64
        assert b["samples_per_stream"]["sum"] == b["samples_per_shard"]["sum"]
        assert (
            b["samples_per_stream"]["min"]
            <= b["samples_per_stream"]["mean"]
            <= b["samples_per_stream"]["max"]
        )
    assert r["sizing"]["per_member_header_us"] > 0 and r["sizing"]["opened_serial_s"] > 0
    f = r["fewer_shards_than_streams"]
    assert f["split_by_sample"] and f["read_amplification"] == 64
    assert f["samples_kept_per_stream"]["sum"] == f["samples_read_per_stream"]  # every sample kept once
    assert f["kept_fraction"] == pytest.approx(1 / 64)
    real = f["measured_on_real_shards"]
    assert real["samples"] == 40 and real["kept_by_stream_0"] == 1  # item (i + chunk) % 64 == 0: i = 0
    assert real["kept_per_stream"]["sum"] == 40 and real["streams_keeping_nothing"] == 64 - 40
    small = f["shards_of_100_samples"]
    assert small["samples_kept_per_stream"]["sum"] == 3000 and small["streams_keeping_nothing"] == 0
    res = f["resampled"]
    if isinstance(res, dict):  # StreamPlan.resampled exists: every stream reads whole shards
        assert res["draws_per_shard"]["sum"] == 64 * res["draws_per_stream"] and res["kept_fraction"] == 1.0


def test_bench_kept_arithmetic_is_the_plans(tmp_path: Path) -> None:
    """_kept_by_sample (the benchmark's arithmetic) against what StreamPlan.raw_chunk really keeps:
    8 shards of 3 samples over 16 streams, chunks of 4 shards (12 items < 16 streams)."""
    from mico_ds.data.read.plan import StreamPlan

    spec = importlib.util.spec_from_file_location("bench_loader", REPO / "tools" / "bench_loader.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    urls = [str(p) for p in small_shards(tmp_path, [3] * 8)]
    plan = StreamPlan(tuple(urls), num_streams=16, shards_per_chunk=4, seed=3)
    for epoch in (0, 1):
        real = [sum(1 for _ in plan.items(s, (epoch, 0, 0), infinite=False)) for s in range(16)]
        assert bench._kept_by_sample(plan, dict.fromkeys(urls, 3), epoch).tolist() == real
    assert sum(real) == 24  # each sample kept by exactly one stream
