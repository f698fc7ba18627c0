"""The downstream annotation files of VAST and VALOR (github.com/TXH-mercury/VAST, "Download
annotations": ``datasets/annotations/<task>/descs_*.json``): JSON lists (or JSON lines) of entries::

    {"video_id": "video7020", "desc": "a man is talking" | [..], "subtitle": "...",
     "question": "what is he doing?" | [..], "answer": "talking" | [..]}
    {"image_id": "COCO_val2014_000000391895", "caption": [...]}

An entry names a video (``video_id``) or an image (``image_id``); ``desc`` or ``caption`` (a string or
a list), ``subtitle`` and ``question`` / ``answer`` (strings, or lists of one length) are each
optional, but an entry needs a caption, a subtitle or a question. Entries of one id (QA files list
one question an entry) are one sample: captions gathered as a list (repeats dropped), the first
subtitle, every question in json ``qa`` ``[{"q", "a"}]``. A video's captions are ``captions.omni``
(VAST's downstream captions describe the whole clip, as VALOR's ``desc`` in the vast27m format; train
or evaluate with ``caption_fields: [omni]``), an image's ``captions.vision``.

Media: ``<video_id>.mp4`` under the media root (also ``.webm``, ``.mkv``, ``.mov``, ``.m4v``, ``.gif``,
``.avi``; MKV/MOV/AVI remuxed into MP4), with its own audio track (a video without sound is noted);
``<image_id>.jpg`` (also ``.jpeg``, ``.png``, ``.webp``).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from mico_ds.data.write.clips import ANY_VIDEO_SUFFIXES, IMAGE_SUFFIXES
from mico_ds.data.write.formats.common import (
    ClipFile,
    Format,
    Group,
    Grouper,
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


def qa_pairs(question: object, answer: object) -> list[dict[str, str]]:
    """``[{"q", "a"}]`` of a question and its answer, or of two lists of one length."""
    if question is None and answer is None:
        return []
    qs = caption_list(question, "question")
    ans = caption_list(answer, "answer")
    if isinstance(question, list) != isinstance(answer, list) or len(qs) != len(ans) or not qs:
        raise ValueError(f"question and answer must be two strings or two lists of one length, got "
                         f"{len(qs)} question(s) and {len(ans)} answer(s)")  # fmt: skip
    return [{"q": q, "a": a} for q, a in zip(qs, ans)]


def entry(where: str, obj: dict[str, Any], source: str) -> tuple[tuple[str, str], str, dict] | Record:
    """``((kind, id), key, parts)`` of one entry, or the skip naming what is wrong."""
    kind = "video" if obj.get("video_id") is not None else "image"
    raw = obj.get(f"{kind}_id")
    try:
        key = make_key(raw, ANY_VIDEO_SUFFIXES if kind == "video" else IMAGE_SUFFIXES)
    except ValueError as e:
        return bad(where, "", "bad_entry", f"video_id / image_id: {e}", source)
    try:
        name = "desc" if obj.get("desc") is not None else "caption"
        parts = {
            "captions": caption_list(obj.get(name), name),
            "subtitle": caption_text(obj.get("subtitle"), "subtitle"),
            "qa": qa_pairs(obj.get("question"), obj.get("answer")),
        }
    except ValueError as e:
        return bad(where, key, "bad_entry", str(e), source)
    if not (parts["captions"] or parts["subtitle"] or parts["qa"]):
        return bad(where, key, "bad_entry", "no desc / caption, subtitle or question", source)
    return (kind, str(raw).strip()), key, parts


def record(group: Group, root: Path, source: str) -> Record:
    kind, name = group.id
    caps = list(dict.fromkeys(c for p in group.entries for c in p["captions"]))
    captions: dict[str, str | list[str]] = {"omni" if kind == "video" else "vision": caps} if caps else {}
    subtitle = next((p["subtitle"] for p in group.entries if p["subtitle"]), None)
    if subtitle:
        captions["subtitle"] = subtitle
    meta: dict[str, Any] = {f"{kind}_id": name}
    qa = [q for p in group.entries for q in p["qa"]]
    if qa:
        meta["qa"] = qa
    if kind == "image":
        image = ClipFile(candidates(root, with_suffixes(name, IMAGE_SUFFIXES)))
        return Record(group.where, group.key, image=image, captions=captions, source=source, meta=meta)
    video = (ClipFile(candidates(root, with_suffixes(name, ANY_VIDEO_SUFFIXES))),)
    return Record(group.where, group.key, video, captions=captions, source=source, meta=meta,
                  expects_audio=True)  # fmt: skip


def read(annotations: list[Path], options: Options) -> Iterator[Record]:
    root = options.media_root or Path(".")
    source = options.source or "vast"
    groups = Grouper()
    for path in annotations:
        for where, obj in json_entries(path):
            got = not_object(where, obj, source) or entry(where, obj, source)
            if isinstance(got, Record):
                groups.skip(got)
            else:
                item, key, parts = got
                groups.add(item, where, key, parts)
    for item in groups:
        yield item if isinstance(item, Record) else record(item, root, source)


FORMAT = Format(
    name="vast",
    help="VAST/VALOR downstream JSON lists of {video_id|image_id, desc|caption, subtitle?, question?, "
    "answer?}; <video_id>.mp4 / <image_id>.jpg under --media-root",
    read=read,
)
