"""Video and audio work of the corpus ingestion (``mico_ds.data.write.ingest``), with PyAV.

* :func:`cut_clip`: one span of a long video -> an MP4 clip (H.264 + AAC when the video has sound).
  Decision: the span is **re-encoded**, not stream-copied. A stream copy can only start on a keyframe,
  which in YouTube-style videos lies up to several seconds before the span; re-encoding gives the span
  to the frame (video) and to the sample (audio), at the cost of encoding time. Output is bit-exact
  (single-threaded encoders, ``bitexact`` flags), so a rerun writes the same bytes.
* :func:`store_video`: a clip file as a shard member: MP4/WebM kept byte for byte, other containers
  (MKV, MOV: what yt-dlp often writes) remuxed into MP4 without re-encoding.
* :func:`store_audio`: audio bytes as a shard member: the data contract's formats (``schema.AUDIO_EXTS``)
  kept, others PyAV decodes stored as FLAC of the decoded signal.
* :func:`cut_audio`: one span of a long recording -> FLAC (sample-exact; 16-bit).
* :func:`store_image`: an image file kept byte for byte once Pillow decodes every pixel.

A media problem that makes a record unusable raises :class:`MediaSkip` with a reason kind (the
report's counter) and a detail; everything else a decoder raises is handled by the caller.
"""

from __future__ import annotations

import io
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

import numpy as np

from mico_ds.data.write.probe import NoVideo, check_video

# Member extensions stored as they are (the data contract's video and audio formats).
KEPT_VIDEO = {".mp4": "mp4", ".webm": "webm"}
REMUXED_VIDEO = (".mkv", ".mov", ".m4v")
VIDEO_SUFFIXES = (*KEPT_VIDEO, *REMUXED_VIDEO)
# Also stored by store_video: GIF kept (TGIF-QA), AVI remuxed into MP4 (MSVD's YouTubeClips); looked
# for by the downstream formats only, so the pretraining formats' lookups stay as they were.
EXTRA_VIDEO = {".gif": "gif", ".avi": "mp4"}
ANY_VIDEO_SUFFIXES = (*VIDEO_SUFFIXES, *EXTRA_VIDEO)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
AUDIO_SUFFIXES = (".wav", ".flac", ".mp3", ".m4a", ".aac", ".ogg", ".opus")
SPAN_SLACK_S = 0.5  # a recording at most this much longer than its span is the span already (cut_audio)
CUT_CRF = 23  # libx264 quality of cut clips (FFmpeg's default)
CUT_AUDIO_BIT_RATE = 128_000


class MediaSkip(Exception):
    """A record's media cannot be used; ``kind`` counts it in the report (missing_file, span_past_end,
    unreadable, no_frames)."""

    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(detail)
        self.kind = kind


@dataclass
class Stored:
    """Member bytes plus what the report should say about them."""

    ext: str
    data: bytes
    has_audio: bool = False
    notes: list[str] = field(default_factory=list)


_TS = re.compile(r"^(?:(\d+):)?(?:(\d+):)?(\d+(?:\.\d*)?)$")


def parse_timestamp(value: object) -> float:
    """Seconds of ``"HH:MM:SS.mmm"``, ``"MM:SS.mmm"``, ``"SS.mmm"`` or a number (HD-VILA spans)."""
    if isinstance(value, bool):
        raise ValueError(f"not a timestamp: {value!r}")
    if isinstance(value, (int, float)):
        seconds = float(value)
    elif isinstance(value, str) and (m := _TS.match(value.strip())):
        parts = [p for p in m.groups() if p is not None]
        seconds = 0.0
        for p in parts:
            seconds = seconds * 60 + float(p)
    else:
        raise ValueError(f"not a timestamp: {value!r} (use HH:MM:SS.mmm or seconds)")
    if not np.isfinite(seconds) or seconds < 0:
        raise ValueError(f"not a timestamp: {value!r}")
    return seconds


def parse_span(value: object) -> tuple[float, float]:
    """``[start, end]`` in seconds from a two-element list of timestamps; end must follow start."""
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        raise ValueError(f"span must be [start, end], got {value!r}")
    start, end = parse_timestamp(value[0]), parse_timestamp(value[1])
    if not end > start:
        raise ValueError(f"span {list(value)!r} ends before it starts")
    return start, end


def _duration(container) -> float | None:  # noqa: ANN001 - av.container.InputContainer
    """Seconds of the container (its own duration, else its video stream's), None when unknown."""
    if container.duration is not None and container.duration > 0:
        return container.duration / 1_000_000
    stream = container.streams.video[0]
    if stream.duration is not None and stream.time_base is not None:
        return float(stream.duration * stream.time_base)
    return None


def _even(n: int) -> int:
    return max(2, n - n % 2)


def cut_clip(path: Path, start: float, end: float) -> Stored:
    """The span [start, end) seconds of the video at ``path`` as MP4 bytes (H.264, AAC if it has sound).

    A span starting at or past the video's end raises MediaSkip("span_past_end"); one ending past it is
    cut at the end (noted). Timestamps of the clip start at 0.
    """
    import av
    from av.codec.context import Flags

    from mico_ds.data.write.media import mp4_codec

    with av.open(str(path)) as src:
        if not src.streams.video:
            raise MediaSkip("unreadable", "no video stream")
        vin = src.streams.video[0]
        ain = src.streams.audio[0] if src.streams.audio else None
        notes: list[str] = []
        total = _duration(src)
        if total is not None and start >= total:
            raise MediaSkip(
                "span_past_end", f"span starts at {start:.3f} s, past the video's end ({total:.3f} s)"
            )
        if total is not None and end > total:
            notes.append(f"span ends at {end:.3f} s, past the video's end ({total:.3f} s): cut at the end")
            end = total
        rate = vin.average_rate or vin.guessed_rate or Fraction(25)
        rate = Fraction(rate).limit_denominator(1001)
        width, height = _even(vin.codec_context.width), _even(vin.codec_context.height)
        if start > 0:
            # To the keyframe at or before start (AV_TIME_BASE units); earlier frames are decoded, dropped.
            src.seek(int(start * 1_000_000), backward=True, any_frame=False)
        buf = io.BytesIO()
        with av.open(buf, mode="w", format="mp4", container_options={"fflags": "+bitexact"}) as dst:
            codec = mp4_codec()
            options = {"crf": str(CUT_CRF), "preset": "veryfast"} if codec == "libx264" else {}
            vout = dst.add_stream(codec, rate=rate, options=options)
            vout.width, vout.height, vout.pix_fmt = width, height, "yuv420p"
            vout.codec_context.thread_count = 1
            vout.codec_context.flags |= Flags.bitexact
            if codec == "mpeg4":
                vout.codec_context.bit_rate = max(400_000, int(2 * width * height * float(rate)))
            aout = resampler = None
            if ain is not None:
                layout = "mono" if ain.codec_context.channels == 1 else "stereo"
                sr = ain.codec_context.sample_rate
                aout = dst.add_stream("aac", rate=sr, layout=layout)
                aout.bit_rate = CUT_AUDIO_BIT_RATE
                resampler = av.AudioResampler(format="fltp", layout=layout, rate=sr)
            frames, last_pts = 0, -1
            audio_parts: list[np.ndarray] = []
            audio_t0: float | None = None
            video_done, audio_done = False, ain is None
            streams = [vin] if ain is None else [vin, ain]
            for packet in src.demux(streams):
                if video_done and audio_done:
                    break
                if packet.stream.type == "video" and video_done:
                    continue
                if packet.stream.type == "audio" and audio_done:
                    continue
                for frame in packet.decode():
                    t = frame.time
                    if t is None:
                        continue
                    if packet.stream.type == "video":
                        if t >= end:
                            video_done = True
                            break
                        if t < start - 1e-6:
                            continue
                        pts = round((t - start) * rate)
                        if pts <= last_pts:  # variable frame rate: two frames in one output tick
                            continue
                        out = frame.reformat(width=width, height=height, format="yuv420p")
                        out.pts, out.time_base, last_pts = pts, Fraction(1) / rate, pts
                        for p in vout.encode(out):
                            dst.mux(p)
                        frames += 1
                    else:
                        if t >= end:
                            audio_done = True
                            break
                        for rf in resampler.resample(frame):  # type: ignore[union-attr]
                            if audio_t0 is None:
                                audio_t0 = t
                            audio_parts.append(rf.to_ndarray())
            if frames == 0:
                raise MediaSkip("no_frames", f"no video frame in the span [{start:.3f}, {end:.3f}) s")
            for p in vout.encode():
                dst.mux(p)
            has_audio = False
            if aout is not None and audio_parts and audio_t0 is not None:
                sr = aout.codec_context.sample_rate
                wave = np.concatenate(audio_parts, axis=1)
                a = max(0, round((start - audio_t0) * sr))
                b = max(a, round((end - audio_t0) * sr))
                wave = np.ascontiguousarray(wave[:, a:b], dtype=np.float32)
                if wave.shape[1]:
                    layout = aout.codec_context.layout.name
                    af = av.AudioFrame.from_ndarray(wave, format="fltp", layout=layout)
                    af.sample_rate, af.pts = sr, 0
                    for p in aout.encode(af):
                        dst.mux(p)
                    for p in aout.encode():
                        dst.mux(p)
                    has_audio = True
    return Stored("mp4", buf.getvalue(), has_audio=has_audio, notes=notes)


def _check_video(data: bytes) -> bool:
    """``probe.check_video`` on member bytes, its refusal a MediaSkip; returns has-audio."""
    try:
        return check_video(io.BytesIO(data))
    except NoVideo as e:
        raise MediaSkip("unreadable", str(e)) from None


def _remux_mp4(path: Path) -> bytes:
    """The streams of ``path`` in an MP4 container, packets copied (no re-encoding)."""
    import av

    buf = io.BytesIO()
    options = {"fflags": "+bitexact"}
    with av.open(str(path)) as src, av.open(buf, "w", format="mp4", container_options=options) as dst:
        pairs = {}
        for s in [*src.streams.video[:1], *src.streams.audio[:1]]:
            # PyAV >= 13 names it add_stream_from_template; 12 takes add_stream(template=...)
            add = getattr(dst, "add_stream_from_template", None)
            pairs[s.index] = add(s) if add is not None else dst.add_stream(template=s)
        for packet in src.demux(list(src.streams.video[:1]) + list(src.streams.audio[:1])):
            if packet.dts is None:  # the demuxer's flush packet
                continue
            packet.stream = pairs[packet.stream.index]
            dst.mux(packet)
    return buf.getvalue()


def store_video(path: Path) -> Stored:
    """A clip file as a shard member (see module docstring); checks it decodes."""
    suffix = path.suffix.lower()
    if suffix in KEPT_VIDEO or suffix == ".gif":
        ext, data = KEPT_VIDEO.get(suffix, "gif"), path.read_bytes()
    elif suffix in REMUXED_VIDEO or suffix in EXTRA_VIDEO:
        try:
            ext, data = "mp4", _remux_mp4(path)
        except Exception as e:  # noqa: BLE001 - av raises several types; all mean "cannot be put in MP4"
            detail = f"cannot remux {path.name} into MP4: {type(e).__name__}: {e}"
            raise MediaSkip("unreadable", detail) from e
    else:
        raise MediaSkip(
            "unreadable", f"unsupported video extension {suffix!r} (accepted: {ANY_VIDEO_SUFFIXES})"
        )
    return Stored(ext, data, has_audio=_check_video(data))


def video_member(data: bytes, ext: str) -> Stored:
    """Video bytes of another shard (video2dataset) as a member; webm/mp4 kept, checked to decode."""
    if ext not in ("mp4", "webm"):
        raise MediaSkip("unreadable", f"unsupported video member {ext!r} (accepted: mp4, webm)")
    return Stored(ext, data, has_audio=_check_video(data))


def _decode_s16(src: str | io.BytesIO) -> tuple[np.ndarray, int]:
    """The first audio stream of a file PyAV opens, decoded: int16 (samples, channels) (mono or
    stereo), sample rate."""
    import av

    with av.open(src) as c:
        if not c.streams.audio:
            raise MediaSkip("unreadable", "no audio stream")
        stream = c.streams.audio[0]
        sr = stream.codec_context.sample_rate
        channels = 1 if stream.codec_context.channels == 1 else 2
        resampler = av.AudioResampler(format="s16", layout="mono" if channels == 1 else "stereo", rate=sr)
        parts = [np.zeros((0, channels), np.int16)]
        for frame in c.decode(stream):
            for rf in resampler.resample(frame):
                parts.append(rf.to_ndarray().reshape(-1, channels))  # packed s16: (1, n * channels)
    return np.concatenate(parts), sr


def _flac(wave: np.ndarray, sr: int) -> bytes:
    import soundfile as sf

    out = io.BytesIO()
    sf.write(out, wave, sr, format="FLAC", subtype="PCM_16")
    return out.getvalue()


def store_audio(data: bytes, ext: str) -> Stored:
    """Audio bytes as a member: a format of the data contract (``schema.AUDIO_EXTS``) checked (decoded
    in full) and kept; anything else PyAV decodes is stored as FLAC of the decoded signal."""
    from mico_ds.data import schema

    ext = ext.lower()
    if ext in ("flac", "wav"):
        import soundfile as sf

        info = sf.info(io.BytesIO(data))
        if info.format != ext.upper():
            raise MediaSkip("unreadable", f"the file extension says {ext} but soundfile reads {info.format}")
        if len(sf.read(io.BytesIO(data), dtype="float32", always_2d=True)[0]) < 1:
            raise MediaSkip("unreadable", "audio has no samples")
        return Stored(ext, data, has_audio=True)
    wave, sr = _decode_s16(io.BytesIO(data))
    if not len(wave):
        raise MediaSkip("unreadable", "audio has no samples")
    if ext in schema.AUDIO_EXTS:
        return Stored(ext, data, has_audio=True)
    return Stored("flac", _flac(wave, sr), has_audio=True, notes=[f"{ext} audio stored as FLAC"])


def cut_audio(path: Path, start: float, end: float) -> Stored:
    """The span [start, end) seconds of a recording (an audio file, or a video's audio track) as
    16-bit FLAC, sample-exact (WAV/FLAC are read with soundfile, only the span; others decoded whole
    with PyAV).

    A recording no longer than the span (plus ``SPAN_SLACK_S``) is the clip already (downloads of
    AudioSet-style clips often are): it is stored as it is (:func:`store_audio`), noted when the span
    does not start at 0. A span starting at or past the end raises MediaSkip("span_past_end"); one
    ending past it is cut at the end (noted).
    """
    notes: list[str] = []
    suffix = path.suffix.lower().lstrip(".")
    if suffix in ("wav", "flac"):
        import soundfile as sf

        info = sf.info(str(path))
        sr, total_n = info.samplerate, info.frames
        wave: np.ndarray | None = None
    else:
        wave, sr = _decode_s16(str(path))
        total_n = len(wave)
    total = total_n / sr
    if total <= end - start + SPAN_SLACK_S:
        stored = store_audio(path.read_bytes(), suffix)
        if start > 0:
            stored.notes.append(
                f"{path.name} is {total:.3f} s long, no longer than the span [{start:g}, {end:g}) s: "
                "taken as the already-cut clip"
            )
        return stored
    if start >= total:
        raise MediaSkip(
            "span_past_end", f"span starts at {start:.3f} s, past the recording's end ({total:.3f} s)"
        )
    if end > total:
        notes.append(f"span ends at {end:.3f} s, past the recording's end ({total:.3f} s): cut at the end")
        end = total
    a, b = round(start * sr), min(total_n, round(end * sr))
    if wave is None:
        import soundfile as sf

        wave, _ = sf.read(str(path), start=a, stop=b, dtype="int16", always_2d=True)
    else:
        wave = wave[a:b]
    if not len(wave):
        raise MediaSkip("no_frames", f"no audio sample in the span [{start:.3f}, {end:.3f}) s")
    return Stored("flac", _flac(wave, sr), has_audio=True, notes=notes)


def store_image(path: Path) -> Stored:
    """An image file as a member, byte for byte, once Pillow decodes every pixel (JPEG/PNG/WebP; the
    member extension is told by the content, as the manifest path does)."""
    from mico_ds.data.write.probe import probe_image

    try:
        ext = probe_image(path)
    except Exception as e:  # noqa: BLE001 - Pillow raises many types; all mean "this image is unreadable"
        raise MediaSkip("unreadable", f"{path.name}: {type(e).__name__}: {e}") from None
    return Stored(ext, path.read_bytes())


def first_existing(candidates: tuple[str, ...], exists: Callable[[str], bool] | None = None) -> Path | None:
    """The first of ``candidates`` that is a file (None when none is)."""
    check = exists or (lambda p: Path(p).is_file())
    for c in candidates:
        if check(c):
            return Path(c)
    return None
