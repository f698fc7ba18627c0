"""Checks that a media file decodes with the library the loader decodes it with (Pillow, PyAV,
soundfile, numpy), before it is written into a shard; each returns the member extension."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from mico_ds.data import schema

_IMAGE_FORMATS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}
_VIDEO_EXTS = {".mp4": "mp4", ".webm": "webm", ".gif": "gif"}
_AUDIO_EXTS = {f".{e}": e for e in schema.AUDIO_EXTS}  # stored under the file's own extension
_SOUNDFILE_EXTS = ("flac", "wav")  # the loader reads these with soundfile, the others with PyAV


def probe_image(path: Path) -> str:
    """Decode an image fully with Pillow; returns its member extension (jpg/png/webp)."""
    from PIL import Image

    with Image.open(path) as im:
        fmt = im.format
        if fmt not in _IMAGE_FORMATS:
            raise ValueError(f"unsupported image format {fmt} (accepted: JPEG, PNG, WebP)")
        im.load()  # decodes every pixel: catches truncated or corrupt data
        if im.size[0] < 1 or im.size[1] < 1:
            raise ValueError(f"empty image {im.size}")
    return _IMAGE_FORMATS[fmt]


class NoVideo(ValueError):
    """A container PyAV opens that holds no video stream, or no decodable frame."""


def check_video(src: str | io.BytesIO) -> bool:
    """Open a video (a path or its bytes) with PyAV and decode its first frame; returns whether it
    has an audio stream. Raises :class:`NoVideo`; PyAV's own errors pass through."""
    import av

    with av.open(src) as container:
        if not container.streams.video:
            raise NoVideo("no video stream")
        if next(container.decode(video=0), None) is None:
            raise NoVideo("no decodable video frame")
        return bool(container.streams.audio)


def probe_video(path: Path) -> str:
    """Open a video with PyAV and decode its first frame; returns mp4/webm/gif from the file extension."""
    ext = _VIDEO_EXTS.get(path.suffix.lower())
    if ext is None:
        raise ValueError(f"unsupported video extension {path.suffix!r} (accepted: {sorted(_VIDEO_EXTS)})")
    check_video(str(path))
    return ext


def probe_audio(path: Path) -> str:
    """Decode audio fully (soundfile for WAV/FLAC, PyAV for MP3/M4A/AAC/Ogg/Opus); returns the member
    extension (schema.AUDIO_EXTS: the file's own)."""
    ext = _AUDIO_EXTS.get(path.suffix.lower())
    if ext is None:
        raise ValueError(f"unsupported audio extension {path.suffix!r} (accepted: {sorted(_AUDIO_EXTS)})")
    if ext not in _SOUNDFILE_EXTS:
        import av

        with av.open(str(path)) as container:
            if not container.streams.audio:
                raise ValueError("no audio stream")
            n = sum(frame.samples for frame in container.decode(audio=0))
    else:
        import soundfile as sf

        info = sf.info(str(path))
        if info.format != ext.upper():
            raise ValueError(f"file extension says {ext} but soundfile reads {info.format}")
        n = len(sf.read(str(path), dtype="float32", always_2d=True)[0])
    if n < 1:
        raise ValueError("audio has no samples")
    return ext


def load_depth(path: Path) -> tuple[str, bytes, np.ndarray]:
    """Validate a depth map; returns (member ext, member bytes, depth float32 (H, W)).

    16-bit greyscale PNG is kept as it is; ``.npy`` must hold a 2-D (or (H, W, 1)) numeric array and is
    stored as float32 (re-serialized only when it was another dtype).
    """
    data = path.read_bytes()
    if path.suffix.lower() == ".npy":
        arr = np.load(io.BytesIO(data), allow_pickle=False)
        stored_as_is = arr.dtype == np.float32 and arr.ndim == 2
        if arr.ndim == 3 and arr.shape[2] == 1:
            arr = arr[..., 0]
        if arr.ndim != 2 or not np.issubdtype(arr.dtype, np.number):
            raise ValueError(f"depth .npy must be a numeric (H, W) array, got {arr.dtype} {arr.shape}")
        if not stored_as_is:
            buf = io.BytesIO()
            np.save(buf, arr.astype(np.float32))
            data = buf.getvalue()
        return "depth.npy", data, arr.astype(np.float32)
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        if im.format != "PNG":
            raise ValueError(f"depth must be a 16-bit PNG or .npy, got {im.format}")
        if im.mode not in ("I;16", "I;16B", "I;16L", "I"):
            raise ValueError(f"depth PNG must be 16-bit greyscale, got mode {im.mode}")
        arr = np.asarray(im).astype(np.float32)
    return "depth.png", data, arr


def probe_normal(path: Path) -> str:
    """Decode a normal map: an 8-bit RGB PNG."""
    from PIL import Image

    with Image.open(path) as im:
        if im.format != "PNG" or im.mode != "RGB":
            raise ValueError(f"normal map must be an 8-bit RGB PNG, got {im.format} mode {im.mode}")
        im.load()
    return "normal.png"
