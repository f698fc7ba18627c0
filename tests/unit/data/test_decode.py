"""Per-modality decoding: real codecs in, tensors of the declared shapes and values out."""

from __future__ import annotations

import io
import json
import math

import numpy as np
import pytest
import torch

from mico_ds.config import InputConfig
from mico_ds.data import io as data_io
from mico_ds.data import schema
from mico_ds.data.read import audio as A
from mico_ds.data.read import decode as D
from mico_ds.data.read import skips
from mico_ds.data.read import visual as V
from mico_ds.data.write import media as media

INP = InputConfig(image_size=32, num_frames=4, mel_bins=64, clip_frames=64, num_clips=2)


def denorm(x: torch.Tensor, inputs: InputConfig = INP) -> torch.Tensor:
    """Normalized (..., 3, H, W) -> RGB in [0, 1]."""
    std = torch.tensor(inputs.image_std).view(3, 1, 1)
    mean = torch.tensor(inputs.image_mean).view(3, 1, 1)
    return x * std + mean


def solid(h: int, w: int, rgb: tuple[int, int, int]) -> np.ndarray:
    a = np.zeros((h, w, 3), np.uint8)
    a[...] = rgb
    return a


# ----------------------------------------------------------------------------- images


@pytest.mark.parametrize("fmt", ["jpg", "png"])
@pytest.mark.parametrize("train", [False, True])
def test_solid_image_decodes_to_its_colour(fmt: str, train: bool) -> None:
    rgb = (200, 40, 90)
    data = media.encode_jpeg(solid(60, 90, rgb), 95) if fmt == "jpg" else media.encode_png(solid(60, 90, rgb))
    rng = np.random.default_rng(0) if train else None
    x, _ = V.decode_image(data, INP, train, rng)
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32
    got = denorm(x).mean(dim=(1, 2))
    torch.testing.assert_close(got, torch.tensor(rgb, dtype=torch.float32) / 255, atol=3 / 255, rtol=0)


def test_eval_crop_is_the_center_square() -> None:
    # 96 x 32: green | red | green thirds -> the central 32 x 32 square is red only.
    a = solid(32, 96, (0, 200, 0))
    a[:, 32:64] = (200, 0, 0)
    x, crop = V.decode_image(media.encode_png(a), INP, train=False)
    assert crop == V.Crop(1 / 3, 0.0, 2 / 3, 1.0)
    rgb = denorm(x)
    assert rgb[0].min() > 0.7 and rgb[1].max() < 0.1  # all red, no green anywhere


def test_train_crop_is_seeded_and_within_scale() -> None:
    data = media.encode_jpeg(np.random.default_rng(1).integers(0, 255, (120, 160, 3), dtype=np.uint8))
    a, ca = V.decode_image(data, INP, True, np.random.default_rng(7))
    b, cb = V.decode_image(data, INP, True, np.random.default_rng(7))
    c, cc = V.decode_image(data, INP, True, np.random.default_rng(8))
    assert ca == cb and torch.equal(a, b)
    assert ca != cc
    for seed in range(50):
        cr = V.random_resized_crop(160, 120, INP.train_crop_scale, np.random.default_rng(seed))
        area = (cr.x1 - cr.x0) * (cr.y1 - cr.y0)
        assert INP.train_crop_scale[0] - 0.02 <= area <= INP.train_crop_scale[1] + 1e-9
        assert 0 <= cr.x0 < cr.x1 <= 1 and 0 <= cr.y0 < cr.y1 <= 1


def test_jpeg_draft_matches_full_decode() -> None:
    # A smooth 512 px image: the reduced-scale DCT decode must agree with a full decode + resize.
    yy, xx = np.mgrid[0:512, 0:512]
    a = np.stack([xx / 2, yy / 2, (xx + yy) / 4], -1).astype(np.uint8)
    x_jpg, _ = V.decode_image(media.encode_jpeg(a, 95), INP, train=False)
    x_png, _ = V.decode_image(media.encode_png(a), INP, train=False)
    assert (denorm(x_jpg) - denorm(x_png)).abs().mean() < 2 / 255


@pytest.mark.parametrize("data", [b"", b"\xff\xd8\xff" + b"\x00" * 20, b"not an image"])
def test_bad_image_is_a_skip(data: bytes) -> None:
    with pytest.raises(skips.SkipSample) as e:
        V.decode_image(data, INP, train=False)
    assert e.value.reason == "bad_image"


# ----------------------------------------------------------------------------- video


def test_frame_indices() -> None:
    assert V.frame_indices(16, 4, False, None) == [1, 5, 9, 13]
    assert V.frame_indices(3, 4, False, None) == [0, 0, 1, 2]  # short videos repeat frames
    rng = np.random.default_rng(0)
    for _ in range(20):
        idx = V.frame_indices(16, 4, True, rng)
        assert [i // 4 for i in idx] == [0, 1, 2, 3]  # one inside each segment


def coded_frames(t: int, h: int = 32, w: int = 48) -> np.ndarray:
    """Frame i is a solid grey of level 20 * i + 10 (survives lossy coding to +-6)."""
    return np.stack([solid(h, w, (20 * i + 10,) * 3) for i in range(t)])


def frame_ids(x: torch.Tensor) -> list[int]:
    level = denorm(x).mean(dim=(1, 2, 3)) * 255  # (T,)
    return [int(round((v.item() - 10) / 20)) for v in level]


@pytest.mark.parametrize("fmt", ["mp4", "webm", "gif"])
def test_video_samples_the_right_frames(fmt: str) -> None:
    data = media.encode_video(coded_frames(12), fps=8, fmt=fmt)
    x, _ = V.decode_video(data, INP, train=False)
    assert x.shape == (4, 3, 32, 32)
    assert frame_ids(x) == V.frame_indices(12, 4, False, None)
    x, _ = V.decode_video(data, INP, train=True, rng=np.random.default_rng(3))
    assert frame_ids(x) == V.frame_indices(12, 4, True, np.random.default_rng(3))


def test_pre_extracted_frames_equal_video_decode() -> None:
    frames = coded_frames(12)
    sample = {f"frame{i}.jpg": media.encode_jpeg(f, 95) for i, f in enumerate(frames)}
    sample["frame10.jpg"], sample["frame2.jpg"] = sample["frame10.jpg"], sample["frame2.jpg"]
    names = data_io.frame_members(sample)
    assert names == [f"frame{i}.jpg" for i in range(12)]  # numeric, not lexicographic, order
    x, _ = V.decode_frames([sample[n] for n in names], INP, train=False)
    assert x.shape == (4, 3, 32, 32)
    assert frame_ids(x) == V.frame_indices(12, 4, False, None)


def test_video_frames_share_one_crop() -> None:
    # A static textured video: every sampled frame, cropped identically, must be identical.
    tex = np.random.default_rng(0).integers(0, 255, (48, 64, 3), dtype=np.uint8)
    sample = [media.encode_png(tex)] * 8
    x, crop = V.decode_frames(sample, INP, train=True, rng=np.random.default_rng(5))
    assert all(torch.equal(x[0], x[t]) for t in range(1, 4))
    assert crop != V.center_crop(64, 48)


def test_eval_num_frames() -> None:
    inp = InputConfig(image_size=16, num_frames=4, eval_num_frames=6)
    data = media.encode_mp4(coded_frames(12))
    assert V.decode_video(data, inp, train=False)[0].shape == (6, 3, 16, 16)
    assert V.decode_video(data, inp, train=True, rng=np.random.default_rng(0))[0].shape == (4, 3, 16, 16)


def test_not_a_video_is_a_skip() -> None:
    with pytest.raises(skips.SkipSample) as e:
        V.decode_video(b"\x00\x00\x00\x18ftypmp42" + b"junk" * 100, INP, train=False)
    assert e.value.reason == "bad_video"


# ----------------------------------------------------------------------------- audio


def kaldi_fbank_reference(wave: np.ndarray, sr: int, num_bins: int) -> np.ndarray:
    """Kaldi's fbank written out in numpy (the algorithm of torchaudio.compliance.kaldi.fbank with
    MiCo's settings: 25/10 ms, hanning, pre-emphasis 0.97, DC removal, power, 20 Hz..Nyquist)."""
    wl, ws, nfft = int(sr * 0.025), int(sr * 0.010), 512
    n = 1 + (len(wave) - wl) // ws
    frames = np.stack([wave[i * ws : i * ws + wl] for i in range(n)]).astype(np.float64)
    frames -= frames.mean(axis=1, keepdims=True)
    prev = np.concatenate([frames[:, :1], frames[:, :-1]], axis=1)
    frames = frames - 0.97 * prev
    frames *= 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(wl) / (wl - 1))
    power = np.abs(np.fft.rfft(frames, nfft)) ** 2  # (n, 257)

    def mel(f: np.ndarray | float) -> np.ndarray:
        return 1127.0 * np.log(1.0 + np.asarray(f) / 700.0)

    lo, hi = mel(20.0), mel(sr / 2)
    delta = (hi - lo) / (num_bins + 1)
    m = mel(np.arange(nfft // 2) * sr / nfft)  # Kaldi drops the Nyquist bin
    left = lo + np.arange(num_bins)[:, None] * delta
    up = (m - left) / delta
    down = (left + 2 * delta - m) / delta
    weights = np.maximum(0.0, np.minimum(up, down))  # (bins, nfft/2)
    energies = power[:, : nfft // 2] @ weights.T
    return np.log(np.maximum(energies, np.finfo(np.float32).eps))


def test_kaldi_fbank_matches_the_formula() -> None:
    rng = np.random.default_rng(0)
    t = np.arange(8000) / 16000
    wave = (0.3 * np.sin(2 * np.pi * 440 * t) + 0.05 * rng.standard_normal(t.size)).astype(np.float32)
    got = A.kaldi_fbank(wave, 16000, 64)
    ref = kaldi_fbank_reference(wave, 16000, 64)
    assert got.shape == ref.shape == (1 + (8000 - 400) // 160, 64)
    np.testing.assert_allclose(got, ref, atol=2e-3, rtol=1e-4)


def expected_mel_bin(freq: float, sr: int, bins: int) -> int:
    """The Kaldi mel bin whose triangle peaks closest to ``freq``."""
    mel = lambda f: 1127.0 * math.log(1 + f / 700.0)  # noqa: E731
    lo, hi = mel(20.0), mel(sr / 2)
    delta = (hi - lo) / (bins + 1)
    return int(round((mel(freq) - lo) / delta - 1))


@pytest.mark.parametrize("fmt,rate", [("flac", 16000), ("wav", 22050), ("mp3", 44100)])
def test_tone_peaks_at_its_mel_bin(fmt: str, rate: int) -> None:
    t = np.arange(int(rate * 1.5)) / rate
    wave = (0.5 * np.sin(2 * np.pi * 1000 * t)).astype(np.float32)
    enc = {"flac": media.encode_flac, "wav": media.encode_wav, "mp3": media.encode_mp3}[fmt]
    x = A.decode_audio(enc(wave, rate), fmt, INP, train=False)
    assert x.shape == (2, 1, 64, 64) and x.dtype == torch.float32
    profile = x[0, 0].mean(dim=1)  # (F,)
    assert int(profile.argmax()) == expected_mel_bin(1000, 16000, 64)


def test_stereo_is_mixed_to_mono_and_resampled() -> None:
    rate = 8000
    t = np.arange(rate) / rate
    tone = np.sin(2 * np.pi * 1000 * t)
    stereo = np.stack([0.4 * tone, 0.4 * tone], axis=1).astype(np.float32)
    wave = A.load_waveform(media.encode_wav(stereo, rate), "wav", 16000)
    assert abs(len(wave) - 16000) <= 32
    assert abs(np.abs(wave[1000:-1000]).max() - 0.4) < 0.02


def test_audio_clips_equal_slices_of_the_full_filterbank() -> None:
    inp = InputConfig(mel_bins=32, clip_frames=50, num_clips=3)
    wave = np.random.default_rng(0).standard_normal(16000 * 3).astype(np.float32) * 0.1
    x = A.audio_clips(wave, inp, train=False)  # (3, 1, 32, 50)
    full = A.kaldi_fbank(wave - wave.mean(), 16000, 32)
    full = (full - inp.audio_mean) / (2 * inp.audio_std)
    n_slices = math.ceil(full.shape[0] / 50)
    groups = np.array_split(np.arange(n_slices), 3)
    for c, g in enumerate(groups):
        s = int(g[(len(g) + 1) // 2 - 1])
        ref = full[s * 50 : (s + 1) * 50].T
        np.testing.assert_allclose(x[c, 0, :, : ref.shape[1]].numpy(), ref, atol=1e-4)


def test_short_audio_is_padded() -> None:
    inp = InputConfig(mel_bins=32, clip_frames=100, num_clips=2)
    wave = np.random.default_rng(0).standard_normal(8000).astype(np.float32) * 0.1  # 0.5 s = 48 frames
    x = A.audio_clips(wave, inp, train=True, rng=np.random.default_rng(0))
    assert x.shape == (2, 1, 32, 100)
    real = [c for c in range(2) if x[c].abs().sum() > 0]
    assert len(real) == 1  # one clip holds the audio, the other is padding
    assert (x[real[0], 0, :, 48:] == 0).all() and (x[real[0], 0, :, :48] != 0).any()


def test_train_audio_is_reproducible() -> None:
    wave = np.random.default_rng(0).standard_normal(16000 * 4).astype(np.float32) * 0.1
    a = A.audio_clips(wave, INP, True, np.random.default_rng(3))
    b = A.audio_clips(wave, INP, True, np.random.default_rng(3))
    assert torch.equal(a, b)


@pytest.mark.parametrize("data", [b"", b"fLaC" + b"\x00" * 40, b"RIFF....WAVEjunk"])
def test_bad_audio_is_a_skip(data: bytes) -> None:
    with pytest.raises(skips.SkipSample) as e:
        A.decode_audio(data, "flac", INP, train=False)
    assert e.value.reason == "bad_audio"


# ----------------------------------------------------------------------------- depth / normals


@pytest.mark.parametrize("ext", ["depth.png", "depth.npy"])
def test_depth_is_normalized_and_shares_the_image_crop(ext: str) -> None:
    # Image: red left half; depth (at half the resolution): far left half. After the same random
    # crop, "red" pixels and "far" pixels must coincide.
    img = solid(64, 96, (0, 0, 200))
    img[:, :48] = (200, 0, 0)
    depth = np.full((32, 48), 1000, np.uint16)
    depth[:, :24] = 5000
    if ext == "depth.png":
        dbytes = media.encode_png16(depth)
    else:
        buf = io.BytesIO()
        np.save(buf, depth.astype(np.float32))
        dbytes = buf.getvalue()
    rng = np.random.default_rng(11)
    x, crop = V.decode_image(media.encode_png(img), INP, True, rng)
    d, crop_d = V.decode_depth(dbytes, ext, INP, True, rng, crop)
    assert crop_d == crop and d.shape == (1, 32, 32)
    assert abs(d.mean().item()) < 1e-4 and abs(d.std(unbiased=False).item() - 1) < 1e-3
    red = denorm(x)[0] > 0.5
    far = d[0] > 0
    assert (red == far).float().mean() > 0.95


def test_normals_round_trip() -> None:
    n = np.zeros((40, 40, 3), np.float32)
    n[:, :20] = (0, 0, 1)
    n[:, 20:] = (0.6, 0, 0.8)
    x, _ = V.decode_normal(media.encode_normal_png(n), INP, train=False)
    assert x.shape == (3, 32, 32)
    left, right = x[:, :, :12].mean(dim=(1, 2)), x[:, :, 20:].mean(dim=(1, 2))
    torch.testing.assert_close(left, torch.tensor([0.0, 0.0, 1.0]), atol=1 / 127, rtol=0)
    torch.testing.assert_close(right, torch.tensor([0.6, 0.0, 0.8]), atol=1 / 127, rtol=0)


# ----------------------------------------------------------------------------- text and samples


def test_captions_in_schema_order() -> None:
    caps = {"depth": "d", "subtitle": "s", "vision": "v", "audio": "a", "other": "x"}
    fields = D.caption_fields({"json": json.dumps({"captions": caps}).encode()})
    assert D.join_captions(fields) == schema.CAPTION_SEP.join(["v", "a", "s", "d"])
    # img2dataset layout: txt is the vision caption; its json carries metadata only.
    f2 = D.caption_fields({"txt": b"a cat ", "json": b'{"url": "http://x", "status": "success"}'})
    assert f2 == {"vision": "a cat"}
    # Several captions per field: first in eval, a seeded choice in train.
    multi = {"json": json.dumps({"captions": {"vision": ["one", "two", "three"]}}).encode()}
    assert D.caption_fields(multi) == {"vision": "one"}
    picks = {D.caption_fields(multi, np.random.default_rng(s))["vision"] for s in range(20)}
    assert picks == {"one", "two", "three"}


@pytest.mark.parametrize("raw", [b"{not json", b"[1, 2]", b'{"captions": "str"}'])
def test_bad_json_is_a_skip(raw: bytes) -> None:
    with pytest.raises(skips.SkipSample) as e:
        D.caption_fields({"json": raw})
    assert e.value.reason == "bad_json"


def test_sample_decoder_all_modalities_and_missing_one() -> None:
    frames = coded_frames(8, 32, 32)
    n = np.zeros((32, 32, 3), np.float32)
    n[..., 2] = 1
    t = np.arange(16000) / 16000
    sample = {
        "__key__": "k0",
        "jpg": media.encode_jpeg(frames[3]),
        "mp4": media.encode_mp4(frames),
        "flac": media.encode_flac((0.3 * np.sin(2 * np.pi * 500 * t)).astype(np.float32)),
        "depth.png": media.encode_png16(np.arange(32 * 32, dtype=np.uint16).reshape(32, 32)),
        "normal.png": media.encode_normal_png(n),
        "json": json.dumps({"captions": {"vision": "grey", "audio": "hum"}}).encode(),
    }
    dec = D.SampleDecoder(list(schema.MODALITIES), INP, train=True)
    out = dec(sample, np.random.default_rng(0))
    assert out["image"].shape == (3, 32, 32) and out["image"].dtype == torch.uint8
    assert out["video"].shape == (4, 3, 32, 32)
    assert out["audio"].shape == (2, 1, 64, 64)
    assert out["depth"].shape == (1, 32, 32)
    assert out["normal"].shape == (3, 32, 32)
    assert D.join_captions(out["fields"]) == "grey ; hum"
    del sample["flac"]  # audio then comes from the mp4's track, and this mp4 has none
    with pytest.raises(skips.SkipSample) as e:
        dec(sample, np.random.default_rng(0))
    assert e.value.reason == "no_audio_stream"
    del sample["depth.png"]
    with pytest.raises(skips.SkipSample) as e:
        dec(sample, np.random.default_rng(0))
    assert e.value.reason == "missing_modality"
    # Extra members are ignored: an image-only decoder does not touch the (absent) audio.
    assert set(D.SampleDecoder(["image"], INP, train=False)(sample)) == {"key", "fields", "source", "image"}
