"""``data.limits``: each cap is checked on a size or header before decoding and is its own counted skip
reason; an unexpected exception of a decoder is the skip ``decode_error``; nothing stops a worker."""

from __future__ import annotations

import io
import json
import logging
import warnings
import zlib
from pathlib import Path

import av
import numpy as np
import pytest
import soundfile as sf
from PIL import Image

from mico_ds.config import DataConfig, DecodeLimits, InputConfig, RunConfig, load_config
from mico_ds.data import schema
from mico_ds.data.fuzz_mutate import apply_ops
from mico_ds.data.io import OVERSIZED, iter_tar
from mico_ds.data.read import audio as A
from mico_ds.data.read import decode as D
from mico_ds.data.read import limits as L
from mico_ds.data.read import visual as V
from mico_ds.data.read.loader import EvalLoader
from mico_ds.data.read.skips import DECODE_ERROR, SkipSample
from mico_ds.data.write import media
from tests.unit.data.test_pipeline import write_tar

INP = InputConfig(image_size=32, num_frames=4, mel_bins=32, clip_frames=32, num_clips=2)
CAPTION = json.dumps({"captions": {"vision": "a thing"}}).encode()
RGB = np.full((40, 56, 3), 120, np.uint8)


def reason_of(modalities: list[str], sample: dict, limits: DecodeLimits | None = None) -> str:
    with pytest.raises(SkipSample) as e:
        D.SampleDecoder(modalities, INP, train=False, limits=limits)(
            {"__key__": "k", "json": CAPTION, **sample}
        )
    return e.value.reason


def png_claiming(w: int, h: int) -> bytes:
    """A real 56 x 40 PNG whose IHDR (CRC fixed) claims w x h: what a decompression bomb looks like."""
    data = bytearray(media.encode_png(RGB))
    data[16:24] = w.to_bytes(4, "big") + h.to_bytes(4, "big")
    data[29:33] = zlib.crc32(bytes(data[12:29])).to_bytes(4, "big")
    return bytes(data)


def test_defaults_and_config_keys() -> None:
    lim = RunConfig().data.limits
    assert (lim.member_bytes, lim.image_pixels, lim.json_bytes) == (
        256 << 20,
        Image.MAX_IMAGE_PIXELS,
        1 << 20,
    )
    assert set(L.REASONS) == {f for f in vars(lim)}
    cfg = load_config("debug", ["--data.limits.image_pixels=0", "--data.limits.audio_seconds=30"])
    assert cfg.data.limits.image_pixels == 0 and cfg.data.limits.audio_seconds == 30.0
    with pytest.raises(ValueError, match="data.limits.video_frames must be >= 0"):
        DecodeLimits(video_frames=-1)


def test_image_pixels_from_the_header_before_decoding() -> None:
    bomb = png_claiming(60_000, 60_000)  # 3.6e9 pixels: ~11 GB decoded
    assert reason_of(["image"], {"png": bomb}) == L.TOO_MANY_PIXELS
    assert (
        reason_of(["image"], {"png": media.encode_png(RGB)}, DecodeLimits(image_pixels=1000))
        == "too_many_pixels"
    )
    # With our cap off, Pillow's own DecompressionBombError (2 x MAX_IMAGE_PIXELS) is the same skip.
    assert reason_of(["image"], {"png": bomb}, DecodeLimits(image_pixels=0)) == L.TOO_MANY_PIXELS
    # Between Pillow's warning and error thresholds our cap decides, and no warning escapes.
    ok = png_claiming(10_000, 10_000)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert reason_of(["image"], {"png": ok}) == L.TOO_MANY_PIXELS  # 1e8 > the default 89.5e6
        assert (
            reason_of(["image"], {"png": ok}, DecodeLimits(image_pixels=0)) == "bad_image"
        )  # data too short


def test_the_pixel_cap_covers_depth_normals_and_frames() -> None:
    small = DecodeLimits(image_pixels=1000)
    assert (
        reason_of(["depth"], {"depth.png": media.encode_png16(np.ones((40, 56), np.uint16))}, small)
        == "too_many_pixels"
    )
    assert reason_of(["normal"], {"normal.png": media.encode_png(RGB)}, small) == "too_many_pixels"
    frames = {f"frame{i}.jpg": media.encode_jpeg(RGB) for i in range(4)}
    assert reason_of(["video"], frames, small) == "too_many_pixels"
    assert reason_of(["video"], frames, DecodeLimits(video_pixels=1000)) == "too_large_frames"
    assert reason_of(["video"], frames, DecodeLimits(video_frames=3)) == "too_many_frames"
    # A .npy header claiming 60,000 x 60,000 float32 (14 GB) is refused before numpy allocates it.
    buf = io.BytesIO()
    np.save(buf, np.ones((40, 56), np.float32))
    npy = apply_ops(buf.getvalue(), [("header", 1 / 64, 2)])
    assert b"(60000, 60000)" in npy[:128]
    assert reason_of(["depth"], {"depth.npy": npy}) == "too_many_pixels"
    assert reason_of(["depth"], {"depth.npy": npy}, DecodeLimits(image_pixels=0)) == "bad_depth"  # truncated


def test_video_frames_and_resolution() -> None:
    frames = np.stack([RGB[:32, :48]] * 12)
    mp4, webm = media.encode_mp4(frames), media.encode_video(frames, 8, "webm")
    assert reason_of(["video"], {"mp4": mp4}, DecodeLimits(video_frames=10)) == "too_many_frames"  # header
    assert reason_of(["video"], {"webm": webm}, DecodeLimits(video_frames=10)) == "too_many_frames"  # counted
    assert reason_of(["video"], {"mp4": mp4}, DecodeLimits(video_pixels=32 * 48 - 1)) == "too_large_frames"
    out = D.SampleDecoder(["video"], INP, False, limits=DecodeLimits(video_frames=12))(
        {"webm": webm, "json": CAPTION}
    )
    assert out["video"].shape == (4, 3, 32, 32)


def test_unknown_frame_count_keeps_only_the_sampled_frames() -> None:
    # webm states no frame count: the old decoder converted and kept every frame before sampling.
    frames = np.stack([np.full((32, 48, 3), 20 * i + 10, np.uint8) for i in range(12)])
    x, _ = V.decode_video(media.encode_video(frames, 8, "webm"), INP, train=False, as_uint8=True)
    levels = x.double().mean(dim=(1, 2, 3)).tolist()
    np.testing.assert_allclose(levels, [20 * i + 10 for i in V.frame_indices(12, 4, False, None)], atol=6)


def wav(seconds: float, rate: int = 16000) -> bytes:
    return media.encode_wav(np.zeros(int(seconds * rate), np.float32) + 0.01, rate)


def test_audio_seconds_from_the_header_and_while_decoding() -> None:
    small = DecodeLimits(audio_seconds=2.0)
    assert reason_of(["audio"], {"wav": wav(3)}, small) == "too_long_audio"  # soundfile's header
    assert (
        reason_of(["audio"], {"mp3": media.encode_mp3(np.zeros(48000, np.float32))}, small)
        == "too_long_audio"
    )
    # A FLAC header claiming 2^36 - 1 samples (49 days at 16 kHz) is refused before anything is read.
    flac = apply_ops(media.encode_flac(np.zeros(16000, np.float32)), [("header", 1 / 64, 18)])
    assert reason_of(["audio"], {"flac": flac}) == "too_long_audio"
    # Length unknown (0 samples in STREAMINFO: a FLAC written to a pipe): PyAV decodes it, counting.
    unknown = apply_ops(media.encode_flac(np.zeros(3 * 16000, np.float32) + 0.01), [("header", 1 / 64, 0)])
    assert sf.info(io.BytesIO(unknown)).frames >= A.UNKNOWN_FRAMES
    assert reason_of(["audio"], {"flac": unknown}, small) == "too_long_audio"
    assert D.SampleDecoder(["audio"], INP, False)({"flac": unknown, "json": CAPTION})["audio"].shape == (
        2,
        1,
        32,
        32,
    )


@pytest.mark.parametrize("rate", [1, 250_000_000])
def test_sample_rates_no_recording_has_are_refused(rate: int) -> None:
    # 250 MHz down to 16 kHz: libswresample's filter alone took 2 GB; 1 Hz up: ~30 bytes per sample.
    data = bytearray(wav(0.5))
    data[24:28] = rate.to_bytes(4, "little")
    assert reason_of(["audio"], {"wav": bytes(data)}) == "bad_audio"


def test_block_resampling_equals_one_call() -> None:
    wave = (0.1 * np.random.default_rng(0).standard_normal(200_003)).astype(np.float32)
    rs = av.AudioResampler(format="flt", layout="mono", rate=16000)
    frame = av.AudioFrame.from_ndarray(wave[None], format="flt", layout="mono")
    frame.sample_rate = 44100
    ref = np.concatenate([f.to_ndarray()[0] for f in [*rs.resample(frame), *rs.resample(None)]])
    assert np.array_equal(A.resample(wave, 44100, 16000), ref)
    stereo = np.stack([wave, -0.5 * wave], 1)
    buf = io.BytesIO()
    sf.write(buf, stereo, 44100, format="WAV", subtype="FLOAT")
    mono = np.asarray(stereo, np.float32).mean(axis=1)
    assert np.array_equal(A.load_waveform(buf.getvalue(), "wav", 16000), A.resample(mono, 44100, 16000))


def test_json_bytes_and_member_bytes() -> None:
    big = json.dumps({"captions": {"vision": "x" * 2000}}).encode()
    with pytest.raises(SkipSample) as e:
        D.SampleDecoder(["image"], INP, False, limits=DecodeLimits(json_bytes=1000))(
            {"json": big, "png": media.encode_png(RGB)}
        )
    assert e.value.reason == "too_large_json"
    assert (
        reason_of(
            ["image"], {"txt": b"y" * 2000, "png": media.encode_png(RGB)}, DecodeLimits(json_bytes=1000)
        )
        == "too_large_json"
    )
    png = media.encode_png(RGB)
    assert reason_of(["image"], {"png": png}, DecodeLimits(member_bytes=len(png) - 1)) == "too_large_member"
    # Members the corpus does not use are not held to the cap.
    out = D.SampleDecoder(["image"], INP, False, limits=DecodeLimits(member_bytes=len(png)))(
        {"png": png, "json": CAPTION, "flac": b"\x00" * (len(png) + 1)}
    )
    assert out["image"].shape == (3, 32, 32)


def test_iter_tar_does_not_read_oversized_members(tmp_path: Path) -> None:
    png = media.encode_png(RGB)
    url = str(
        write_tar(
            tmp_path / "s.tar",
            [("a", {"png": png, "mp4": b"v" * 100_000, "json": CAPTION}), ("b", {"png": png})],
        )
    )
    items = list(iter_tar(url, max_member_bytes=50_000))
    assert [i["__key__"] for i in items] == ["a", "b"]
    assert "mp4" not in items[0] and items[0][OVERSIZED] == {"mp4": 100_000} and items[0]["png"] == png
    assert OVERSIZED not in items[1]
    assert reason_of(["video"], items[0]) == "too_large_member"  # needed: skipped, without reading it
    assert D.SampleDecoder(["image"], INP, False)(items[0])["image"].shape == (3, 32, 32)  # not needed


def test_an_unexpected_decoder_exception_is_a_counted_skip(tmp_path: Path, monkeypatch, caplog) -> None:
    png = media.encode_png(RGB)
    url = str(write_tar(tmp_path / "s.tar", [(f"k{i}", {"png": png, "json": CAPTION}) for i in range(4)]))
    calls = {"n": 0}
    real = D.decode_image

    def flaky(*args, **kw):  # the third sample meets a bug of a decoding library
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyError("codec table")
        return real(*args, **kw)

    monkeypatch.setattr(D, "decode_image", flaky)
    data = DataConfig(root=str(tmp_path), tokenizer="", num_workers=0, max_skip_rate=1.0)
    ev = EvalLoader([url], ["image"], INP, data, batch_size=2, rank=0, world_size=1)
    with caplog.at_level(logging.WARNING, logger="mico_ds.data.read.stream"):
        keys = [k for b in ev for k in b[schema.KEYS]]
    assert keys == ["k0", "k1", "k3"]
    st = ev.skip_stats()
    assert st["skipped"] == {DECODE_ERROR: 1}
    (example,) = st["examples"][DECODE_ERROR]
    assert example.startswith("k2 (image member 'png': KeyError: 'codec table'")
    assert "KeyError" in caplog.text and "Traceback" in caplog.text  # the first ones are logged in full


def test_a_lone_surrogate_caption_does_not_stop_the_worker(tmp_path: Path) -> None:
    # Before: the tokenizer's TypeError on "\ud800" escaped from the batch, out of the worker.
    from mico_ds.data.tokenizer import Tokenizer, train_sentencepiece

    model = train_sentencepiece(
        [f"a picture of thing {i}" for i in range(200)], tmp_path / "tok", vocab_size=300
    )
    png = media.encode_png(RGB)
    bad = json.dumps({"captions": {"vision": "a \ud800 thing", "audio": "a hum"}}).encode()
    url = str(
        write_tar(
            tmp_path / "s.tar", [("good", {"png": png, "json": CAPTION}), ("odd", {"png": png, "json": bad})]
        )
    )
    data = DataConfig(root=str(tmp_path), num_workers=0, max_skip_rate=1.0)
    ev = EvalLoader(
        [url], ["image"], INP, data, batch_size=2, tokenizer=Tokenizer.from_path(model), rank=0, world_size=1
    )
    (batch,) = list(ev)
    assert batch[schema.KEYS] == ["good", "odd"] and batch[schema.CAPTIONS][1] == "a hum"
    assert batch[schema.TEXT_IDS].shape[0] == 2
