"""MSR-VTT (Xu et al., CVPR 2016): ``train_val_videodatainfo.json`` / ``test_videodatainfo.json`` of
the 2016 challenge, or the combined ``videodatainfo.json`` / ``MSRVTT_data.json`` (the same layout)::

    {"info": {...},
     "videos": [{"video_id": "video0", "category": 9, "url": "...", "start time": 137.72,
                 "end time": 149.44, "split": "train", "id": 0}, ...],
     "sentences": [{"caption": "a car is shown", "video_id": "video0", "sen_id": 0}, ...]}

One sample per video (``--split train|validate|test`` keeps one split), its ~20 captions as a list in
``captions.vision`` (file order). The clip is ``<video_id>.mp4`` under the media root (also
``TrainValVideo/`` and ``TestVideo/``, the folders of the published zips); its own audio track is kept
(a clip without sound is kept, noted). json: ``video_id``, ``split``, ``category``, ``url``.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from mico_ds.data.write.clips import VIDEO_SUFFIXES
from mico_ds.data.write.formats.common import (
    ClipFile,
    Format,
    Options,
    Record,
    bad,
    candidates,
    caption_text,
    json_entries,
    make_key,
    not_object,
    with_suffixes,
)

SPLITS = ("train", "validate", "test")
ZIP_FOLDERS = ("TrainValVideo", "TestVideo")


def sentences(path: Path, source: str) -> tuple[dict[str, list[str]], dict[str | None, list[Record]]]:
    """The captions of each video of ``path``'s ``sentences``; the skips of malformed sentences by
    their video (None: no usable video_id)."""
    caps: dict[str, list[str]] = {}
    skips: dict[str | None, list[Record]] = {}
    for where, s in json_entries(path, member="sentences"):
        skip = not_object(where, s, source)
        vid = s.get("video_id") if skip is None else None
        if skip is None and (not isinstance(vid, str) or not vid.strip()):
            skip = bad(where, "", "bad_entry", f"sentence video_id {vid!r}", source)
        if skip is not None:
            skips.setdefault(None, []).append(skip)
            continue
        try:
            text = caption_text(s.get("caption"), "caption")
        except ValueError as e:
            skips.setdefault(vid, []).append(bad(where, vid, "bad_entry", f"sentence {e}", source))
            continue
        if text:
            caps.setdefault(vid, []).append(text)
    return caps, skips


def read(annotations: list[Path], options: Options) -> Iterator[Record]:
    root = options.media_root or Path(".")
    source = options.source or "msrvtt"
    for path in annotations:
        caps, skips = sentences(path, source)
        for where, v in json_entries(path, member="videos"):
            if (skip := not_object(where, v, source)) is not None:
                yield skip
                continue
            if options.split is not None and v.get("split") != options.split:
                continue
            vid = v.get("video_id")
            try:
                key = make_key(vid, VIDEO_SUFFIXES)
            except ValueError as e:
                yield bad(where, "", "bad_entry", f"video_id: {e}", source)
                continue
            yield from skips.pop(vid, [])  # its malformed sentences, next to it
            if not caps.get(vid):
                yield bad(where, key, "bad_entry", f"no sentence of {vid} in {path.name}", source)
                continue
            names = with_suffixes(vid, VIDEO_SUFFIXES) + [f"{d}/{vid}.mp4" for d in ZIP_FOLDERS]
            meta = {"video_id": vid, **{k: v[k] for k in ("split", "category", "url") if k in v}}
            yield Record(where, key, (ClipFile(candidates(root, names)),), captions={"vision": caps[vid]},
                         source=source, meta=meta, expects_audio=True)  # fmt: skip
        yield from skips.pop(None, [])  # sentences that name no video
        if options.split is None:  # sentences of videos the file does not list
            for rest in skips.values():
                yield from rest


FORMAT = Format(
    name="msrvtt",
    help="MSR-VTT: videodatainfo.json {videos: [{video_id, split}], sentences: [{video_id, caption}]}; "
    "<video_id>.mp4 under --media-root",
    read=read,
    splits=SPLITS,
)
