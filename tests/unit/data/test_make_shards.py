"""make_shards: a manifest of real media files (made here with the encoders: JPEG/PNG/WebP, MP4/WebM/GIF,
FLAC/WAV/MP3, 16-bit PNG / .npy depth, PNG normals) becomes tar shards with the contract's member names,
the original bytes and sizes.json; bad input fails with the manifest line and path."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mico_ds.data import schema
from mico_ds.data.io import iter_tar_samples
from mico_ds.data.write import media as media
from mico_ds.data.write.manifest import ManifestError, make_shards
from mico_ds.data.write.subsets import scan_shards
from mico_ds.data.write.tar import ShardWriter

REPO = Path(__file__).resolve().parents[3]
RNG = np.random.default_rng(0)


def frames(t: int = 4, h: int = 32, w: int = 48) -> np.ndarray:
    x = np.linspace(0, 255, w, dtype=np.float64)[None, None, :, None]
    base = np.broadcast_to(x, (t, h, w, 3)) + 40 * np.arange(t)[:, None, None, None]
    return np.clip(base, 0, 255).astype(np.uint8)


def tone(seconds: float = 0.5, sr: int = 16000) -> np.ndarray:
    return (0.3 * np.sin(2 * np.pi * 440 * np.arange(int(seconds * sr)) / sr)).astype(np.float32)


@pytest.fixture
def raw(tmp_path: Path) -> Path:
    """tmp/raw/media/* and tmp/raw/manifest.jsonl (paths relative to the manifest)."""
    m = tmp_path / "raw" / "media"
    m.mkdir(parents=True)
    rgb = frames(1)[0]
    webp = io.BytesIO()
    Image.fromarray(rgb).save(webp, format="WEBP")
    depth16 = (np.arange(32 * 48, dtype=np.uint16).reshape(32, 48) * 20).astype(np.uint16)
    files = {
        "img0.jpg": media.encode_jpeg(rgb),
        "img1.png": media.encode_png(rgb),
        "img2.webp": webp.getvalue(),
        "v0.mp4": media.encode_mp4(frames(), 4),
        "v1.webm": media.encode_video(frames(), 4, "webm"),
        "v2.gif": media.encode_video(frames(), 4, "gif"),
        "a0.flac": media.encode_flac(tone()),
        "a1.wav": media.encode_wav(tone()),
        "a2.mp3": media.encode_mp3(tone()),
        "d0.png": media.encode_png16(depth16),
        "n0.png": media.encode_normal_png(media.normals_from_depth(depth16.astype(float))),
    }
    for name, data in files.items():
        (m / name).write_bytes(data)
    np.save(m / "d1.npy", RNG.random((32, 48)).astype(np.float32))
    np.save(m / "d2.npy", RNG.random((32, 48, 1)))  # float64 (H, W, 1): stored as float32 (H, W)
    caps = {"vision": "a gradient", "audio": "a tone", "subtitle": "hello", "depth": "a ramp"}
    lines = [
        {"key": "s0", "image": "media/img0.jpg", "video": "media/v0.mp4", "audio": "media/a0.flac",
         "depth": "media/d0.png", "normal": "media/n0.png", "captions": caps, "category": "music"},
        {"key": "s1", "image": "media/img1.png", "video": "media/v1.webm", "audio": "media/a1.wav",
         "depth": "media/d1.npy", "captions": {"vision": "v1"}, "category": "games"},
        {"key": "s2", "image": "media/img2.webp", "video": "media/v2.gif", "audio": "media/a2.mp3",
         "category": "music", "source": "custom"},
        {"key": "s3", "audio": "media/a0.flac", "captions": {"audio": "only sound"}},
        {"key": "s4", "depth": "media/d2.npy"},
    ]  # fmt: skip
    write_manifest(tmp_path / "raw" / "manifest.jsonl", lines)
    return tmp_path / "raw"


def write_manifest(path: Path, lines: list[dict]) -> Path:
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return path


def test_manifest_to_shards(raw: Path, tmp_path: Path) -> None:
    out = tmp_path / "shards"
    result = make_shards(raw / "manifest.jsonl", out, samples_per_shard=2, prefix="mix", progress=False)
    assert result["num_samples"] == 5 and result["skipped"] == []
    sizes = json.loads((out / schema.SIZES_FILE).read_text())
    assert sizes == result["sizes"] == {"mix-000000.tar": 2, "mix-000001.tar": 2, "mix-000002.tar": 1}
    assert sorted(p.name for p in out.iterdir()) == [*sizes, schema.SIZES_FILE]  # no temporary files
    samples = {k: m for shard in sorted(out.glob("*.tar")) for k, m in iter_tar_samples(shard)}
    assert list(samples) == ["s0", "s1", "s2", "s3", "s4"]
    expected = {
        "s0": {"jpg", "mp4", "flac", "depth.png", "normal.png", "json"},
        "s1": {"png", "webm", "wav", "depth.npy", "json"},
        "s2": {"webp", "gif", "mp3", "json"},
        "s3": {"flac", "json"},
        "s4": {"depth.npy", "json"},
    }
    assert {k: set(m) for k, m in samples.items()} == expected
    # original bytes, unchanged
    pairs = [("s0", "jpg", "img0.jpg"), ("s0", "mp4", "v0.mp4"), ("s0", "depth.png", "d0.png"),
             ("s0", "normal.png", "n0.png"), ("s1", "png", "img1.png"), ("s1", "webm", "v1.webm"),
             ("s1", "wav", "a1.wav"), ("s1", "depth.npy", "d1.npy"), ("s2", "webp", "img2.webp"),
             ("s2", "gif", "v2.gif"), ("s2", "mp3", "a2.mp3"), ("s3", "flac", "a0.flac")]  # fmt: skip
    for key, ext, name in pairs:
        assert samples[key][ext] == (raw / "media" / name).read_bytes(), (key, ext)
    # a float64 (H, W, 1) depth is stored as float32 (H, W)
    d4 = np.load(io.BytesIO(samples["s4"]["depth.npy"]))
    assert d4.dtype == np.float32 and d4.shape == (32, 48)
    np.testing.assert_allclose(d4, np.load(raw / "media" / "d2.npy")[..., 0], rtol=1e-6)
    meta = {k: json.loads(m["json"]) for k, m in samples.items()}
    caps0 = json.loads((raw / "manifest.jsonl").read_text().splitlines()[0])["captions"]
    assert meta["s0"] == {"captions": caps0, "category": "music", "source": "manifest"}
    assert meta["s2"] == {"captions": {}, "category": "music", "source": "custom"}
    assert meta["s4"] == {"captions": {}, "source": "manifest"}
    assert [r["modalities"] for r in scan_shards(out)] == [
        ["image", "video", "audio", "depth", "normal"], ["image", "video", "audio", "depth"],
        ["image", "video", "audio"], ["audio"], ["depth"],
    ]  # fmt: skip


def test_derive_normals(raw: Path, tmp_path: Path) -> None:
    make_shards(raw / "manifest.jsonl", tmp_path, derive_normals=True, depth_scale=0.5, progress=False)
    samples = dict(iter_tar_samples(tmp_path / "corpus-000000.tar"))
    assert samples["s0"]["normal.png"] == (raw / "media" / "n0.png").read_bytes()  # given normals are kept
    for key, name in (("s1", "d1.npy"), ("s4", "d2.npy")):
        depth = np.load(raw / "media" / name).astype(np.float32).squeeze()
        ref = media.encode_normal_png(media.normals_from_depth(depth, scale=0.5))
        assert samples[key]["normal.png"] == ref
        n = np.asarray(Image.open(io.BytesIO(ref))).astype(float) / 127.5 - 1
        assert np.abs(np.linalg.norm(n, axis=-1) - 1).max() < 0.02


def test_max_shard_bytes(raw: Path, tmp_path: Path) -> None:
    limit = 64 * 1024
    result = make_shards(raw / "manifest.jsonl", tmp_path, max_shard_bytes=limit, progress=False)
    assert sum(result["sizes"].values()) == 5 and len(result["sizes"]) > 1
    for name, n in result["sizes"].items():
        assert (tmp_path / name).stat().st_size <= limit or n == 1, name


@pytest.mark.parametrize(
    ("field", "name", "data"),
    [
        ("image", "bad.jpg", b"\xff\xd8\xff\xe0 this is not really a jpeg"),
        ("image", "half.png", "truncated-png"),
        ("video", "bad.mp4", b"\x00\x00\x00\x18ftypmp42 garbage" * 10),
        ("audio", "bad.flac", b"fLaC" + b"\x00" * 50),
        ("audio", "bad.mp3", b"ID3 not audio at all" * 20),
        ("depth", "eight_bit.png", "8-bit-png"),
        ("normal", "gray.png", "8-bit-png"),
    ],
)
def test_corrupt_file_names_line_and_path(
    raw: Path, tmp_path: Path, field: str, name: str, data: object
) -> None:
    if data == "truncated-png":
        full = (raw / "media" / "img1.png").read_bytes()
        data = full[: len(full) // 2]
    elif data == "8-bit-png":
        buf = io.BytesIO()
        Image.fromarray(np.zeros((8, 8), np.uint8)).save(buf, format="PNG")
        data = buf.getvalue()
    (raw / "media" / name).write_bytes(data)
    lines = [json.loads(x) for x in (raw / "manifest.jsonl").read_text().splitlines()]
    lines.insert(3, {"key": "broken", field: f"media/{name}"})  # line 4
    manifest = write_manifest(raw / "manifest.jsonl", lines)
    out = tmp_path / "out"
    with pytest.raises(ManifestError) as err:
        make_shards(manifest, out, samples_per_shard=1, progress=False)
    msg = str(err.value)
    assert "line 4" in msg and f"media/{name}" in msg and "'broken'" in msg, msg
    assert list(out.iterdir()) == []  # the shards written before the error are removed

    result = make_shards(manifest, out, samples_per_shard=1, skip_bad=True, progress=False)
    assert result["num_samples"] == 5 and [s[:2] for s in result["skipped"]] == [(4, "broken")]
    assert "broken" not in {r["key"] for r in scan_shards(out)}


def test_manifest_errors_name_the_line(raw: Path, tmp_path: Path) -> None:
    def fails(lines: list, match: str) -> None:
        manifest = write_manifest(tmp_path / "m.jsonl", lines) if isinstance(lines, list) else lines
        with pytest.raises(ManifestError, match=match):
            make_shards(manifest, tmp_path / "o", progress=False)

    img = str(raw / "media" / "img0.jpg")
    fails(
        [{"key": "a", "image": img}, {"key": "b", "image": "nowhere/x.jpg"}],
        r"m\.jsonl:2: image file 'nowhere/x\.jpg' not found",
    )
    fails(
        [{"key": "a", "image": img}, {"key": "b"}, {"key": "a"}], r":3: duplicate key 'a' \(first on line 1\)"
    )
    fails([{"key": "a.b", "image": img}], r":1: invalid sample key 'a\.b'")
    fails([{"key": "a", "imgae": img}], r":1: unknown field\(s\) \['imgae'\]")
    fails([{"key": "a", "captions": {"title": "x"}}], r":1: unknown caption field\(s\) \['title'\]")
    fails([{"image": img}], r":1: missing 'key'")
    (tmp_path / "bad.jsonl").write_text('{"key": "a"}\n{"key": \n')
    fails(tmp_path / "bad.jsonl", r"bad\.jsonl:2: not valid JSON")


def test_existing_shards_need_overwrite(raw: Path, tmp_path: Path) -> None:
    make_shards(raw / "manifest.jsonl", tmp_path, samples_per_shard=1, progress=False)
    with pytest.raises(ValueError, match="already holds 5 shard"):
        make_shards(raw / "manifest.jsonl", tmp_path, progress=False)
    make_shards(raw / "manifest.jsonl", tmp_path, overwrite=True, progress=False)
    assert sorted(p.name for p in tmp_path.glob("*.tar")) == ["corpus-000000.tar"]


def test_shard_writer_is_reproducible_and_abort_cleans_up(tmp_path: Path) -> None:
    def write(d: Path) -> None:
        with ShardWriter(d, "x", samples_per_shard=2) as w:
            for i in range(3):
                w.write(f"k{i}", {"txt": f"caption {i}".encode(), "json": b"{}"})

    write(tmp_path / "a")
    write(tmp_path / "b")
    for name in ("x-000000.tar", "x-000001.tar", schema.SIZES_FILE):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    with pytest.raises(RuntimeError), ShardWriter(tmp_path / "c", "x", samples_per_shard=1) as w:
        w.write("k0", {"txt": b"a"})
        w.write("k1", {"txt": b"b"})
        raise RuntimeError("boom")
    assert list((tmp_path / "c").iterdir()) == []


def test_cli(raw: Path, tmp_path: Path) -> None:
    tool = [sys.executable, "tools/make_shards.py"]
    help_ = subprocess.run([*tool, "--help"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert help_.returncode == 0 and "--derive-normals" in help_.stdout and "manifest" in help_.stdout
    args = ["--manifest", str(raw / "manifest.jsonl"), "--out", str(tmp_path / "o"), "--quiet"]
    ok = subprocess.run(
        [*tool, *args, "--max-shard-bytes", "1M"], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert ok.returncode == 0, ok.stderr
    assert "5 samples in 1 shard(s)" in ok.stdout
    (raw / "media" / "v0.mp4").write_bytes(b"junk")
    bad = subprocess.run([*tool, *args, "--overwrite"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "line 1" in bad.stderr and "media/v0.mp4" in bad.stderr


# ----------------------------------------------------------------------------- encoders


@pytest.mark.parametrize("codec", media.MP4_CODECS)
def test_mp4_codecs_round_trip(codec: str) -> None:
    import av

    clip = frames(t=5, h=32, w=48)
    data = media.encode_video(clip, fps=2.5, codec=codec)
    assert data == media.encode_video(clip, fps=2.5, codec=codec)  # deterministic
    with av.open(io.BytesIO(data)) as c:
        stream = c.streams.video[0]
        assert stream.codec_context.name == {"libx264": "h264", "mpeg4": "mpeg4"}[codec]
        assert stream.average_rate == 2.5
        decoded = np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])
    assert decoded.shape == clip.shape
    assert np.abs(decoded.astype(int) - clip.astype(int)).mean() < 8
    with pytest.raises(ValueError, match="even frame sizes, got H=33"):
        media.encode_mp4(frames(h=33), 4)


def test_normals_from_depth_of_a_tilted_plane() -> None:
    # D(x, y_down) = 0.5 x + 0.25 row -> n ~ (D_x, D_y_up, 1) = (0.5, -0.25, 1) everywhere
    rows, cols = np.mgrid[0:16, 0:20].astype(np.float64)
    n = media.normals_from_depth(0.5 * cols + 0.25 * rows)
    ref = np.array([0.5, -0.25, 1.0]) / np.linalg.norm([0.5, -0.25, 1.0])
    np.testing.assert_allclose(n, np.broadcast_to(ref, n.shape), atol=1e-6)
    # scale multiplies the slopes; a flat wall faces the camera: RGB (128, 128, 255)
    np.testing.assert_allclose(media.normals_from_depth(np.full((4, 4), 7.0), scale=3.0)[0, 0], [0, 0, 1])
    assert media.normals_to_rgb(np.array([[[0.0, 0.0, 1.0], [-1.0, 1.0, 0.0]]])).tolist() == [
        [[128, 128, 255], [0, 255, 128]]
    ]
    with pytest.raises(ValueError, match="NaN"):
        media.normals_from_depth(np.array([[1.0, np.nan], [1.0, 1.0]]))
