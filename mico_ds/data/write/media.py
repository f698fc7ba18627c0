"""Media encoders (arrays in, file bytes out) for the shard writers and the demo corpus.

Every encoder uses a maintained library (Pillow, PyAV's bundled FFmpeg, soundfile/libsndfile) and is
deterministic: the same array gives the same bytes, which the demo corpus relies on for byte-identical
shards from one seed. Decoding lives in ``mico_ds.data.read``.

Array legend:
    rgb      uint8   (H, W, 3)
    frames   uint8   (T, H, W, 3)
    depth    uint16  (H, W)        for 16-bit PNG; float (H, W) for ``normals_from_depth``
    normals  float   (H, W, 3)     unit vectors, components in [-1, 1]
    wave     float32 (S,) mono or (S, C), samples in [-1, 1]
"""

from __future__ import annotations

import functools
import io
from fractions import Fraction

import numpy as np

# Video codecs tried in order for MP4; the first one PyAV's FFmpeg can open wins (see mp4_codec()).
MP4_CODECS: tuple[str, ...] = ("libx264", "mpeg4")
VIDEO_FORMATS: tuple[str, ...] = ("mp4", "webm", "gif")


def _check_rgb(rgb: np.ndarray, what: str = "rgb") -> np.ndarray:
    rgb = np.asarray(rgb)
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"{what} must be uint8 (H, W, 3), got {rgb.dtype} {rgb.shape}")
    return np.ascontiguousarray(rgb)


def encode_jpeg(rgb: np.ndarray, quality: int = 90) -> bytes:
    """JPEG bytes of an RGB image (4:2:0 chroma subsampling, no EXIF)."""
    from PIL import Image

    if not 1 <= quality <= 100:
        raise ValueError(f"JPEG quality must be in [1, 100], got {quality}")
    buf = io.BytesIO()
    Image.fromarray(_check_rgb(rgb), "RGB").save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def encode_png(rgb: np.ndarray) -> bytes:
    """8-bit RGB PNG bytes."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(_check_rgb(rgb), "RGB").save(buf, format="PNG")
    return buf.getvalue()


def encode_png16(depth: np.ndarray) -> bytes:
    """16-bit greyscale PNG bytes of a uint16 (H, W) depth map (the ``depth.png`` member)."""
    from PIL import Image

    depth = np.asarray(depth)
    if depth.dtype != np.uint16 or depth.ndim != 2:
        raise ValueError(f"depth must be uint16 (H, W), got {depth.dtype} {depth.shape}")
    buf = io.BytesIO()
    # Pillow writes mode "I;16" (native little-endian uint16) as a 16-bit PNG.
    Image.fromarray(np.ascontiguousarray(depth)).save(buf, format="PNG")
    return buf.getvalue()


def normals_to_rgb(normals: np.ndarray) -> np.ndarray:
    """uint8 (H, W, 3) RGB = (n + 1) * 127.5 of float normals in [-1, 1] (the ``normal.png`` member)."""
    normals = np.asarray(normals, dtype=np.float64)
    if normals.ndim != 3 or normals.shape[2] != 3:
        raise ValueError(f"normals must be (H, W, 3), got {normals.shape}")
    if not np.isfinite(normals).all():
        raise ValueError("normals contain NaN or inf")
    return np.clip(np.rint((normals + 1.0) * 127.5), 0, 255).astype(np.uint8)


def encode_normal_png(normals: np.ndarray) -> bytes:
    """PNG bytes of a normal map: float (H, W, 3) in [-1, 1] -> RGB = (n + 1) * 127.5."""
    return encode_png(normals_to_rgb(normals))


def normals_from_depth(depth: np.ndarray, scale: float = 1.0) -> np.ndarray:
    """Unit surface normals (H, W, 3) of a depth map by central finite differences.

    Orthographic approximation: pixel spacing is 1 and ``scale`` converts depth units to pixel widths
    (without camera intrinsics nothing better is possible). Camera coordinates: x right, y up, z towards
    the viewer, so a surface facing the camera has n = (0, 0, 1) and RGB (128, 128, 255). For a
    surface point (x, y, -D(x, y)) the tangents (1, 0, -D_x) and (0, 1, -D_y) give n ~ (D_x, D_y, 1).

    Args:
        depth: float (H, W), larger = farther; NaN/inf are rejected.
        scale: multiplies depth before differencing (depth units -> pixel widths).
    """
    d = np.asarray(depth, dtype=np.float64)
    if d.ndim != 2 or min(d.shape) < 2:
        raise ValueError(f"depth must be (H, W) with H, W >= 2, got {d.shape}")
    if not np.isfinite(d).all():
        raise ValueError("depth contains NaN or inf; fill invalid pixels before deriving normals")
    d = d * scale
    d_row, d_col = np.gradient(d)  # derivatives along rows (y down) and columns (x right)
    n = np.stack([d_col, -d_row, np.ones_like(d)], axis=-1)  # y up: D_y = -D_row
    n /= np.linalg.norm(n, axis=-1, keepdims=True)
    return n.astype(np.float32)


# ----------------------------------------------------------------------------- video


@functools.cache
def mp4_codec() -> str:
    """The first codec of MP4_CODECS that PyAV's bundled FFmpeg can encode with."""
    import av

    for name in MP4_CODECS:
        try:
            av.Codec(name, "w")
            return name
        except Exception:  # noqa: BLE001 - av raises several error types for an unknown codec
            continue
    raise RuntimeError(f"none of the video encoders {MP4_CODECS} is available in PyAV {av.__version__}")


def encode_video(
    frames: np.ndarray, fps: float | Fraction = 8, fmt: str = "mp4", codec: str | None = None
) -> bytes:
    """Video bytes of uint8 (T, H, W, 3) frames as MP4 (H.264 or MPEG-4 Part 2), WebM (VP9) or GIF.

    MP4 and WebM use yuv420p, so H and W must be even. Encoding is single-threaded, which keeps the
    output byte-identical from run to run and is faster than threading for small frames. ``codec``
    overrides the MP4 codec (default: mp4_codec()).
    """
    import av
    from av.codec.context import Flags

    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[3] != 3 or frames.shape[0] < 1:
        raise ValueError(f"frames must be uint8 (T, H, W, 3) with T >= 1, got {frames.dtype} {frames.shape}")
    if fmt not in VIDEO_FORMATS:
        raise ValueError(f"video format must be one of {VIDEO_FORMATS}, got {fmt!r}")
    if codec is not None and (fmt != "mp4" or codec not in MP4_CODECS):
        raise ValueError(f"codec={codec!r} applies to mp4 only and must be one of {MP4_CODECS}")
    t, h, w, _ = frames.shape
    if fmt != "gif" and (h % 2 or w % 2):
        raise ValueError(f"{fmt} (yuv420p) needs even frame sizes, got H={h} W={w}")
    if not fps > 0:
        raise ValueError(f"fps must be > 0, got {fps}")
    rate = Fraction(fps).limit_denominator(1001)

    codec, pix_fmt, options = {
        "mp4": (codec or mp4_codec(), "yuv420p", {}),
        "webm": ("libvpx-vp9", "yuv420p", {"deadline": "realtime", "cpu-used": "8", "row-mt": "0"}),
        "gif": ("gif", "rgb8", {}),
    }[fmt]
    if codec == "libx264":
        # Near-lossless at small sizes and no scene-cut/B-frame surprises for tiny clips.
        options = {"crf": "18", "preset": "veryfast", "tune": "zerolatency"}
    buf = io.BytesIO()
    # bitexact keeps FFmpeg's version strings and timestamps out of the container header.
    with av.open(buf, mode="w", format=fmt, container_options={"fflags": "+bitexact"}) as container:
        stream = container.add_stream(codec, rate=rate, options=options)
        stream.width, stream.height, stream.pix_fmt = w, h, pix_fmt
        stream.codec_context.thread_count = 1
        stream.codec_context.flags |= Flags.bitexact
        if codec == "mpeg4":
            stream.codec_context.bit_rate = max(200_000, int(2.4 * h * w * float(rate)))
        for frame in frames:
            for packet in stream.encode(
                av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")
            ):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buf.getvalue()


def encode_mp4(frames: np.ndarray, fps: float | Fraction = 8) -> bytes:
    """MP4 bytes of uint8 (T, H, W, 3) frames; codec libx264, else mpeg4 (see mp4_codec())."""
    return encode_video(frames, fps, "mp4")


# ----------------------------------------------------------------------------- audio


def _check_wave(wave: np.ndarray, sample_rate: int) -> np.ndarray:
    wave = np.asarray(wave, dtype=np.float32)
    if wave.ndim not in (1, 2) or wave.shape[0] < 1:
        raise ValueError(f"wave must be (S,) or (S, C) with S >= 1, got {wave.shape}")
    if sample_rate < 1:
        raise ValueError(f"sample_rate must be >= 1, got {sample_rate}")
    if not np.isfinite(wave).all():
        raise ValueError("wave contains NaN or inf")
    return np.clip(wave, -1.0, 1.0)


def _encode_soundfile(wave: np.ndarray, sample_rate: int, fmt: str, subtype: str) -> bytes:
    import soundfile as sf

    buf = io.BytesIO()
    sf.write(buf, _check_wave(wave, sample_rate), sample_rate, format=fmt, subtype=subtype)
    return buf.getvalue()


def encode_flac(wave: np.ndarray, sample_rate: int = 16000) -> bytes:
    """16-bit FLAC bytes (lossless) of a float wave in [-1, 1]."""
    return _encode_soundfile(wave, sample_rate, "FLAC", "PCM_16")


def encode_wav(wave: np.ndarray, sample_rate: int = 16000) -> bytes:
    """16-bit PCM WAV bytes of a float wave in [-1, 1]."""
    return _encode_soundfile(wave, sample_rate, "WAV", "PCM_16")


def encode_mp3(wave: np.ndarray, sample_rate: int = 16000, bit_rate: int = 64000) -> bytes:
    """MP3 bytes of a mono float wave, via PyAV's libmp3lame (lossy; used by tests and tools)."""
    import av

    wave = _check_wave(wave, sample_rate)
    if wave.ndim == 2:
        if wave.shape[1] != 1:
            raise ValueError(f"encode_mp3 takes mono audio, got {wave.shape[1]} channels")
        wave = wave[:, 0]
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp3", container_options={"fflags": "+bitexact"}) as container:
        stream = container.add_stream("libmp3lame", rate=sample_rate, layout="mono")
        stream.bit_rate = bit_rate
        frame = av.AudioFrame.from_ndarray(wave[None, :], format="flt", layout="mono")
        frame.sample_rate = sample_rate
        frame.pts = 0
        for packet in stream.encode(frame):
            container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buf.getvalue()
