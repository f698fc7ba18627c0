"""Valid but unusual media, written by the real libraries (Pillow, PyAV, soundfile, numpy): each decodes
to the declared shapes and values, or is a counted skip with a clear reason -- never an exception out of
the sample decoder (docs/operations.md, "Bounded decoding and fuzzing")."""

from __future__ import annotations

import io
import json
import math

import av
import numpy as np
import pytest
import soundfile as sf
import torch
from PIL import Image

from mico_ds.config import InputConfig
from mico_ds.data.read import decode as D
from mico_ds.data.read.skips import SkipSample
from mico_ds.data.read.visual import frame_indices
from mico_ds.data.write import media

INP = InputConfig(image_size=32, num_frames=4, mel_bins=64, clip_frames=64, num_clips=2)
CAPTION = json.dumps({"captions": {"vision": "a thing", "audio": "a sound"}}).encode()
RGB = (200, 40, 90)


def decode(modality: str, ext: str, data: bytes, train: bool = False) -> dict:
    """The whole-sample decoder on a sample holding one member of ``modality`` and a caption."""
    dec = D.SampleDecoder([modality], INP, train=train)
    return dec({"__key__": "k", ext: data, "json": CAPTION}, np.random.default_rng(0) if train else None)


def skip_reason(modality: str, ext: str, data: bytes) -> str:
    with pytest.raises(SkipSample) as e:
        decode(modality, ext, data)
    return e.value.reason


def pil_bytes(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def solid_rgb(h: int = 40, w: int = 56, rgb: tuple[int, int, int] = RGB) -> Image.Image:
    a = np.zeros((h, w, 3), np.uint8)
    a[...] = rgb
    return Image.fromarray(a)


def mean_rgb(x: torch.Tensor) -> list[float]:
    return x.double().mean(dim=(-2, -1)).tolist()


# ----------------------------------------------------------------------------- images


def _palette_with_transparency() -> bytes:
    p = solid_rgb().convert("P", palette=Image.Palette.ADAPTIVE, colors=4)
    return pil_bytes(p, "PNG", transparency=0)


def _animated(fmt: str) -> bytes:
    frames = [solid_rgb(rgb=RGB), solid_rgb(rgb=(0, 0, 255)), solid_rgb(rgb=(0, 255, 0))]
    return pil_bytes(frames[0], fmt, save_all=True, append_images=frames[1:], duration=100)


IMAGES = {
    # name: (member ext, bytes, expected mean RGB of the decoded image or None: as Pillow converts it)
    "png_16bit_I;16": ("png", pil_bytes(Image.fromarray(np.full((40, 56), 30000, np.uint16)), "PNG"), None),
    "png_palette_transparency": ("png", _palette_with_transparency(), RGB),
    "jpeg_cmyk": ("jpg", pil_bytes(solid_rgb().convert("CMYK"), "JPEG", quality=95), None),
    "jpeg_progressive": ("jpg", pil_bytes(solid_rgb(), "JPEG", quality=95, progressive=True), RGB),
    "jpeg_greyscale": ("jpg", pil_bytes(solid_rgb().convert("L"), "JPEG", quality=95), None),
    "png_LA": ("png", pil_bytes(solid_rgb().convert("LA"), "PNG"), None),
    "png_1bit": ("png", pil_bytes(solid_rgb(rgb=(255, 255, 255)).convert("1"), "PNG"), (255, 255, 255)),
    "png_RGBA": ("png", pil_bytes(solid_rgb().convert("RGBA"), "PNG"), RGB),
    "gif_animated": ("jpg", _animated("GIF"), None),  # a GIF under .jpg: Pillow reads the content
    "apng_animated": ("png", _animated("PNG"), RGB),
    "webp_animated": ("webp", _animated("WEBP"), None),
    "webp_lossless_RGBA": ("webp", pil_bytes(solid_rgb().convert("RGBA"), "WEBP", lossless=True), RGB),
    "tiff_32bit_I": (
        "png",
        pil_bytes(Image.fromarray(np.full((40, 56), 70000, np.int32), "I"), "TIFF"),
        None,
    ),
    "tiff_float_F": (
        "png",
        pil_bytes(Image.fromarray(np.full((40, 56), 0.5, np.float32), "F"), "TIFF"),
        None,
    ),
    "bmp": ("png", pil_bytes(solid_rgb(), "BMP"), RGB),
    "ico": ("png", pil_bytes(solid_rgb(), "ICO"), RGB),
    "png_1x1": ("png", pil_bytes(solid_rgb(1, 1), "PNG"), RGB),
    "png_1x200": ("png", pil_bytes(solid_rgb(1, 200), "PNG"), RGB),
}


@pytest.mark.parametrize("name", list(IMAGES))
@pytest.mark.parametrize("train", [False, True])
def test_unusual_images_decode(name: str, train: bool) -> None:
    ext, data, expected = IMAGES[name]
    x = decode("image", ext, data, train)["image"]
    assert x.shape == (3, 32, 32) and x.dtype == torch.uint8
    if expected is None:  # what Pillow's own conversion to RGB gives for this mode
        expected = tuple(
            np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), np.float64).mean(axis=(0, 1))
        )
    np.testing.assert_allclose(mean_rgb(x), expected, atol=4)


def test_a_pdf_is_not_an_image() -> None:
    assert skip_reason("image", "jpg", pil_bytes(solid_rgb(), "PDF")) == "bad_image"


# ----------------------------------------------------------------------------- depth and normals


def _npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a)
    return buf.getvalue()


def _ramp(dtype: type = np.float32, shape: tuple[int, ...] = (24, 36)) -> np.ndarray:
    """Far on the left half, near on the right (what the decoder must keep after normalization)."""
    boolean = np.dtype(dtype).kind == "b"
    a = np.full(shape, 0 if boolean else 10, dtype)
    a[..., : shape[-1] // 2] = 1 if boolean else 200
    return a


DEPTHS = {
    "png_8bit_L": ("depth.png", pil_bytes(Image.fromarray(_ramp(np.uint8)), "PNG")),
    "png_RGB": ("depth.png", pil_bytes(Image.fromarray(np.stack([_ramp(np.uint8)] * 3, -1)), "PNG")),
    "png_RGBA": ("depth.png", pil_bytes(Image.fromarray(np.stack([_ramp(np.uint8)] * 4, -1)), "PNG")),
    "png_16bit": ("depth.png", media.encode_png16(_ramp(np.uint16) * 100)),
    "png_LA": ("depth.png", pil_bytes(Image.fromarray(_ramp(np.uint8)).convert("LA"), "PNG")),
    "png_1bit": ("depth.png", pil_bytes(Image.fromarray(_ramp(np.uint8) > 100), "PNG")),
    "tiff_float_F": ("depth.png", pil_bytes(Image.fromarray(_ramp(np.float32), "F"), "TIFF")),
    "npy_float64": ("depth.npy", _npy(_ramp(np.float64))),
    "npy_float16": ("depth.npy", _npy(_ramp(np.float16))),
    "npy_uint16_big_endian": ("depth.npy", _npy(_ramp(np.dtype(">u2")))),
    "npy_bool": ("depth.npy", _npy(_ramp(bool))),
    "npy_1HW": ("depth.npy", _npy(_ramp(shape=(1, 24, 36)))),
    "npy_HW1": ("depth.npy", _npy(_ramp(shape=(24, 36))[..., None])),
    "npy_near_float32_max": ("depth.npy", _npy(_ramp(np.float64) * 1.5e36)),
    "npy_nan_holes": ("depth.npy", _npy(np.where(np.eye(24, 36) > 0, np.nan, _ramp()))),
}


@pytest.mark.parametrize("name", list(DEPTHS))
def test_unusual_depth_maps_decode(name: str) -> None:
    ext, data = DEPTHS[name]
    d = decode("depth", ext, data)["depth"]
    assert d.shape == (1, 32, 32) and d.dtype == torch.float32 and torch.isfinite(d).all()
    assert abs(d.mean().item()) < 1e-3 and abs(d.std(unbiased=False).item() - 1) < 1e-2
    assert d[0, :, :12].mean() > 0 > d[0, :, 20:].mean()  # the far half stays the far half


@pytest.mark.parametrize(
    "name,array",
    [("complex", _ramp().astype(np.complex64)), ("strings", np.array([["a", "b"]])),
     ("3 channels", _ramp(shape=(24, 36, 3))), ("empty", np.zeros((0, 5), np.float32)),
     ("structured", np.zeros((4, 4), dtype=[("a", "f4"), ("b", "i4")]))],
)  # fmt: skip
def test_npy_depth_that_is_not_a_map_is_a_skip(name: str, array: np.ndarray) -> None:
    assert skip_reason("depth", "depth.npy", _npy(array)) == "bad_depth"


def _png16_rgb(rgb16: int, alpha: bool) -> bytes:
    """A 48-bit RGB (or 64-bit RGBA) PNG, written by FFmpeg's PNG encoder (Pillow cannot write one)."""
    cc = av.CodecContext.create("png", "w")
    cc.width, cc.height, cc.pix_fmt = 24, 16, ("rgba64be" if alpha else "rgb48be")
    a = np.full((16, 24, 4 if alpha else 3), rgb16, np.uint16)
    frame = av.VideoFrame.from_ndarray(a, format="rgba64le" if alpha else "rgb48le")
    return b"".join(bytes(p) for p in [*cc.encode(frame), *cc.encode(None)])


NORMALS = {
    "png_RGBA": pil_bytes(solid_rgb(rgb=(128, 128, 255)).convert("RGBA"), "PNG"),
    "png_grey_L": pil_bytes(solid_rgb(rgb=(128, 128, 128)).convert("L"), "PNG"),
    "png_palette": pil_bytes(solid_rgb(rgb=(128, 128, 255)).convert("P"), "PNG"),
    "png_48bit_RGB": _png16_rgb(128 * 257, alpha=False),
    "png_64bit_RGBA": _png16_rgb(128 * 257, alpha=True),
    "apng_animated": _animated("PNG"),
}


@pytest.mark.parametrize("name", list(NORMALS))
def test_unusual_normal_maps_decode(name: str) -> None:
    data = NORMALS[name]
    n = decode("normal", "normal.png", data)["normal"]
    assert n.shape == (3, 32, 32) and n.dtype == torch.uint8
    expected = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), np.float64).mean(axis=(0, 1))
    np.testing.assert_allclose(mean_rgb(n), expected, atol=2)


# ----------------------------------------------------------------------------- video


def grey_frames(t: int, h: int, w: int) -> np.ndarray:
    """Frame i is a solid grey of level 20 * i + 10 (survives lossy coding to +-6)."""
    return np.stack([np.full((h, w, 3), 20 * i + 10, np.uint8) for i in range(t)])


def write_video(fmt: str, codec: str, pix_fmt: str, t: int = 12, h: int = 32, w: int = 48,
                audio: bool = False, video: bool = True) -> bytes:  # fmt: skip
    """A video written with PyAV (FFmpeg) as an ordinary tool would: any codec / pixel format."""
    buf = io.BytesIO()
    with av.open(buf, "w", format=fmt) as c:
        if video:
            s = c.add_stream(codec, rate=8)
            s.width, s.height, s.pix_fmt = w, h, pix_fmt
        if audio:
            a = c.add_stream("aac", rate=16000, layout="mono")
        if video:
            for f in grey_frames(t, h, w):
                for p in s.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                    c.mux(p)
            for p in s.encode():
                c.mux(p)
        if audio:
            frame = av.AudioFrame.from_ndarray(np.zeros((1, 16000), np.float32), format="fltp", layout="mono")
            frame.sample_rate, frame.pts = 16000, 0
            for p in [*a.encode(frame), *a.encode()]:
                c.mux(p)
    return buf.getvalue()


def _codec(name: str) -> bool:
    try:
        av.Codec(name, "w")
        return True
    except Exception:  # noqa: BLE001 - av raises several error types for an unknown codec
        return False


VIDEOS = {
    # name: (member ext, container, codec, pixel format, extra)
    "h264_yuv444p": ("mp4", "mp4", "libx264", "yuv444p", {}),
    "h264_gray": ("mp4", "mp4", "libx264", "gray", {}),
    "h264_odd_size_47x33": ("mp4", "mp4", "libx264", "yuv444p", {"w": 47, "h": 33}),
    "h264_10bit": ("mp4", "mp4", "libx264", "yuv420p10le", {}),
    "h264_with_aac_track": ("mp4", "mp4", "libx264", "yuv420p", {"audio": True}),
    "h264_2x2": ("mp4", "mp4", "libx264", "yuv420p", {"w": 2, "h": 2}),
    "h264_one_frame": ("mp4", "mp4", "libx264", "yuv420p", {"t": 1}),
    "mpeg4_part2": ("mp4", "mp4", "mpeg4", "yuv420p", {}),
    "vp9_webm": ("webm", "webm", "libvpx-vp9", "yuv420p", {}),
    "vp9_webm_alpha": ("webm", "webm", "libvpx-vp9", "yuva420p", {}),
    "vp8_webm": ("webm", "webm", "libvpx", "yuv420p", {}),
    "mjpeg_mkv_as_mp4": ("mp4", "matroska", "mjpeg", "yuvj420p", {}),
    "png_rgba_mov": ("mp4", "mov", "png", "rgba", {}),
    "png_gray16_mov": ("mp4", "mov", "png", "gray16be", {}),
    "prores_10bit_422": ("mp4", "mov", "prores_ks", "yuv422p10le", {}),
    "ffv1_gray_mkv": ("mp4", "matroska", "ffv1", "gray", {}),
    "gif": ("gif", "gif", "gif", "rgb8", {}),
}


@pytest.mark.parametrize("name", list(VIDEOS))
def test_unusual_videos_decode(name: str) -> None:
    ext, fmt, codec, pix, kw = VIDEOS[name]
    if not _codec(codec):
        pytest.skip(f"PyAV's FFmpeg has no {codec} encoder")
    data = write_video(fmt, codec, pix, **kw)
    x = decode("video", ext, data)["video"]
    assert x.shape == (4, 3, 32, 32) and x.dtype == torch.uint8
    t = kw.get("t", 12)
    levels = x.double().mean(dim=(1, 2, 3))  # frame i has grey level 20 i + 10
    want = np.array([20 * i + 10 for i in frame_indices(t, 4, False, None)], np.float64)
    if (codec, pix) == ("libx264", "gray"):  # full-range grey in a stream flagged limited: decoded as flagged
        want = np.clip((want - 16) * 255 / 219, 0, 255)
    np.testing.assert_allclose(levels.tolist(), want, atol=8 if pix != "rgb8" else 12)


def test_video_without_a_video_stream_is_a_skip() -> None:
    audio_only = write_video("mp4", "libx264", "yuv420p", audio=True, video=False)
    assert skip_reason("video", "mp4", audio_only) == "bad_video"
    # An image under .mp4 is a one-frame "video" to FFmpeg: decodes (every sampled frame the same).
    x = decode("video", "mp4", pil_bytes(solid_rgb(), "PNG"))["video"]
    assert x.shape == (4, 3, 32, 32)


def test_zero_frame_video_is_a_skip() -> None:
    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as c:
        s = c.add_stream("libx264", rate=8)
        s.width, s.height, s.pix_fmt = 32, 32, "yuv420p"
        c.start_encoding()
    assert skip_reason("video", "mp4", buf.getvalue()) == "bad_video"


# ----------------------------------------------------------------------------- audio


def tone(rate: int, seconds: float = 1.5, channels: int = 1) -> np.ndarray:
    t = np.arange(int(rate * seconds)) / rate
    w = (0.5 * np.sin(2 * np.pi * 1000 * t)).astype(np.float32)
    return np.stack([w] * channels, axis=1)


def sf_bytes(wave: np.ndarray, rate: int, fmt: str, subtype: str) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, wave, rate, format=fmt, subtype=subtype)
    return buf.getvalue()


def mel_bin_of(freq: float, sr: int = 16000, bins: int = 64) -> int:
    mel = lambda f: 1127.0 * math.log(1 + f / 700.0)  # noqa: E731
    lo, hi = mel(20.0), mel(sr / 2)
    return int(round((mel(freq) - lo) / ((hi - lo) / (bins + 1)) - 1))


def _flac_of_unknown_length() -> bytes:
    """FLAC as FFmpeg writes it to a pipe: STREAMINFO's total-samples field is 0 ("unknown")."""

    class Pipe(io.RawIOBase):
        def __init__(self) -> None:
            self.data = bytearray()

        def writable(self) -> bool:
            return True

        def seekable(self) -> bool:
            return False

        def write(self, b) -> int:  # noqa: ANN001
            self.data += bytes(b)
            return len(b)

    out = Pipe()
    with av.open(out, "w", format="flac") as c:
        s = c.add_stream("flac", rate=16000, layout="mono")
        pcm = (tone(16000).T * 32767).astype(np.int16)
        for i in range(0, pcm.shape[1], 4096):  # as a stream arrives: muxed before its end is known
            frame = av.AudioFrame.from_ndarray(
                np.ascontiguousarray(pcm[:, i : i + 4096]), format="s16", layout="mono"
            )
            frame.sample_rate, frame.pts = 16000, i
            for p in s.encode(frame):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    data = bytes(out.data)
    assert int.from_bytes(data[18:26], "big") & ((1 << 36) - 1) == 0  # the case under test
    return data


AUDIO = {
    **{f"wav_{sub}": ("wav", sf_bytes(tone(16000), 16000, "WAV", sub))
       for sub in ("PCM_U8", "PCM_24", "PCM_32", "FLOAT", "DOUBLE", "ULAW", "ALAW", "IMA_ADPCM", "MS_ADPCM")},
    "wav_GSM610_8kHz": ("wav", sf_bytes(tone(8000), 8000, "WAV", "GSM610")),
    "wav_6_channels": ("wav", sf_bytes(tone(16000, channels=6), 16000, "WAV", "PCM_16")),
    "flac_24bit": ("flac", sf_bytes(tone(16000), 16000, "FLAC", "PCM_24")),
    "flac_8bit": ("flac", sf_bytes(tone(16000), 16000, "FLAC", "PCM_S8")),
    "flac_stereo_44k1": ("flac", sf_bytes(tone(44100, channels=2), 44100, "FLAC", "PCM_16")),
    "flac_unknown_length": ("flac", _flac_of_unknown_length()),
    "ogg_vorbis_as_flac": ("flac", sf_bytes(tone(16000), 16000, "OGG", "VORBIS")),
    "mp3_as_wav": ("wav", media.encode_mp3(tone(16000)[:, 0])),
}  # fmt: skip


@pytest.mark.parametrize("name", list(AUDIO))
def test_unusual_audio_decodes(name: str) -> None:
    ext, data = AUDIO[name]
    x = decode("audio", ext, data)["audio"]
    assert x.shape == (2, 1, 64, 64) and x.dtype == torch.float32 and torch.isfinite(x).all()
    assert int(x[0, 0].mean(dim=1).argmax()) == mel_bin_of(1000)


@pytest.mark.parametrize(
    "name,wave",
    [("nan", np.array([np.nan, 0.1] * 8000, np.float32)), ("inf", np.array([np.inf, 0.1] * 8000, np.float32)),
     ("near_float32_max", np.array([3e38, -3e38] * 8000, np.float32)),
     ("zero_samples", np.zeros(0, np.float32))],
)  # fmt: skip
def test_float_wav_that_gives_no_filterbank_is_a_skip(name: str, wave: np.ndarray) -> None:
    # Before: kaldi-native-fbank's RuntimeError("mel energy is nan") escaped the decoder for the first three.
    assert skip_reason("audio", "wav", sf_bytes(wave[:, None], 16000, "WAV", "FLOAT")) == "bad_audio"


# ----------------------------------------------------------------------------- captions


def test_captions_a_tokenizer_cannot_take_are_ignored() -> None:
    # json.dumps writes a lone surrogate as a valid "\ud800" escape; tokenizers refuse it (for the batch).
    raw = json.dumps({"captions": {"vision": "ok \ud800", "audio": ["\udfff", "a hum"]}}).encode()
    assert D.caption_fields({"json": raw}) == {"audio": "a hum"}
    only = json.dumps({"captions": {"vision": "\ud800"}}).encode()
    with pytest.raises(SkipSample) as e:
        D.SampleDecoder(["image"], INP, train=False)({"json": only, "png": pil_bytes(solid_rgb(), "PNG")})
    assert e.value.reason == "missing_caption"


def test_evaluation_texts_and_questions_a_tokenizer_cannot_take_are_ignored() -> None:
    from mico_ds.data.read.batch import eval_extras

    qa = [{"q": "what \udfff?", "a": "x"}, {"q": "what?", "a": "a cat"}]
    raw = json.dumps({"captions": {"vision": ["a cat", "\ud800"]}, "qa": qa}).encode()
    extras = eval_extras({"json": raw}, D.caption_fields({"json": raw}))
    assert extras["eval_texts"] == ["a cat"] and extras["qa"] == [{"q": "what?", "a": "a cat"}]
