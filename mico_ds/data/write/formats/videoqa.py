"""Open-ended video QA: MSVD-QA and MSRVTT-QA (Xu et al., ACM MM 2017; ``{train,val,test}_qa.json``)
and TGIF-QA (Jang et al., CVPR 2017), as JSON lists (or JSON lines) of questions::

    [{"answer": "man", "id": 0, "question": "who is cutting something?", "video_id": 1}, ...]  # MSVD-QA
    [{"gif_name": "tumblr_nk172bbdPI1u1lr18o1_250", "question": "...", "answer": "..."}, ...]

or TGIF-QA's own tab-separated files (``Train_frameqa_question.tsv``: ``gif_name``, ``question``,
``answer``, ...; the multiple-choice tasks' ``a1`` .. ``a5`` with ``answer`` their index). The video is
``video_id`` | ``video`` | ``gif_name``. The questions of one video are one sample, json ``qa``
``[{"q", "a", "type", "question_id"?, "choices"?}]`` (file order); ``type`` is the entry's own
``type`` / ``answer_type`` / ``question_type``, else the question word (what, who, how, when, where,
which, why; else ``other``): the per-type accuracies these benchmarks report.

Video lookup under the media root, each name with the suffixes ``.mp4``, ``.webm``, ``.mkv``,
``.mov``, ``.m4v``, ``.gif``, ``.avi`` (MKV/MOV/AVI remuxed into MP4, GIF kept): the id as written;
for a numeric id N also ``video<N>`` (MSR-VTT's names) and ``vid<N>``. MSVD's clips are published
under YouTube names (``-4wsuPCjDBc_5_15.avi``): give MSVD-QA's ``youtube_mapping.txt`` (lines
``-4wsuPCjDBc_5_15 vid1``) to ``--annotations`` too, and ``vid<N>`` is looked up there first. A
video's own audio track is kept. json ``video_id``: the id as written. The samples carry no captions.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from mico_ds.data.write.clips import ANY_VIDEO_SUFFIXES
from mico_ds.data.write.formats.common import (
    AnnotationError,
    ClipFile,
    Format,
    Grouper,
    Options,
    Record,
    bad,
    candidates,
    caption_list,
    caption_text,
    iter_csv,
    json_entries,
    make_key,
    not_object,
    with_suffixes,
)

ID_FIELDS = ("video_id", "video", "gif_name")
TYPE_FIELDS = ("type", "answer_type", "question_type")
QUESTION_WORDS = ("what", "who", "how", "when", "where", "which", "why")
CHOICES = tuple(f"a{i}" for i in range(1, 6))


def mapping(path: Path) -> dict[str, str]:
    """``vid<N>`` -> YouTube clip name, from MSVD-QA's ``youtube_mapping.txt``."""
    out: dict[str, str] = {}
    for lineno, text in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        parts = text.split()
        if not parts:
            continue
        if len(parts) != 2:
            raise AnnotationError(f"{path}:{lineno}: expected '<youtube clip name> vid<N>', got {text!r}")
        out[parts[1]] = parts[0]
    return out


def entries(path: Path) -> Iterator[tuple[str, Any]]:
    """``(FILE:LINE, entry)`` of a JSON list / JSON-lines file, or of a TSV / CSV file's rows."""
    if path.suffix.lower() not in (".tsv", ".csv"):
        yield from json_entries(path)
        return
    for line, row in iter_csv(path, ("question",), delimiter="\t" if path.suffix.lower() == ".tsv" else ","):
        yield f"{path}:{line}", (ValueError(f"malformed row: {row}") if isinstance(row, str) else row)


def question_type(obj: dict[str, Any], question: str) -> str:
    for name in TYPE_FIELDS:
        if isinstance(obj.get(name), (str, int)) and str(obj[name]).strip():
            return str(obj[name]).strip()
    word = question.split(maxsplit=1)[0].lower() if question.split() else ""
    return word if word in QUESTION_WORDS else "other"


def pair(obj: dict[str, Any]) -> dict[str, Any]:
    """The qa pair of an entry (ValueError naming the field that is wrong)."""
    q = caption_text(obj.get("question"), "question")
    if q is None:
        raise ValueError("empty question")
    out: dict[str, Any] = {"q": q, "type": question_type(obj, q)}
    answer = obj.get("answer")
    if all(obj.get(c) not in (None, "") for c in CHOICES):  # TGIF-QA multiple choice: answer = index
        out["choices"] = [str(obj[c]).strip() for c in CHOICES]
        if not str(answer).strip().isdigit() or int(str(answer).strip()) >= len(CHOICES):
            raise ValueError(f"answer must be the index of a1..a5, got {answer!r}")
        out["a"] = out["choices"][int(str(answer).strip())]
    else:
        answers = caption_list(answer, "answer")
        if not answers:
            raise ValueError("empty answer")
        out["a"] = answers[0]
        if isinstance(answer, list):
            out["answers"] = answers
    qid = obj.get("question_id", obj.get("id", obj.get("key")))
    if isinstance(qid, (str, int)) and not isinstance(qid, bool) and str(qid).strip():
        out["question_id"] = qid
    return out


def video_names(raw: str, lookup: dict[str, str]) -> list[str]:
    """File names to look for of video id ``raw`` (see the module docstring)."""
    stems = [raw]
    if raw.isdigit():
        stems += [f"video{raw}", f"vid{raw}"]
    for s in list(stems):
        if s in lookup:
            stems.insert(0, lookup[s])
    return [n for s in dict.fromkeys(stems) for n in with_suffixes(s, ANY_VIDEO_SUFFIXES)]


def read(annotations: list[Path], options: Options) -> Iterator[Record]:
    root = options.media_root or Path(".")
    source = options.source or "videoqa"
    lookup: dict[str, str] = {}
    for p in annotations:
        if p.suffix.lower() == ".txt":
            lookup.update(mapping(p))
    groups = Grouper()
    for path in annotations:
        if path.suffix.lower() == ".txt":
            continue
        for where, obj in entries(path):
            if (skip := not_object(where, obj, source)) is not None:
                groups.skip(skip)
                continue
            raw = next((obj[f] for f in ID_FIELDS if obj.get(f) not in (None, "")), None)
            try:
                key = make_key(raw, ANY_VIDEO_SUFFIXES)
            except ValueError as e:
                groups.skip(bad(where, "", "bad_entry", f"{' / '.join(ID_FIELDS)}: {e}", source))
                continue
            try:
                qa = pair(obj)
            except ValueError as e:
                groups.skip(bad(where, key, "bad_entry", str(e), source))
                continue
            groups.add(str(raw).strip(), where, key, (raw, qa))
    for item in groups:
        if isinstance(item, Record):
            yield item
            continue
        raw = item.entries[0][0]
        video = (ClipFile(candidates(root, video_names(str(raw).strip(), lookup))),)
        meta = {"video_id": raw, "qa": [qa for _, qa in item.entries]}
        yield Record(item.where, item.key, video, source=source, meta=meta)


FORMAT = Format(
    name="videoqa",
    help="MSVD-QA / MSRVTT-QA / TGIF-QA: JSON lists of {video_id|video|gif_name, question, answer} (or "
    "TGIF-QA's TSV); <video>.mp4|.gif|.avi under --media-root",
    read=read,
)
