"""The demo corpus: every modality decodes (PIL / PyAV / soundfile) to the generated geometry, every
caption word is checked against the decoded media, val captions are unique, the tune split is disjoint
from val and train and leaves them (and the tokenizer) unchanged, generation is seeded and
byte-reproducible, and ensure_demo_corpus is safe under concurrent callers."""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from PIL import Image

from mico_ds import demo
from mico_ds.data import schema
from mico_ds.data.io import expand_urls, iter_tar_samples
from mico_ds.data.write.media import normals_from_depth

TINY = {"num_train": 16, "num_val": 8, "num_tune": 4, "samples_per_shard": 8, "progress": False}
REPO = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("demo") / "tiny"
    index = demo.make_demo_corpus(out, **TINY)
    return out, index


def samples_of(out: Path, pattern: str) -> list[tuple[str, dict[str, bytes]]]:
    return [s for shard in expand_urls(str(out / pattern)) for s in iter_tar_samples(shard)]


def all_files(out: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(out)): p.read_bytes()
        for p in sorted(out.rglob("*"))
        if p.is_file() and (p.suffix in (".tar", ".model") or p.name == schema.SIZES_FILE)
    }


# ----------------------------------------------------------------------------- layout


def test_layout_index_and_sizes(corpus: tuple[Path, dict]) -> None:
    out, index = corpus
    assert json.loads((out / demo.INDEX_FILE).read_text()) == index
    assert index["format_version"] == demo.FORMAT_VERSION
    assert index["params"]["num_single_pair"] == 8  # num_train // 2
    expected = {("omni", "train"): 16, ("omni", "val"): 8, ("omni", "tune"): 4}
    expected |= {(c, "train"): 8 for c in ("image_text", "audio_text", "video_text")}
    found = {
        (c, s): info["num_samples"] for c, e in index["corpora"].items() for s, info in e["splits"].items()
    }
    assert found == expected
    for corpus_name, entry in index["corpora"].items():
        sizes = json.loads((out / corpus_name / schema.SIZES_FILE).read_text())
        for split, info in entry["splits"].items():
            shards = expand_urls(str(out / info["shards"]))
            assert len(shards) == info["num_shards"] == -(-info["num_samples"] // TINY["samples_per_shard"])
            counts = {Path(p).name: sum(1 for _ in iter_tar_samples(p)) for p in shards}
            assert counts == {k: v for k, v in sizes.items() if k.startswith(split + "-")}
            assert sum(counts.values()) == info["num_samples"]
    assert (out / index["tokenizer"]["path"]).is_file()
    assert not list(out.rglob("*.tmp*")), "temporary files left behind"


def test_members_per_corpus(corpus: tuple[Path, dict]) -> None:
    out, _ = corpus
    frames = {f"frame{i}.jpg" for i in range(8)}
    omni = {"jpg", "mp4", "flac", "depth.png", "normal.png", "json"} | frames
    expected = {
        "omni/train-*.tar": omni,
        "omni/val-*.tar": omni,
        "omni/tune-*.tar": omni,
        "image_text/train-*.tar": {"jpg", "txt"},
        "audio_text/train-*.tar": {"flac", "json"},
        "video_text/train-*.tar": {"mp4", "json"},
    }
    keys: list[str] = []
    for pattern, members in expected.items():
        for key, m in samples_of(out, pattern):
            assert set(m) == members, (pattern, key, sorted(m))
            keys.append(key)
    assert len(keys) == len(set(keys)) == 16 + 8 + 4 + 3 * 8
    # tar headers are fixed (reproducible shards) and plain regular files
    with tarfile.open(next(out.glob("omni/train-*.tar"))) as tar:
        infos = tar.getmembers()
    assert {(i.mtime, i.uid, i.gid, i.mode, i.type) for i in infos} == {
        (946684800, 0, 0, 0o644, tarfile.REGTYPE)
    }


# ----------------------------------------------------------------------------- decoding


def decode_rgb(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as im:
        assert im.mode == "RGB"
        return np.asarray(im)


def decode_video(data: bytes, fps: float | None = None) -> np.ndarray:
    import av

    with av.open(io.BytesIO(data)) as c:
        if fps is not None:  # T frames span the audio clip
            assert c.streams.video[0].average_rate == fps
        return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])


def test_every_modality_decodes_to_the_generated_geometry(corpus: tuple[Path, dict]) -> None:
    out, index = corpus
    p = index["params"]
    size, t, sr = p["image_size"], p["num_frames"], p["sample_rate"]
    for key, m in samples_of(out, "omni/*.tar"):
        image = decode_rgb(m["jpg"])
        assert image.shape == (size, size, 3)
        frames = np.stack([decode_rgb(m[f"frame{i}.jpg"]) for i in range(t)])
        video = decode_video(m["mp4"], fps=t / p["audio_seconds"])
        assert video.shape == (t, size, size, 3), key
        # the MP4 and the pre-extracted JPEG frames show the same thing (both lossy)
        assert np.abs(video.astype(int) - frames.astype(int)).mean() < 6, key
        assert np.abs(image.astype(int) - frames[t // 2].astype(int)).max() == 0  # same encoder, same frame
        wave, rate = sf.read(io.BytesIO(m["flac"]), dtype="float32")
        assert rate == sr and wave.ndim == 1 and len(wave) == round(sr * p["audio_seconds"])
        with Image.open(io.BytesIO(m["depth.png"])) as im:
            assert im.mode.startswith("I;16")
            depth = np.asarray(im)
        assert depth.dtype == np.uint16 and depth.shape == (size, size)
        assert (
            0.5 * demo.DEPTH_WALL_MM[0] - 1 <= depth.min() and depth.max() <= 1.5 * demo.DEPTH_WALL_MM[1] + 1
        )
        rgb = decode_rgb(m["normal.png"]).astype(np.float64)
        normals = rgb / 127.5 - 1.0
        norm = np.linalg.norm(normals, axis=-1)
        assert np.abs(norm - 1).max() < 0.02, key  # unit vectors up to 8-bit quantization
        assert (normals[..., 2] > 0).all()  # every surface faces the camera
        # the normal map is the one derived from the stored depth (as tools/make_shards.py would)
        ref = normals_from_depth(depth.astype(np.float64), scale=size / demo.DEPTH_VIEW_MM)
        assert np.abs(normals - ref).max() < 1 / 127.5 + 1e-6, key
        meta = json.loads(m["json"])
        assert set(meta["captions"]) == set(schema.CAPTION_FIELDS)
        assert meta["source"] == "demo-omni" and meta["category"] in demo.SHAPES


def test_single_pair_corpora_decode(corpus: tuple[Path, dict]) -> None:
    out, index = corpus
    size, t = index["params"]["image_size"], index["params"]["num_frames"]
    for _, m in samples_of(out, "image_text/*.tar"):
        assert decode_rgb(m["jpg"]).shape == (size, size, 3)
        assert re.fullmatch(r"a (small|large) \w+ \w+ moves \w+ .+", m["txt"].decode())
    for _, m in samples_of(out, "audio_text/*.tar"):
        wave, rate = sf.read(io.BytesIO(m["flac"]))
        assert rate == 16000 and len(wave) == 32000
        meta = json.loads(m["json"])
        assert list(meta["captions"]) == ["audio"] and meta["category"] in demo.PITCHES
    for _, m in samples_of(out, "video_text/*.tar"):
        assert decode_video(m["mp4"]).shape == (t, size, size, 3)
        meta = json.loads(m["json"])
        assert list(meta["captions"]) == ["vision"] and meta["category"] in demo.SHAPES


# ----------------------------------------------------------------------------- grounding

VISION_RE = re.compile(r"a (small|large) (\w+) (\w+) moves (left|right|up|down) (.+)")
AUDIO_RE = re.compile(r"(?:a steady|(\w+)) (quiet|loud) (low|mid|high) (pure|buzzing) (tone|beeps?)")


def shape_mask(frame: np.ndarray) -> np.ndarray:
    return np.abs(frame.astype(int) - np.array(demo.BACKGROUND)).sum(-1) > 60


def beep_segments(wave: np.ndarray, sr: int) -> list[tuple[int, int]]:
    win = sr // 100  # 10 ms envelope
    env = np.convolve(np.abs(wave), np.ones(win) / win, mode="same")
    on = env > 0.3 * env.max()
    edges = np.flatnonzero(np.diff(on.astype(int)))
    bounds = np.concatenate([[0] if on[0] else [], edges + 1, [len(on)] if on[-1] else []]).astype(int)
    return list(zip(bounds[::2], bounds[1::2]))


def test_every_caption_word_is_grounded_in_the_media(corpus: tuple[Path, dict]) -> None:
    out, index = corpus
    size, sr = index["params"]["image_size"], index["params"]["sample_rate"]
    colours = {name: np.array(rgb) for name, rgb in demo.COLOURS.items()}
    for key, m in samples_of(out, "omni/*.tar"):
        caps = json.loads(m["json"])["captions"]
        sz, colour, shape, direction, lane = VISION_RE.fullmatch(caps["vision"]).groups()
        assert shape == json.loads(m["json"])["category"]
        frames = [decode_rgb(m[f"frame{i}.jpg"]) for i in range(index["params"]["num_frames"])]
        masks = [shape_mask(f) for f in frames]
        # colour: the nearest named colour to the shape's median pixel
        median = np.median(frames[0][masks[0]], axis=0)
        assert min(colours, key=lambda c: np.abs(colours[c] - median).sum()) == colour, key
        # direction: motion of the centroid; lane: the perpendicular coordinate's third of the image
        cents = np.array([np.argwhere(mk).mean(0) for mk in masks])  # (T, [row, col])
        (drow, dcol), (row, col) = cents[-1] - cents[0], cents.mean(0)
        moved = {"left": -dcol, "right": dcol, "up": -drow, "down": drow}[direction]
        assert moved > size / 4 and moved > 3 * min(abs(drow), abs(dcol)), (key, direction, cents)
        perp = row if direction in ("left", "right") else col
        third = ["top", "middle", "bottom"] if direction in ("left", "right") else ["left", "middle", "right"]
        assert third[min(2, int(3 * perp / size))] in lane, (key, lane, perp)
        # size: the shape's extent
        rows, cols = np.nonzero(masks[0])
        extent = max(np.ptp(rows), np.ptp(cols)) + 1
        assert (extent <= 21 / 64 * size) == (sz == "small"), (key, sz, extent)  # small <= 19, large >= 24
        if shape == "ring":  # a ring has a hole: its centre shows the background
            r0, c0 = np.round(cents[0]).astype(int)
            assert not masks[0][r0, c0]

        # audio: count, loudness, pitch, timbre
        wave, _ = sf.read(io.BytesIO(m["flac"]), dtype="float64")
        count, loud, pitch, timbre, kind = AUDIO_RE.fullmatch(caps["audio"]).groups()
        segs = beep_segments(wave, sr)
        if kind == "tone":
            assert len(segs) == 1 and segs[0][1] - segs[0][0] > 0.9 * len(wave), key
            expected_count = 0
        else:
            expected_count = demo.NUMBER_WORDS.index(count)
            assert len(segs) == expected_count, (key, caps["audio"], segs)
        peak = np.abs(wave).max()
        assert (peak > 0.3) == (loud == "loud"), (key, peak)
        spec = np.abs(np.fft.rfft(wave))
        freqs = np.fft.rfftfreq(len(wave), 1 / sr)
        f0 = freqs[spec.argmax()]
        assert min(demo.PITCHES, key=lambda p: abs(np.log(demo.PITCHES[p] / f0))) == pitch, (
            key,
            f0,
        )
        third_harmonic = spec[np.abs(freqs - 3 * f0) < 10].max() / spec.max()
        assert (third_harmonic > 0.15) == (timbre == "buzzing"), (key, third_harmonic)

        # subtitle: names the same count, shape and direction
        count_phrase = "a steady tone" if expected_count == 0 else caps["audio"].split(" ")[0] + " beep"
        assert (
            count_phrase in caps["subtitle"] and shape in caps["subtitle"] and direction in caps["subtitle"]
        )

        # depth: the shape (where the image shows it) is nearer / farther than the wall
        with Image.open(io.BytesIO(m["depth.png"])) as im:
            depth = np.asarray(im).astype(np.float64)
        wall = np.median(depth[~masks[len(masks) // 2]])
        inside = np.median(depth[masks[len(masks) // 2]])
        assert caps["depth"] == f"the {shape} is {'close to' if inside < wall else 'far from'} the camera"
        assert abs(inside - wall) > 0.2 * wall


def test_val_captions_unique_and_held_out(corpus: tuple[Path, dict]) -> None:
    out, _ = corpus

    def joined(pattern: str) -> list[str]:
        return [demo.joined_caption(json.loads(m["json"])["captions"]) for _, m in samples_of(out, pattern)]

    val, train = joined("omni/val-*.tar"), joined("omni/train-*.tar")
    assert len(val) == len(set(val)) == 8
    assert not set(val) & set(train)
    assert all(c.count(schema.CAPTION_SEP) == 3 for c in val)


def test_attribute_space_has_many_distinct_captions() -> None:
    assert demo.NUM_COMBINATIONS >= 1000
    codes = np.random.default_rng(0).choice(demo.NUM_COMBINATIONS, size=20000, replace=False)
    caps = {demo.joined_caption(demo.captions_for(demo.decode_attributes(int(c)))) for c in codes}
    assert len(caps) == 20000  # the attribute -> caption map is injective
    # a full draw of 2,000 held-out captions is unique too
    params = demo.DemoParams(num_train=4, num_val=2000, single_pair=False)
    val = demo.draw_codes(params)["omni", "val"]
    assert len({demo.joined_caption(demo.captions_for(demo.decode_attributes(int(c)))) for c in val}) == 2000


# ----------------------------------------------------------------------------- reproducibility


def test_same_seed_gives_byte_identical_shards_and_other_seed_differs(
    corpus: tuple[Path, dict], tmp_path: Path
) -> None:
    out, _ = corpus
    again = demo.make_demo_corpus(tmp_path / "again", **TINY)
    assert again["params"] == json.loads((out / demo.INDEX_FILE).read_text())["params"]
    ref, new = all_files(out), all_files(tmp_path / "again")
    assert ref.keys() == new.keys() and len(ref) == 12
    assert [k for k in ref if ref[k] != new[k]] == []
    other = all_files(Path(demo.make_demo_corpus(tmp_path / "other", **TINY, seed=1) and tmp_path / "other"))
    tars = [k for k in ref if k.endswith(".tar")]
    assert all(ref[k] != other[k] for k in tars)


def test_worker_processes_do_not_change_the_output(tmp_path: Path) -> None:
    kwargs = {**TINY, "num_train": 8, "num_val": 4, "samples_per_shard": 4, "single_pair": False}
    demo.make_demo_corpus(tmp_path / "w1", **kwargs, workers=1)
    demo.make_demo_corpus(tmp_path / "w2", **kwargs, workers=2)
    assert all_files(tmp_path / "w1") == all_files(tmp_path / "w2")


def test_regeneration_removes_stale_shards(tmp_path: Path) -> None:
    demo.make_demo_corpus(tmp_path, **{**TINY, "samples_per_shard": 4})
    assert len(list(tmp_path.glob("omni/train-*.tar"))) == 4
    assert len(list(tmp_path.glob("omni/tune-*.tar"))) == 1
    demo.make_demo_corpus(tmp_path, **{**TINY, "num_tune": 0})
    assert sorted(p.name for p in tmp_path.glob("omni/train-*.tar")) == [
        "train-000000.tar",
        "train-000001.tar",
    ]
    assert not list(tmp_path.glob("omni/tune-*.tar"))
    assert "tune" not in json.loads((tmp_path / demo.INDEX_FILE).read_text())["corpora"]["omni"]["splits"]


def omni_captions(out: Path, pattern: str) -> list[str]:
    return [demo.joined_caption(json.loads(m["json"])["captions"]) for _, m in samples_of(out, pattern)]


def test_tune_split_is_disjoint_from_val_and_train_and_leaves_both_unchanged() -> None:
    for seed in range(4):
        base = dict(num_train=3000, num_val=256, single_pair=False, seed=seed)
        without = demo.draw_codes(demo.DemoParams(**base, num_tune=0))
        codes = demo.draw_codes(demo.DemoParams(**base, num_tune=128))
        assert ("omni", "tune") not in without
        for split in ("val", "train"):  # same codes, same order: the training run is the one without it
            assert np.array_equal(without["omni", split], codes["omni", split])
        tune, val, train = (set(codes["omni", s].tolist()) for s in ("tune", "val", "train"))
        assert len(codes["omni", "tune"]) == len(tune) == 128  # distinct tuples: unique captions
        assert not tune & val and not tune & train and not val & train
    # a tune split much larger than its share still avoids val
    big = demo.draw_codes(demo.DemoParams(num_train=4, num_val=5000, num_tune=3000, single_pair=False))
    assert len(set(big["omni", "tune"].tolist()) - set(big["omni", "val"].tolist())) == 3000
    with pytest.raises(ValueError, match="num_tune=-1"):
        demo.DemoParams(num_tune=-1)


def test_tune_split_leaves_val_train_and_tokenizer_bytes_unchanged(
    corpus: tuple[Path, dict], tmp_path: Path
) -> None:
    out, index = corpus
    demo.make_demo_corpus(tmp_path, **{**TINY, "num_tune": 0})
    ref, new = all_files(out), all_files(tmp_path)
    assert sorted(set(ref) - set(new)) == ["omni/tune-000000.tar"]
    assert [k for k in new if k != "omni/sizes.json" and ref[k] != new[k]] == []  # tokenizer included
    tune_split = {"shards": "omni/tune-000000.tar", "num_samples": 4, "num_shards": 1}
    assert index["corpora"]["omni"]["splits"]["tune"] == tune_split
    tune = omni_captions(out, "omni/tune-*.tar")
    others = set(omni_captions(out, "omni/val-*.tar")) | set(omni_captions(out, "omni/train-*.tar"))
    assert len(set(tune)) == 4 and not set(tune) & others


# ----------------------------------------------------------------------------- ensure_demo_corpus

_ENSURE = """
import json, sys
from mico_ds.demo import ensure_demo_corpus
index = ensure_demo_corpus(
    sys.argv[1], num_train=24, num_val=8, num_tune=4, samples_per_shard=8, progress=False
)
print(json.dumps(index))
"""


def test_ensure_from_two_concurrent_processes_yields_one_valid_corpus(tmp_path: Path) -> None:
    out = tmp_path / "shared"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _ENSURE, str(out)],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for _ in range(2)
    ]
    results = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [r[1].decode()[-2000:] for r in results]
    a, b = (json.loads(r[0]) for r in results)
    # identical index (incl. the generation time): one process generated, the other read its result
    assert a == b == json.loads((out / demo.INDEX_FILE).read_text())
    assert not list(out.rglob("*.tmp*"))
    n = sum(1 for shard in expand_urls(str(out / "omni")) for _ in iter_tar_samples(shard))
    assert n == 24 + 8 + 4

    # a second call reuses it; other parameters regenerate
    mtime = (out / demo.INDEX_FILE).stat().st_mtime_ns
    same = dict(num_val=8, num_tune=4, samples_per_shard=8, progress=False)
    assert demo.ensure_demo_corpus(out, num_train=24, **same) == a
    assert (out / demo.INDEX_FILE).stat().st_mtime_ns == mtime
    c = demo.ensure_demo_corpus(out, num_train=16, **same)
    assert c["params"]["num_train"] == 16
    assert sum(json.loads((out / "omni" / schema.SIZES_FILE).read_text()).values()) == 16 + 8 + 4


def test_make_demo_data_cli(tmp_path: Path) -> None:
    cmd = [
        sys.executable,
        "tools/make_demo_data.py",
        "--out",
        str(tmp_path),
        "--num-train",
        "8",
        "--num-val",
        "4",
        "--num-tune",
        "2",
    ]
    res = subprocess.run(
        [*cmd, "--no-single-pair", "--quiet"], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert res.returncode == 0, res.stderr
    index = json.loads((tmp_path / demo.INDEX_FILE).read_text())
    assert set(index["corpora"]) == {"omni"} and index["params"]["num_train"] == 8
    assert index["corpora"]["omni"]["splits"]["tune"]["num_samples"] == 2
    assert "omni train" in " ".join(res.stdout.split())
    bad = subprocess.run([*cmd, "--image-size", "31"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "image_size=31" in bad.stderr
