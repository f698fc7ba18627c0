"""HD-VILA-100M (Xue et al., CVPR 2022; github.com/microsoft/XPretrain, hd-vila-100m/): JSON-lines files
``hdvila_part*.jsonl``, one long YouTube video a line with the spans to cut::

    {"video_id": "QMi8x8o55Ns", "url": "https://www.youtube.com/watch?v=QMi8x8o55Ns",
     "clip": [{"clip_id": "QMi8x8o55Ns.1.mp4", "span": ["00:00:17.759", "00:00:23.279"]}, ...]}

Media: the downloaded long video ``<video_id>.mp4`` (or ``.webm``/``.mkv``/``.mov``) under the media
root (HD-VILA's own scripts keep them in ``download_videos/``). Every span becomes one sample (key
``QMi8x8o55Ns_1``), cut at ingestion with PyAV (``mico_ds.data.write.clips.cut_clip``: re-encoded
H.264 + AAC, exact to the frame) with its audio. A span starting at or past the video's end is
skipped (``span_past_end``); one ending past it is cut at the end, noted. A video without sound gives
video-only clips, noted. The published lines carry no captions (the ASR transcripts are not in
them), so the json has ``url`` and ``span`` but no caption unless an entry adds a ``text`` string,
stored as ``captions.subtitle``.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from mico_ds.data.write.clips import VIDEO_SUFFIXES, parse_span
from mico_ds.data.write.formats.common import (
    ClipSpan,
    Format,
    Options,
    Record,
    bad,
    candidates,
    caption_text,
    iter_jsonl,
    make_key,
)


def read(annotations: list[Path], options: Options) -> Iterator[Record]:
    root = options.media_root or Path(".")
    source = options.source or "hdvila"
    for path in annotations:
        for line, obj in iter_jsonl(path):
            where = f"{path}:{line}"
            if isinstance(obj, Exception):
                yield bad(where, "", "bad_entry", f"not valid JSON ({obj})", source)
                continue
            if not isinstance(obj, dict) or not isinstance(obj.get("clip"), list):
                yield bad(where, "", "bad_entry", "expected an object with a 'clip' list", source)
                continue
            try:
                vid = make_key(obj.get("video_id"))
            except ValueError as e:
                yield bad(where, "", "bad_entry", f"video_id: {e}", source)
                continue
            long_video = candidates(root, [f"{obj['video_id']}{s}" for s in VIDEO_SUFFIXES])
            for i, clip in enumerate(obj["clip"]):
                here = f"{where} (clip {i})"
                if not isinstance(clip, dict):
                    yield bad(here, "", "bad_entry", f"clip must be an object, got {clip!r}", source)
                    continue
                try:
                    key = make_key(clip.get("clip_id", f"{vid}.{i + 1}"), VIDEO_SUFFIXES)
                    start, end = parse_span(clip.get("span"))
                    text = caption_text(clip.get("text"), "text")
                except ValueError as e:
                    yield bad(here, "", "bad_entry", str(e), source)
                    continue
                meta = {"span": clip["span"], "video_id": str(obj["video_id"])}
                if isinstance(obj.get("url"), str):
                    meta["url"] = obj["url"]
                yield Record(
                    here, key, (ClipSpan(long_video, start, end, str(clip["span"])),),
                    captions={"subtitle": text} if text else {}, source=source, meta=meta,
                    expects_audio=True,
                )  # fmt: skip


FORMAT = Format(
    name="hdvila",
    help="HD-VILA-100M: hdvila_part*.jsonl lines {video_id, url, clip: [{clip_id, span}]}; "
    "<video_id>.mp4 under --media-root, one clip cut per span",
    read=read,
)
