"""Nested stratified subsets (MiCo appendix "Dataset Split"): each smaller subset lies inside the next,
every category keeps its share within one sample, the split is seeded; the CLI works on manifests and
on shards."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from mico_ds import demo
from mico_ds.data import schema
from mico_ds.data.io import expand_urls, iter_tar_samples
from mico_ds.data.write.subsets import nested_stratified_subsets, resolve_sizes

REPO = Path(__file__).resolve().parents[3]
TOOL = [sys.executable, "tools/split_subsets.py"]


def check_nested_and_proportional(categories: list[str], sizes: list[int], subsets: list[np.ndarray]) -> None:
    total = Counter(categories)
    n = len(categories)
    by_size = sorted(zip(sizes, subsets), key=lambda x: x[0])
    for size, idx in by_size:
        assert len(idx) == size == len(set(idx.tolist()))
        got = Counter(categories[i] for i in idx)
        for cat, count in total.items():
            assert abs(got[cat] - size * count / n) < 1, (size, cat, got[cat], size * count / n)
    for (_, small), (_, large) in zip(by_size, by_size[1:]):
        assert set(small.tolist()) <= set(large.tolist())


def test_nested_and_proportional_on_skewed_categories() -> None:
    rng = np.random.default_rng(0)
    counts = {"music": 500, "gaming": 230, "education": 111, "animals": 37, "news": 9, "rare": 1}
    cats = [c for c, k in counts.items() for _ in range(k)]
    cats = [cats[i] for i in rng.permutation(len(cats))]
    sizes = [10, 100, 250, 600, 888]
    subsets = nested_stratified_subsets(cats, sizes, seed=42)
    check_nested_and_proportional(cats, sizes, subsets)
    again = nested_stratified_subsets(cats, sizes, seed=42)
    assert all(np.array_equal(a, b) for a, b in zip(subsets, again))
    other = nested_stratified_subsets(cats, sizes, seed=7)
    assert not np.array_equal(subsets[2], other[2])
    # the input order of sizes does not matter
    shuffled = nested_stratified_subsets(cats, sizes[::-1], seed=42)
    assert all(np.array_equal(a, b) for a, b in zip(subsets, shuffled[::-1]))


def test_alabama_paradox_does_not_break_nesting() -> None:
    # Categories of 6, 6 and 2 samples: plain largest-remainder rounding gives (4, 4, 2) for 10 samples
    # but (5, 5, 1) for 11 -- the third category would shrink as the subset grows.
    cats = ["a"] * 6 + ["b"] * 6 + ["c"] * 2
    ten, eleven = nested_stratified_subsets(cats, [10, 11], seed=0)
    check_nested_and_proportional(cats, [10, 11], [ten, eleven])
    assert Counter(cats[i] for i in eleven) == {"a": 5, "b": 5, "c": 1}


@pytest.mark.parametrize("trial", range(30))
def test_random_configurations(trial: int) -> None:
    rng = np.random.default_rng(trial)
    k = int(rng.integers(1, 12))
    cats = [f"c{int(c)}" for c in rng.zipf(1.6, size=int(rng.integers(20, 400))) % k]
    sizes = sorted({int(s) for s in rng.integers(1, len(cats) + 1, size=4)})
    check_nested_and_proportional(cats, sizes, nested_stratified_subsets(cats, sizes, seed=trial))


def test_resolve_sizes() -> None:
    assert resolve_sizes([0.01, 0.1, 0.5, 1.0], 1000) == [10, 100, 500, 1000]
    assert resolve_sizes([100, 1000], 1000) == [100, 1000]
    with pytest.raises(ValueError, match="mix"):
        resolve_sizes([0.5, 100], 1000)
    with pytest.raises(ValueError, match="exceed the 1000 samples"):
        resolve_sizes([2000], 1000)
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        resolve_sizes([1.5], 1000)


def test_cli_on_a_manifest_rewrites_paths(tmp_path: Path) -> None:
    media_dir = tmp_path / "raw" / "media"
    media_dir.mkdir(parents=True)
    lines = []
    for i in range(60):
        (media_dir / f"{i}.txt").write_text(str(i))
        lines.append(
            {"key": f"k{i}", "image": f"media/{i}.txt", "category": ["x", "y", "z"][i % 3 if i < 45 else 0]}
        )
    (tmp_path / "raw" / "m.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    out = tmp_path / "subsets"
    res = subprocess.run(
        [*TOOL, "--manifest", str(tmp_path / "raw" / "m.jsonl"), "--sizes", "0.1,0.5", "--out", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    summary = json.loads((out / "subsets.json").read_text())
    assert summary["categories"] == {"x": 30, "y": 15, "z": 15}
    assert {n: s["size"] for n, s in summary["subsets"].items()} == {"6": 6, "30": 30}
    assert summary["subsets"]["30"]["categories"] == {"x": 15, "y": 8, "z": 7} or summary["subsets"]["30"][
        "categories"
    ] == {"x": 15, "y": 7, "z": 8}
    small = [json.loads(x) for x in (out / "m-6.jsonl").read_text().splitlines()]
    large = [json.loads(x) for x in (out / "m-30.jsonl").read_text().splitlines()]
    assert {x["key"] for x in small} <= {x["key"] for x in large}
    for x in large:  # paths now relative to the new manifest, pointing at the same files
        assert (out / x["image"]).read_text() == x["key"][1:]


def test_cli_on_shards_writes_keys_and_subset_shards(tmp_path: Path) -> None:
    demo.make_demo_corpus(tmp_path / "demo", num_train=48, num_val=4, samples_per_shard=16, single_pair=False,
                          progress=False)  # fmt: skip
    out = tmp_path / "subsets"
    res = subprocess.run(
        [*TOOL, "--shards", str(tmp_path / "demo" / "omni" / "train-{000000..000002}.tar"), "--sizes", "8,24",
         "--names", "small,big", "--out", str(out), "--write-shards", "--samples-per-shard", "10"],
        cwd=REPO, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    small = (out / "small.keys.txt").read_text().split()
    big = (out / "big.keys.txt").read_text().split()
    assert len(small) == 8 and len(big) == 24 and set(small) <= set(big)
    for name, keys in (("small", small), ("big", big)):
        sizes = json.loads((out / name / schema.SIZES_FILE).read_text())
        shards = expand_urls(out / name)
        assert sum(sizes.values()) == len(keys) and len(shards) == -(-len(keys) // 10)
        samples = [(k, m) for s in shards for k, m in iter_tar_samples(s)]
        assert sorted(k for k, _ in samples) == sorted(keys)
        assert all(len(m) == 14 for _, m in samples)  # every member of a demo omni sample is copied
    summary = json.loads((out / "subsets.json").read_text())
    total = summary["categories"]
    assert sum(total.values()) == 48
    for name in ("small", "big"):
        sub = summary["subsets"][name]
        for cat, n in total.items():
            assert abs(sub["categories"].get(cat, 0) - sub["size"] * n / 48) < 1


def test_cli_errors(tmp_path: Path) -> None:
    res = subprocess.run(
        [*TOOL, "--shards", str(tmp_path / "none-*.tar"), "--sizes", "5", "--out", str(tmp_path)],
        cwd=REPO, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert res.returncode == 2 and "no .tar files" in res.stderr
    manifest = tmp_path / "m.jsonl"
    manifest.write_text('{"key": "a"}\n{"key": "b"}\n')
    res = subprocess.run([*TOOL, "--manifest", str(manifest), "--sizes", "0.5,1", "--out", str(tmp_path)],
                         cwd=REPO, capture_output=True, text=True, timeout=60)  # fmt: skip
    assert res.returncode == 2 and "mix fractions and counts" in res.stderr
    res = subprocess.run([*TOOL, "--manifest", str(manifest), "--sizes", "3", "--out", str(tmp_path)],
                         cwd=REPO, capture_output=True, text=True, timeout=60)  # fmt: skip
    assert res.returncode == 2 and "exceed the 2 samples" in res.stderr
