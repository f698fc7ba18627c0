"""Audio from a video's own track, and the PyAV audio members (m4a, aac, ogg, opus): real media written
here with PyAV (H.264 + AAC MP4, ADTS AAC, Ogg Vorbis, Ogg Opus) of known tones, decoded by the real
SampleDecoder, the real loader on a real tar, and make_shards on a real manifest."""

from __future__ import annotations

import io
import json
from pathlib import Path

import av
import numpy as np
import pytest
import torch

from mico_ds.config import DataConfig, DecodeLimits, InputConfig
from mico_ds.data import schema
from mico_ds.data.io import find_member, iter_tar_samples, member_modalities
from mico_ds.data.read.audio import audio_clips, decode_audio
from mico_ds.data.read.decode import SampleDecoder
from mico_ds.data.read.loader import EvalLoader
from mico_ds.data.read.skips import SkipSample
from mico_ds.data.write import media
from mico_ds.data.write.manifest import make_shards
from tests.unit.data.test_pipeline import write_tar

INP = InputConfig(image_size=32, num_frames=4, mel_bins=64, clip_frames=64, num_clips=2)
SR = INP.sample_rate
CAPTION = json.dumps({"captions": {"vision": "a grey square", "audio": "a tone"}}).encode()
FRAMES = np.stack([np.full((32, 32, 3), 15 * i, np.uint8) for i in range(16)])  # 2 s at 8 fps


def sine(freq: float, seconds: float = 2.0) -> np.ndarray:
    return (0.3 * np.sin(2 * np.pi * freq * np.arange(int(seconds * SR)) / SR)).astype(np.float32)


def encode(wave: np.ndarray, fmt: str, codec: str, channels: int = 1, video: bool = False) -> bytes:
    """``wave`` (mono) encoded by ``codec`` in container ``fmt``; with ``video``, H.264 frames first
    (FRAMES) and the audio as the second stream, as crawled MP4s are laid out."""
    layout = "mono" if channels == 1 else "stereo"
    buf = io.BytesIO()
    with av.open(buf, mode="w", format=fmt, container_options={"fflags": "+bitexact"}) as c:
        if video:
            v = c.add_stream(media.mp4_codec(), rate=8)
            v.width, v.height, v.pix_fmt = 32, 32, "yuv420p"
            v.codec_context.thread_count = 1
        # FFmpeg's own Vorbis encoder is "experimental" and writes stereo only.
        a = c.add_stream(
            codec, rate=SR, layout=layout, options={"strict": "experimental"} if codec == "vorbis" else {}
        )
        if video:
            for f in FRAMES:
                for p in v.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                    c.mux(p)
            for p in v.encode():
                c.mux(p)
        planes, sample_fmt = (
            (wave[None], "flt") if codec == "libopus" else (np.repeat(wave[None], channels, 0), "fltp")
        )
        frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(planes), format=sample_fmt, layout=layout)
        frame.sample_rate, frame.pts = SR, 0
        for p in [*a.encode(frame), *a.encode()]:
            c.mux(p)
    return buf.getvalue()


def remux_audio(data: bytes, fmt: str = "ipod") -> bytes:
    """The audio stream of ``data``, packets copied unchanged into an ``fmt`` (m4a) container."""
    out = io.BytesIO()
    with (
        av.open(io.BytesIO(data)) as src,
        av.open(out, "w", format=fmt, container_options={"fflags": "+bitexact"}) as dst,
    ):
        s = src.streams.audio[0]
        d = dst.add_stream_from_template(s)
        for p in src.demux(s):
            if p.dts is not None:  # the demuxer's final flush packet
                p.stream = d
                dst.mux(p)
    return out.getvalue()


def mel_bin(freq: float) -> int:
    """The Kaldi mel bin (20 Hz - Nyquist, htk mel) whose centre is nearest ``freq``."""
    mel = lambda f: 1127.0 * np.log1p(f / 700.0)  # noqa: E731
    lo, hi = mel(20.0), mel(SR / 2)
    centres = lo + (np.arange(INP.mel_bins) + 1) * (hi - lo) / (INP.mel_bins + 1)
    return int(np.argmin(np.abs(centres - mel(freq))))


def peak_bin(clips: torch.Tensor) -> int:
    return int(clips.mean(dim=(0, 1, 3)).argmax())


@pytest.fixture(scope="module")
def mp4_440() -> bytes:
    return encode(sine(440), "mp4", "aac", video=True)


def test_find_member_falls_back_to_the_track_only_when_asked() -> None:
    assert find_member(["mp4", "json"], "audio") is None
    assert find_member(["mp4", "json"], "audio", audio_track=True) == "mp4"
    assert find_member(["webm", "frame0.jpg", "frame1.jpg"], "audio", audio_track=True) == "webm"
    assert find_member(["gif", "json"], "audio", audio_track=True) is None  # no sound in a GIF
    assert find_member(["mp4", "opus"], "audio", audio_track=True) == "opus"  # the member first
    assert member_modalities(["mp4", "json"]) == ["video"]  # sound unknown without opening it
    assert member_modalities(["m4a", "json"]) == ["audio"]


def test_mp4_with_aac_track_yields_video_and_audio(mp4_440: bytes) -> None:
    assert mel_bin(440) == 11
    dec = SampleDecoder(["audio", "video"], INP, train=False)
    out = dec({"__key__": "k", "mp4": mp4_440, "json": CAPTION})
    assert out["video"].shape == (INP.num_frames, 3, 32, 32) and out["video"].dtype == torch.uint8
    assert out["audio"].shape == (INP.num_clips, 1, INP.mel_bins, INP.clip_frames)
    # The same AAC packets in an m4a member, through the same decoder path: the same tensor.
    m4a = remux_audio(mp4_440)
    torch.testing.assert_close(out["audio"], decode_audio(m4a, "m4a", INP, train=False), rtol=0, atol=1e-6)
    # Not silence: the tone's filterbank, peaked at the 440 Hz bin like that of the source sine.
    ref = audio_clips(sine(440), INP, train=False)
    assert peak_bin(out["audio"]) == peak_bin(ref) == mel_bin(440)
    assert float((out["audio"] - ref).abs().mean()) < 0.05 * float(ref.abs().mean())
    # Training mode (random clips, dither) decodes the track too.
    out = dec({"__key__": "k", "mp4": mp4_440, "json": CAPTION}, np.random.default_rng(0))
    assert peak_bin(out["audio"]) == mel_bin(440)


@pytest.mark.parametrize(
    "ext,fmt,codec,channels",
    [
        ("m4a", "ipod", "aac", 1),
        ("aac", "adts", "aac", 1),
        ("ogg", "ogg", "vorbis", 2),
        ("opus", "opus", "libopus", 1),
    ],
)
def test_pyav_audio_members_decode_to_the_tone(ext: str, fmt: str, codec: str, channels: int) -> None:
    assert ext in schema.AUDIO_EXTS
    out = SampleDecoder(["audio"], INP, train=False)(
        {"__key__": "k", ext: encode(sine(440), fmt, codec, channels), "json": CAPTION}
    )
    ref = audio_clips(sine(440), INP, train=False)
    assert peak_bin(out["audio"]) == mel_bin(440)
    assert float((out["audio"] - ref).abs().mean()) < 0.1 * float(ref.abs().mean())


def test_audio_member_takes_precedence_over_the_track(mp4_440: bytes) -> None:
    m4a_880 = encode(sine(880), "ipod", "aac")
    dec = SampleDecoder(["video", "audio"], INP, train=False)
    both = dec({"__key__": "k", "mp4": mp4_440, "m4a": m4a_880, "json": CAPTION})
    assert peak_bin(both["audio"]) == mel_bin(880) != mel_bin(440)
    frames = {f"frame{i}.jpg": media.encode_jpeg(FRAMES[4 * i]) for i in range(4)}
    track = dec({"__key__": "k", "mp4": mp4_440, **frames, "json": CAPTION})  # frames serve video
    assert peak_bin(track["audio"]) == mel_bin(440)


def test_track_counts_against_the_member_cap_and_silent_containers(mp4_440: bytes) -> None:
    cap = DecodeLimits(member_bytes=len(mp4_440) - 1)
    with pytest.raises(SkipSample) as e:
        SampleDecoder(["audio"], INP, train=False, limits=cap)(
            {"__key__": "k", "mp4": mp4_440, "json": CAPTION}
        )
    assert e.value.reason == "too_large_member"
    silent = media.encode_mp4(FRAMES)
    with pytest.raises(SkipSample) as e:  # an audio member without an audio stream is broken audio
        decode_audio(silent, "m4a", INP, train=False)
    assert e.value.reason == "bad_audio"
    with pytest.raises(SkipSample) as e:
        decode_audio(silent, "mp4", INP, train=False)
    assert e.value.reason == "no_audio_stream"


def test_video_without_audio_stream_is_a_counted_skip(tmp_path: Path, mp4_440: bytes) -> None:
    silent = media.encode_mp4(FRAMES)
    write_tar(tmp_path / "av-0.tar", [
        ("with_sound", {"mp4": mp4_440, "json": CAPTION}),
        ("silent", {"mp4": silent, "json": CAPTION}),
        ("gif_only", {"gif": media.encode_video(FRAMES[:4], 8, "gif"), "json": CAPTION}),
    ])  # fmt: skip
    data = DataConfig(root=str(tmp_path), tokenizer="", num_workers=0, max_skip_rate=1.0)
    ev = EvalLoader(["av-0.tar"], ["video", "audio"], INP, data, batch_size=4, rank=0, world_size=1)
    batches = list(ev)
    assert [k for b in batches for k in b[schema.KEYS]] == ["with_sound"]
    assert batches[0]["audio"].shape == (1, INP.num_clips, 1, INP.mel_bins, INP.clip_frames)
    st = ev.skip_stats()
    assert st["skipped"] == {"no_audio_stream": 1, "missing_modality": 1} and st["seen"] == 3
    assert st["examples"]["no_audio_stream"][0].startswith("silent")


def test_make_shards_accepts_m4a_and_opus(tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    raw.mkdir()
    files = {
        "a.m4a": encode(sine(440, 0.5), "ipod", "aac"),
        "b.opus": encode(sine(440, 0.5), "opus", "libopus"),
    }
    for name, data in files.items():
        (raw / name).write_bytes(data)
    (raw / "bad.ogg").write_bytes(media.encode_mp4(FRAMES[:2]))  # a container without audio
    lines = [{"key": "s0", "audio": "a.m4a", "captions": {"audio": "a tone"}},
             {"key": "s1", "audio": "b.opus", "captions": {"audio": "a tone"}},
             {"key": "s2", "audio": "bad.ogg"}]  # fmt: skip
    (raw / "m.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    result = make_shards(raw / "m.jsonl", tmp_path / "out", skip_bad=True, progress=False)
    assert result["num_samples"] == 2 and [s[1] for s in result["skipped"]] == ["s2"]
    assert "no audio stream" in result["skipped"][0][2]
    samples = dict(iter_tar_samples(tmp_path / "out" / "corpus-000000.tar"))
    assert samples["s0"]["m4a"] == files["a.m4a"] and samples["s1"]["opus"] == files["b.opus"]
    dec = SampleDecoder(["audio"], INP, train=False)
    for key in ("s0", "s1"):
        assert peak_bin(dec({"__key__": key, **samples[key]})["audio"]) == mel_bin(440)
