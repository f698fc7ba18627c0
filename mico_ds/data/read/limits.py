"""Caps checked before a member is decoded (``data.limits``, :class:`mico_ds.config.DecodeLimits`).

A decoder reads what a member claims from its size or header (tar header, Pillow's lazy
``Image.open``, the container's stream metadata, soundfile's header, the ``.npy`` header) and raises
:class:`~mico_ds.data.read.skips.SkipSample` with one of the reasons below before allocating what the
claim would need; where a header can lie or be silent (a video without a frame count, audio without a
length), the same cap is enforced on what decoding produces, as it goes.
"""

from __future__ import annotations

from mico_ds.config import DecodeLimits
from mico_ds.data.read.skips import SkipSample

TOO_LARGE_MEMBER = "too_large_member"  # member_bytes
TOO_MANY_PIXELS = "too_many_pixels"  # image_pixels (and Pillow's own DecompressionBombError)
TOO_MANY_FRAMES = "too_many_frames"  # video_frames
TOO_LARGE_FRAMES = "too_large_frames"  # video_pixels
TOO_LONG_AUDIO = "too_long_audio"  # audio_seconds
TOO_LARGE_JSON = "too_large_json"  # json_bytes

# Which cap each reason enforces (docs/operations.md, "Bounded decoding and fuzzing").
REASONS: dict[str, str] = {
    "member_bytes": TOO_LARGE_MEMBER,
    "image_pixels": TOO_MANY_PIXELS,
    "video_frames": TOO_MANY_FRAMES,
    "video_pixels": TOO_LARGE_FRAMES,
    "audio_seconds": TOO_LONG_AUDIO,
    "json_bytes": TOO_LARGE_JSON,
}

DEFAULT_LIMITS = DecodeLimits()


def resolve(limits: DecodeLimits | None) -> DecodeLimits:
    """``limits``, or the defaults of ``data.limits`` when None."""
    return DEFAULT_LIMITS if limits is None else limits


def check(key: str, value: float, limits: DecodeLimits, what: str) -> None:
    """Raise the skip of cap ``key`` (a field of DecodeLimits) when ``value`` is over it (0: no cap)."""
    cap = getattr(limits, key)
    if cap and value > cap:
        v = f"{value:.6g}" if isinstance(value, float) else str(value)
        raise SkipSample(REASONS[key], f"{what}: {v} > data.limits.{key}={cap}")
