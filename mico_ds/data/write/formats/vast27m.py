"""VAST-27M (Chen et al., NeurIPS 2023; github.com/TXH-mercury/VAST): JSON annotation files, each a list
of clips::

    [{"clip_id": "...", "clip_span": [start, end], "url": "https://www.youtube.com/watch?v=...",
      "vision_cap": [5 strings], "audio_cap": [5 strings], "subtitle": "...", "vast_cap": "..."}, ...]

(JSON lines, one such object a line, are read too.) Media: the clip ``<clip_id>.mp4`` under the media
root (also ``.webm``, ``.mkv``, ``.mov``; MKV/MOV are remuxed into MP4). When the clip file is absent
but the entry has ``clip_span`` and a YouTube ``url``, the span is cut from the long video
``<video id>.mp4`` under the media root (the clips are HD-VILA-100M spans). The audio is the clip's
own track (stored inside the mp4); a clip without sound is kept, video only, and noted.

Captions: all five vision and audio captions are kept as lists (the loader draws one per visit,
seeded), ``subtitle`` as it is and ``vast_cap`` as ``captions.omni``. VALOR's annotations (VALOR-32K,
VALOR-1M: ``{"video_id", "desc"}``, the clip ``<video_id>.mp4``) read the same way, ``desc`` (one
audio-visual caption, or a list) as ``captions.omni``.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from mico_ds.data.write.clips import VIDEO_SUFFIXES, parse_span
from mico_ds.data.write.formats.common import (
    ClipFile,
    ClipSpan,
    Format,
    Options,
    Record,
    bad,
    candidates,
    caption_list,
    caption_text,
    json_entries,
    make_key,
    not_object,
    with_suffixes,
)

_YT_ID = re.compile(r"(?:v=|youtu\.be/|/shorts/)([A-Za-z0-9_-]{6,})")


def youtube_id(url: object) -> str | None:
    """The video id of a YouTube URL (None when it is not one)."""
    m = _YT_ID.search(url) if isinstance(url, str) else None
    return m.group(1) if m else None


def record(where: str, obj: Any, root: Path, source: str) -> Record:
    """One VAST-27M entry -> a record (or a skipped one naming what is wrong)."""
    if (skip := not_object(where, obj, source)) is not None:
        return skip
    clip_id = obj.get("clip_id", obj.get("video_id"))
    try:
        key = make_key(clip_id, VIDEO_SUFFIXES)
    except ValueError as e:
        return bad(where, "", "bad_entry", f"clip_id: {e}", source)
    try:
        captions: dict[str, str | list[str]] = {}
        for field, name in (("vision", "vision_cap"), ("audio", "audio_cap")):
            caps = caption_list(obj.get(name), name)
            if caps:
                captions[field] = caps
        for field, name in (("subtitle", "subtitle"), ("omni", "vast_cap")):
            text = caption_text(obj.get(name), name)
            if text:
                captions[field] = text
        if "omni" not in captions and obj.get("desc") is not None:  # VALOR: audio-visual captions
            desc = caption_list(obj["desc"], "desc")
            if desc:
                captions["omni"] = desc if len(desc) > 1 else desc[0]
        span = parse_span(obj["clip_span"]) if obj.get("clip_span") is not None else None
    except ValueError as e:
        return bad(where, key, "bad_entry", str(e), source)
    if not captions:
        return bad(where, key, "bad_entry", "no captions (vision_cap, audio_cap, subtitle, vast_cap)", source)
    name = str(clip_id).strip()
    video: list[ClipFile | ClipSpan] = [ClipFile(candidates(root, with_suffixes(name, VIDEO_SUFFIXES)))]
    vid = youtube_id(obj.get("url"))
    if span is not None and vid is not None:
        long_names = [f"{vid}{s}" for s in VIDEO_SUFFIXES]
        video.append(ClipSpan(candidates(root, long_names), span[0], span[1], str(obj["clip_span"])))
    meta = {"url": obj["url"]} if isinstance(obj.get("url"), str) else {}
    return Record(where, key, tuple(video), captions=captions, source=source, meta=meta, expects_audio=True)


def read(annotations: list[Path], options: Options) -> Iterator[Record]:
    root = options.media_root or Path(".")
    source = options.source or "vast27m"
    for path in annotations:
        for where, obj in json_entries(path):
            yield record(where, obj, root, source)


FORMAT = Format(
    name="vast27m",
    help="VAST-27M: JSON lists of {clip_id, vision_cap[5], audio_cap[5], subtitle, vast_cap}; "
    "<clip_id>.mp4 under --media-root",
    read=read,
)
