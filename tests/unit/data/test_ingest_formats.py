"""tools/make_shards.py --format F: each pretraining corpus's published layout (files written here,
with real media: H.264/AAC MP4, VP9/Opus MKV, FLAC/WAV, M4A) becomes shards the loader reads; what
cannot be used (a missing file, a bad JSON line or entry, a span past the video's end) is skipped and
named FILE:LINE: key; a video without sound is kept and noted. Also: caption lists are drawn per visit,
seeded by the sample's stream position."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import av
import numpy as np
import pytest

from mico_ds.cli import make_shards
from mico_ds.config import InputConfig
from mico_ds.data import schema
from mico_ds.data.io import iter_tar_samples
from mico_ds.data.read.decode import SampleDecoder
from mico_ds.data.write import media
from mico_ds.data.write.ingest import STATE_FILE

FPS, SR, W, H = 8, 16000, 64, 48
INPUTS = InputConfig(image_size=32, num_frames=2, mel_bins=16, clip_frames=32)


def video(seconds: float, sound: bool = True, fmt: str = "mp4", tone: float = 440.0) -> bytes:
    """A 64x48 clip at 8 fps whose frame i is grey level 9i, with a sine tone (AAC in MP4, Opus in MKV)."""
    buf = io.BytesIO()
    with av.open(buf, "w", format="matroska" if fmt == "mkv" else fmt) as c:
        vs = c.add_stream("libx264" if fmt == "mp4" else "libvpx-vp9", rate=FPS)
        vs.width, vs.height, vs.pix_fmt = W, H, "yuv420p"
        vs.codec_context.thread_count = 1
        a = (
            c.add_stream("aac" if fmt == "mp4" else "libopus", rate=SR if fmt == "mp4" else 48000)
            if sound
            else None
        )
        for i in range(int(seconds * FPS)):
            frame = av.VideoFrame.from_ndarray(np.full((H, W, 3), 9 * i, np.uint8), format="rgb24")
            frame.pts = i
            for p in vs.encode(frame):
                c.mux(p)
        for p in vs.encode():
            c.mux(p)
        if a is not None:
            sr = a.codec_context.sample_rate
            wave = (0.3 * np.sin(2 * np.pi * tone * np.arange(int(seconds * sr)) / sr)).astype(np.float32)
            af = av.AudioFrame.from_ndarray(wave[None], format="flt", layout="mono")
            af.sample_rate, af.pts = sr, 0
            for p in [*a.encode(af), *a.encode()]:
                c.mux(p)
    return buf.getvalue()


def m4a(seconds: float) -> bytes:
    buf = io.BytesIO()
    with av.open(buf, "w", format="ipod") as c:
        a = c.add_stream("aac", rate=SR, layout="mono")
        af = av.AudioFrame.from_ndarray(tone_wave(seconds)[None], format="flt", layout="mono")
        af.sample_rate, af.pts = SR, 0
        for p in [*a.encode(af), *a.encode()]:
            c.mux(p)
    return buf.getvalue()


def tone_wave(seconds: float) -> np.ndarray:
    return (0.3 * np.sin(2 * np.pi * 330 * np.arange(int(seconds * SR)) / SR)).astype(np.float32)


def probe(data: bytes) -> dict:
    """Frame count, frame times, audio samples and rate of a clip, decoded with PyAV."""
    with av.open(io.BytesIO(data)) as c:
        times = [f.time for f in c.decode(video=0)] if c.streams.video else []
    with av.open(io.BytesIO(data)) as c:
        audio = c.streams.audio[0] if c.streams.audio else None
        samples = sum(f.samples for f in c.decode(audio=0)) if audio is not None else 0
        rate = audio.codec_context.sample_rate if audio is not None else None
    return {"frames": len(times), "times": times, "samples": samples, "rate": rate}


def shards(out: Path) -> dict[str, dict[str, bytes]]:
    sizes = json.loads((out / schema.SIZES_FILE).read_text())
    assert sorted(sizes) == sorted(p.name for p in out.glob("*.tar"))
    samples = {k: m for name in sorted(sizes) for k, m in iter_tar_samples(out / name)}
    assert sum(sizes.values()) == len(samples)
    return samples


def report(out: Path, name: str = "skipped.txt") -> list[str]:
    return (out / name).read_text().splitlines()


def line_of(path: Path, needle: str) -> int:
    """1-based line of the first occurrence of ``needle`` in ``path``."""
    text = path.read_text()
    return text[: text.index(needle)].count("\n") + 1


def decode(sample: dict[str, bytes], key: str, modalities: list[str], caption: bool = True) -> dict:
    return SampleDecoder(modalities, INPUTS, train=False, require_caption=caption)({"__key__": key, **sample})


def run(fmt: str, ann: list[Path], out: Path, root: Path | None) -> dict:
    """``tools/make_shards.py --format fmt ...`` (in this process); its OUT/ingest.json."""
    argv = ["--format", fmt, "--annotations", *map(str, ann), "--out", str(out), "--samples-per-shard", "2",
            "--workers", "1", "--max-skip", "1.0", "--quiet"]  # fmt: skip
    assert make_shards.main(argv + (["--media-root", str(root)] if root else [])) == 0
    state = json.loads((out / STATE_FILE).read_text())
    assert state["complete"]
    return {"records": state["consumed"], "num_samples": sum(state["shards"].values()), **state}


# ----------------------------------------------------------------------------- VAST-27M


def test_vast27m(tmp_path: Path) -> None:
    root = tmp_path / "videos"
    root.mkdir()
    (root / "c0.mp4").write_bytes(video(1.5))
    (root / "c1.mp4").write_bytes(video(1.0, sound=False))
    (root / "c5.mkv").write_bytes(video(1.0, fmt="mkv"))
    (root / "-0UwVrsbr0w_000030.mp4").write_bytes(video(1.0))
    (root / "dQw4w9WgXcQ.mp4").write_bytes(video(3.0))  # the long video of c4 (no clip file)
    caps = {"vision_cap": [f"v{i}" for i in range(5)], "audio_cap": [f"a{i}" for i in range(5)],
            "subtitle": "hello there", "vast_cap": "a grey screen brightens while a tone plays"}  # fmt: skip
    entries = [
        {"clip_id": "c0", **caps},
        {"clip_id": "c1", **caps},
        {"clip_id": "c2", **caps},  # no file
        {"clip_id": "c3", **caps, "vision_cap": 3},  # malformed
        {"clip_id": "c4", **caps, "clip_span": ["00:00:01.000", "00:00:02.000"],
         "url": "https://www.youtube.com/watch?v=dQw4w9WgXcQ"},
        {"clip_id": "c5", **caps},
        {"video_id": "-0UwVrsbr0w_000030", "desc": ["a dog barks at a passing car", "a dog barks"]},  # VALOR
    ]  # fmt: skip
    ann = tmp_path / "vast27m_0.json"
    ann.write_text(json.dumps(entries, indent=1))
    out = tmp_path / "out"
    r = run("vast27m", [ann], out, root)
    assert (r["records"], r["num_samples"], r["skipped"]) == (7, 5, 2)
    assert r["skip_kinds"] == {"missing_file": 1, "bad_entry": 1}
    samples = shards(out)
    assert list(samples) == ["c0", "c1", "c4", "c5", "-0UwVrsbr0w_000030"]
    valor = json.loads(samples["-0UwVrsbr0w_000030"]["json"])["captions"]
    assert valor == {"omni": ["a dog barks at a passing car", "a dog barks"]}
    assert all(set(m) == {"mp4", "json"} for m in samples.values())
    assert samples["c0"]["mp4"] == (root / "c0.mp4").read_bytes()  # a clip file is stored as it is
    meta = json.loads(samples["c0"]["json"])
    want = {"vision": caps["vision_cap"], "audio": caps["audio_cap"], "subtitle": "hello there",
            "omni": caps["vast_cap"]}  # fmt: skip
    assert meta == {"captions": want, "source": "vast27m"}
    assert json.loads(samples["c4"]["json"])["url"].endswith("dQw4w9WgXcQ")
    skipped = report(out)
    c2, c3 = line_of(ann, '"c2"') - 1, line_of(ann, '"c3"') - 1  # the entry's "{" is the line before
    assert skipped[0].startswith(f"{ann}:{c2} (entry 2): c2: missing_file: video not found: {root}/c2.")
    assert "c2.{mp4,webm,mkv,mov,m4v}" in skipped[0]
    assert skipped[1].startswith(
        f"{ann}:{c3} (entry 3): c3: bad_entry: vision_cap must be a string or a list"
    )
    notes = report(out, "notes.txt")
    assert [n.split(": ", 2)[1:] for n in notes] == [
        ["c1", "no audio stream: kept as a video-only sample"],
        [
            "c4",
            "no clip file: cut from the long video dQw4w9WgXcQ.mp4, span ['00:00:01.000', '00:00:02.000']",
        ],
    ]
    c0, c4, c5 = probe(samples["c0"]["mp4"]), probe(samples["c4"]["mp4"]), probe(samples["c5"]["mp4"])
    assert c4["frames"] == 8 and c4["times"][0] == 0.0 and abs(c4["samples"] - SR) <= 1024  # 1 s cut
    assert c5["frames"] == 8 and c5["rate"] == 48000  # the MKV remuxed into MP4 (VP9 + Opus), not re-encoded
    for key in ["c0", "c1", "c4", "c5"]:
        out_ = decode(samples[key], key, ["video"])
        assert tuple(out_["video"].shape) == (2, 3, 32, 32)
        assert out_["fields"]["vision"] == "v0" and out_["fields"]["audio"] == "a0"  # eval: the first
    assert c0["samples"] > 0
    if hasattr(schema, "AUDIO_TRACK_EXTS"):  # the loader reads audio from the clip's own track
        assert tuple(decode(samples["c0"], "c0", ["video", "audio"])["audio"].shape)[:2] == (1, 1)


# ----------------------------------------------------------------------------- HD-VILA-100M


def test_hdvila(tmp_path: Path) -> None:
    root = tmp_path / "download_videos"
    root.mkdir()
    (root / "QMi8x8o55Ns.mp4").write_bytes(video(3.0))
    (root / "-b_1aZ9kLmQ.mp4").write_bytes(video(2.0, sound=False))
    lines = [
        {"video_id": "QMi8x8o55Ns", "url": "https://www.youtube.com/watch?v=QMi8x8o55Ns", "clip": [
            {"clip_id": "QMi8x8o55Ns.1.mp4", "span": ["00:00:00.500", "00:00:01.750"]},
            {"clip_id": "QMi8x8o55Ns.2.mp4", "span": ["00:00:02.500", "00:00:05.000"]},  # ends past the end
            {"clip_id": "QMi8x8o55Ns.3.mp4", "span": ["00:00:03.500", "00:00:04.000"]},  # starts past it
        ]},
        '{"video_id": "broken", "clip": [',
        {"video_id": "-b_1aZ9kLmQ", "url": "u",
         "clip": [{"clip_id": "-b_1aZ9kLmQ.1.mp4", "span": ["0:00:00.0", "0:00:01.0"]}]},
        {"video_id": "gone1234567", "url": "u",
         "clip": [{"clip_id": "gone1234567.1.mp4", "span": ["00:00:00.000", "00:00:01.000"]}]},
    ]  # fmt: skip
    ann = tmp_path / "hdvila_part0.jsonl"
    ann.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    out = tmp_path / "out"
    r = run("hdvila", [ann], out, root)
    assert (r["records"], r["num_samples"], r["skip_kinds"]) == (6, 3, {"span_past_end": 1, "bad_entry": 1,
                                                                       "missing_file": 1})  # fmt: skip
    samples = shards(out)
    assert list(samples) == ["QMi8x8o55Ns_1", "QMi8x8o55Ns_2", "-b_1aZ9kLmQ_1"]
    a1, a2, b1 = (probe(samples[k]["mp4"]) for k in samples)
    # [0.5, 1.75) at 8 fps: 10 frames from t=0 (grey levels of frames 4..13); [2.5, 3.0): 4 frames
    assert (a1["frames"], a1["times"][0], a1["times"][-1]) == (10, 0.0, 1.125)
    assert abs(a1["samples"] - 1.25 * SR) <= 1024 and a1["rate"] == SR
    assert (a2["frames"], a2["times"][-1]) == (4, 0.375) and abs(a2["samples"] - 0.5 * SR) <= 1024
    assert (b1["frames"], b1["samples"]) == (8, 0)
    with av.open(io.BytesIO(samples["QMi8x8o55Ns_1"]["mp4"])) as c:
        first = next(c.decode(video=0)).to_ndarray(format="rgb24")
    assert abs(float(first.mean()) - 36) < 4  # frame 4 (t = 0.5 s) opens the clip
    meta = json.loads(samples["QMi8x8o55Ns_2"]["json"])
    assert meta == {"captions": {}, "source": "hdvila", "span": ["00:00:02.500", "00:00:05.000"],
                    "url": lines[0]["url"], "video_id": "QMi8x8o55Ns"}  # fmt: skip
    skipped = report(out)
    assert skipped[0] == (f"{ann}:1 (clip 2): QMi8x8o55Ns_3: span_past_end: span starts at 3.500 s, past the "
                          "video's end (3.000 s)")  # fmt: skip
    assert skipped[1].startswith(f"{ann}:2: -: bad_entry: not valid JSON")
    assert skipped[2].startswith(
        f"{ann}:4 (clip 0): gone1234567_1: missing_file: video not found: {root}/gone1234567."
    )
    assert report(out, "notes.txt") == [
        f"{ann}:1 (clip 1): QMi8x8o55Ns_2: span ends at 5.000 s, past the video's end (3.000 s): cut at "
        "the end",
        f"{ann}:3 (clip 0): -b_1aZ9kLmQ_1: no audio stream: kept as a video-only sample",
    ]
    for key in samples:
        assert tuple(decode(samples[key], key, ["video"], caption=False)["video"].shape) == (2, 3, 32, 32)


# ----------------------------------------------------------------------------- video2dataset


def _v2d_samples(root: Path) -> list[tuple[str, dict[str, bytes]]]:
    """What video2dataset writes per sample: media, txt (the caption), json (url, key, status, ...)."""

    def meta(key: str, status: str = "success", error: str | None = None) -> bytes:
        return json.dumps({"url": f"https://example.com/{key}.mp4", "key": key, "status": status,
                           "error_message": error, "caption": None}, indent=4).encode()  # fmt: skip

    return [
        ("000000000", {"mp4": video(1.0, sound=False), "txt": b"a grey ramp", "json": meta("000000000")}),
        ("000000001", {"txt": b"gone", "json": meta("000000001", "failed_to_download", "HTTP Error 404")}),
        ("000000002", {"mp4": video(1.0), "m4a": m4a(1.0), "txt": b"a tone", "json": meta("000000002")}),
        ("000000003", {"mp4": video(1.0), "txt": b"bad meta", "json": b"{not json"}),
    ]


def test_video2dataset(tmp_path: Path) -> None:
    import webdataset as wds

    samples = _v2d_samples(tmp_path)
    stats = {"count": 5, "successes": 3, "failed_to_download": 2, "failed_to_subsample": 0}
    wd = tmp_path / "v2d_wds"
    wd.mkdir()
    with wds.TarWriter(str(wd / "00000.tar")) as tw:  # the writer video2dataset uses
        for key, members in samples:
            tw.write({"__key__": key, **members})
    (wd / "00000_stats.json").write_text(json.dumps({**stats, "duration": 1.0, "status_dict": {}}))
    files = tmp_path / "v2d_files"
    (files / "00000").mkdir(parents=True)
    for key, members in samples:
        for ext, data in members.items():
            (files / "00000" / f"{key}.{ext}").write_bytes(data)
    (files / "00000_stats.json").write_text(json.dumps(stats))
    results = {}
    for name, folder in (("wds", wd), ("files", files)):
        out = tmp_path / f"out_{name}"
        r = run("video2dataset", [folder], out, None)
        assert r["upstream"] == {"stats_files": 1, **stats}
        assert (r["records"], r["num_samples"], r["skip_kinds"]) == (
            4,
            2,
            {"upstream_failed": 1, "bad_entry": 1},
        )
        results[name] = (shards(out), report(out))
    (wds_samples, wds_skips), (file_samples, file_skips) = results["wds"], results["files"]
    assert wds_samples == file_samples  # the same samples from either layout
    audio_ext = "m4a" if "m4a" in schema.AUDIO_EXTS else "flac"  # kept when the loader reads M4A
    assert {k: set(m) for k, m in wds_samples.items()} == {
        "000000000": {"mp4", "json"}, "000000002": {"mp4", audio_ext, "json"}}  # fmt: skip
    src = dict(samples)
    assert wds_samples["000000002"]["mp4"] == src["000000002"]["mp4"]
    assert json.loads(wds_samples["000000000"]["json"]) == {"captions": {"vision": "a grey ramp"},
        "source": "video2dataset", "url": "https://example.com/000000000.mp4"}  # fmt: skip
    assert wds_skips[0] == f"{wd}/00000.tar[000000001]: 000000001: upstream_failed: video2dataset status " \
                           "'failed_to_download': HTTP Error 404"  # fmt: skip
    assert wds_skips[1].startswith(
        f"{wd}/00000.tar[000000003]: 000000003: bad_entry: json member is not valid"
    )
    assert file_skips[0].startswith(f"{files}/00000/000000001.json: 000000001: upstream_failed")
    got = decode(wds_samples["000000002"], "k", ["video", "audio"])
    assert tuple(got["video"].shape) == (2, 3, 32, 32) and got["fields"] == {"vision": "a tone"}


# ----------------------------------------------------------------------------- WavCaps


def test_wavcaps(tmp_path: Path) -> None:
    root = tmp_path / "waveforms"
    (root / "SoundBible_flac").mkdir(parents=True)
    (root / "AudioSet_SL_flac").mkdir()
    (root / "SoundBible_flac" / "2219.flac").write_bytes(media.encode_flac(tone_wave(1.0)))
    (root / "AudioSet_SL_flac" / "Y-0OkG0fLLkc.flac").write_bytes(media.encode_flac(tone_wave(0.5)))
    item = {
        "title": "t",
        "description": "d",
        "author": "a",
        "href": "h",
        "duration": 1.0,
        "audio": "wav_path",
    }
    sb = tmp_path / "json_files" / "SoundBible" / "sb_final.json"
    sb.parent.mkdir(parents=True)
    sb.write_text(json.dumps({"num_captions_per_audio": 1, "data": [  # one line, as published
        {**item, "id": "2219", "caption": "An airplane is landing."},
        {**item, "id": "2218", "caption": "Someone is ringing a bell."},  # not downloaded
        {**item, "id": "2217", "caption": 5},  # malformed
    ]}))  # fmt: skip
    asl = tmp_path / "json_files" / "AudioSet_SL" / "as_final.json"
    asl.parent.mkdir(parents=True)
    entry = {"id": "Y-0OkG0fLLkc.wav", "caption": "A man speaks.", "duration": 0.5, "audio": "wav_path"}
    asl.write_text(json.dumps({"num_captions_per_audio": 1, "data": [entry]}, indent=2))
    out = tmp_path / "out"
    r = run("wavcaps", [sb, asl], out, root)
    assert (r["records"], r["num_samples"], r["skip_kinds"]) == (4, 2, {"missing_file": 1, "bad_entry": 1})
    samples = shards(out)
    assert list(samples) == ["sb_2219", "as_Y-0OkG0fLLkc"]
    assert samples["sb_2219"]["flac"] == (root / "SoundBible_flac" / "2219.flac").read_bytes()
    assert json.loads(samples["as_Y-0OkG0fLLkc"]["json"]) == {
        "captions": {"audio": "A man speaks."}, "category": "AudioSet_SL", "source": "wavcaps"}  # fmt: skip
    skipped = report(out)
    assert skipped[0].startswith(f"{sb}:1 (entry 1): sb_2218: missing_file: audio not found: ")
    assert f"{root}/SoundBible_flac/2218.flac" in skipped[0]
    assert (
        skipped[1] == f"{sb}:1 (entry 2): -: bad_entry: caption must be a string or a list of strings, got 5"
    )
    got = decode(samples["sb_2219"], "sb_2219", ["audio"])
    assert got["fields"] == {"audio": "An airplane is landing."} and got["audio"].shape[-2] == 16


# ----------------------------------------------------------------------------- WebVid


def write_webvid(tmp_path: Path, n: int = 3) -> tuple[Path, Path]:
    """results_2M_train.csv and DATA_DIR/videos/<page_dir>/<videoid>.mp4 (silent, as WebVid's are)."""
    data = tmp_path / "webvid"
    rows = [["videoid", "contentUrl", "duration", "page_dir", "name"]]
    for i in range(n):
        vid, page = str(1053841541 + i), f"{i // 4 * 50 + 1:06d}_{i // 4 * 50 + 50:06d}"
        rows.append([vid, f"https://ak.picdn.net/shutterstock/videos/{vid}/preview.mp4", "PT00H00M01S", page,
                     f"Clip {i}, a grey ramp brightening"])  # fmt: skip
        if i != 1:  # clip 1 was not downloaded
            (data / "videos" / page).mkdir(parents=True, exist_ok=True)
            (data / "videos" / page / f"{vid}.mp4").write_bytes(
                media.encode_mp4(
                    np.broadcast_to(
                        np.arange(8, dtype=np.uint8)[:, None, None, None] * (20 + i % 10), (8, H, W, 3)
                    ),
                    FPS,
                )
            )
    csv_path = tmp_path / "results_2M_train.csv"
    with open(csv_path, "w", newline="") as f:
        csv.writer(f).writerows(rows)
    return csv_path, data


def test_webvid(tmp_path: Path) -> None:
    csv_path, data = write_webvid(tmp_path)
    with open(csv_path, "a") as f:
        f.write("99,too,few\n")  # a malformed row (line 5)
    out = tmp_path / "out"
    r = run("webvid", [csv_path], out, data)  # DATA_DIR: its videos/ folder is looked in too
    assert (r["records"], r["num_samples"], r["skip_kinds"], r["notes"]) == (4, 2, {"missing_file": 1,
                                                                             "bad_entry": 1}, 0)  # fmt: skip
    samples = shards(out)
    assert list(samples) == ["1053841541", "1053841543"]
    assert json.loads(samples["1053841543"]["json"])["captions"] == {
        "vision": "Clip 2, a grey ramp brightening"
    }
    skipped = report(out)
    assert skipped[0].startswith(f"{csv_path}:3: 1053841542: missing_file: video not found: ")
    assert skipped[1] == f"{csv_path}:5: -: bad_entry: malformed CSV row: 3 fields, the header has 5"
    for key in samples:
        assert decode(samples[key], key, ["video"])["fields"]["vision"].startswith("Clip")


# ----------------------------------------------------------------------------- caption lists in training


def test_caption_lists_are_drawn_per_visit_seeded_and_resumable(tmp_path: Path) -> None:
    """A field holding five captions yields one per visit: the same one for the same stream position
    (a resumed stream redraws exactly), a new draw in the next epoch."""
    from mico_ds.data.read.plan import StreamPlan
    from mico_ds.data.read.stream import ShardStream, StreamSpec
    from mico_ds.data.write.tar import write_tar

    jpg = media.encode_jpeg(np.full((16, 16, 3), 128, np.uint8))
    caps = {"vision": [f"caption {j}" for j in range(5)]}
    shard = tmp_path / "c-000000.tar"
    write_tar(
        shard, [(f"k{i}", {"jpg": jpg, "json": json.dumps({"captions": caps}).encode()}) for i in range(6)]
    )

    def draws(position: tuple[int, int, int], batches: int) -> list[dict[str, str]]:
        plan = StreamPlan(urls=(str(shard),), num_streams=1, seed=7, shuffle_buffer=4)
        spec = StreamSpec("c", plan, ("image",), INPUTS, batch_size=3, train=True, tokenizer=None,
                          text_max_len=16, rank=0, workers=1, positions=[position])  # fmt: skip
        it = iter(ShardStream(spec))
        msgs = [next(it) for _ in range(batches)]
        return [{k: f["vision"]} for m in msgs for k, f in zip(m.batch["keys"], m.fields)]

    full = draws((0, 0, 0), 4)  # epochs 0 and 1, 6 samples each
    assert draws((0, 0, 3), 3) == full[3:]  # resumed after one batch: the same captions
    epoch0 = {k: v for d in full[:6] for k, v in d.items()}
    epoch1 = {k: v for d in full[6:] for k, v in d.items()}
    assert sorted(epoch0) == sorted(epoch1) == [f"k{i}" for i in range(6)]
    assert set(epoch0.values()) | set(epoch1.values()) <= set(caps["vision"])
    assert epoch0 != epoch1  # drawn anew in the next epoch
    assert len(set(epoch0.values()) | set(epoch1.values())) >= 3


# ----------------------------------------------------------------------------- the annotation readers


def test_json_array_reader_streams_with_lines(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Entries and their lines, with a read buffer of 7 characters: values (numbers too) cut by it
    are read on; a syntax error names its line and column."""
    from mico_ds.data.write.formats import common

    monkeypatch.setattr(common._Cursor, "CHUNK", 7)
    entries = [{"id": i, "x": 12345.678 * i, "s": "a, b [c] {d}" * i} for i in range(40)] + [123456789]
    doc = tmp_path / "a.json"
    doc.write_text(json.dumps({"num": 3, "meta": {"k": [1, 2]}, "data": entries}, indent=2))
    header: dict = {}
    got = list(common.iter_json_array(doc, "data", header))
    assert [e for _, _, e in got] == entries and header == {"num": 3, "meta": {"k": [1, 2]}}
    text = doc.read_text().splitlines()
    assert all(text[line - 1].strip() in ("{", "123456789") for line, _, _ in got)
    assert [i for _, i, _ in got] == list(range(41))
    (tmp_path / "b.json").write_text('[\n {"a": 1},\n {"a": 2,, "b": 3}\n]')
    with pytest.raises(common.AnnotationError, match=r"b\.json:3:10: not valid JSON: Expecting"):
        list(common.iter_json_array(tmp_path / "b.json"))
    with pytest.raises(common.AnnotationError, match=r"expected an array at the top level"):
        list(common.iter_json_array(doc))


def test_cli_lists_the_formats_and_fails_on_too_many_skips(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit):
        make_shards.main(["--help"])
    listed = capsys.readouterr().out.split("formats (--format):")[1]
    for name in ("manifest", "vast27m", "hdvila", "video2dataset", "wavcaps", "webvid"):
        assert f"\n  {name} " in listed
    csv_path, data = write_webvid(tmp_path, 3)
    argv = ["--format", "webvid", "--annotations", str(csv_path), "--media-root", str(data), "--out",
            str(tmp_path / "o"), "--quiet", "--workers", "1"]  # fmt: skip
    assert make_shards.main([*argv, "--max-skip", "0"]) == 1  # the one missing video is too many
    assert "1 of 3 records skipped" in capsys.readouterr().err
    assert make_shards.main([*argv, "--max-skip", "1"]) == 0
    assert "already complete: 2 samples in 1 shard(s)" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        make_shards.main([*argv, "--derive-normals"])
    assert "--derive-normals is for --format manifest only" in capsys.readouterr().err
