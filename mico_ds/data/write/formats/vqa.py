"""VQA v2 (Goyal et al., CVPR 2017; visualqa.org/download.html): pass both files of a split to
``--annotations`` (several splits: all their files):

    v2_OpenEnded_mscoco_<split>_questions.json
        {"info", "task_type", "data_type", "data_subtype": "val2014", "license",
         "questions": [{"image_id": 262148, "question": "Where is he looking?", "question_id": 262148000}]}
    v2_mscoco_<split>_annotations.json
        {"info", "license", "data_subtype", "annotations": [{"question_id", "image_id",
         "answers": [{"answer", "answer_confidence", "answer_id"} x 10], "multiple_choice_answer",
         "answer_type", "question_type"}]}

(told apart by ``questions`` / ``annotations`` in the file name). One sample per image, its questions
in file order in json ``qa``: ``{"q", "a": multiple_choice_answer, "answers": [10 strings],
"question_id", "question_type", "type": answer_type}`` (``type`` gives the evaluation's accuracy per
answer type: yes/no, number, other; ``answers`` allows the VQA metric). Without annotation files (the
test splits) the pairs have no answer. A question of a given split without its annotation is a
``bad_entry`` skip. The image is ``COCO_<split>_<012d image_id>.jpg`` under the media root (also in
``<split>/``, and COCO 2017's ``<012d>.jpg``); key ``COCO_<split>_<012d>``; json ``image_id``,
``split``. The samples carry no captions.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from mico_ds.data.write.formats.common import (
    AnnotationError,
    ClipFile,
    Format,
    Grouper,
    Options,
    Record,
    bad,
    candidates,
    caption_text,
    json_entries,
    not_object,
)

_SUBTYPE = re.compile(r"mscoco_([A-Za-z0-9-]+)_(?:questions|annotations)")


def _is_id(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def answers(paths: list[Path], source: str) -> tuple[dict[int, dict[str, Any]], list[Record]]:
    """The answer fields of each question_id of the annotation files; skips of malformed entries."""
    found: dict[int, dict[str, Any]] = {}
    skips: list[Record] = []
    for path in paths:
        for where, a in json_entries(path, member="annotations"):
            if (skip := not_object(where, a, source)) is not None:
                skips.append(skip)
                continue
            qid, given = a.get("question_id"), a.get("answers")
            try:
                if not _is_id(qid):
                    raise ValueError(f"question_id must be an integer, got {qid!r}")
                mc = caption_text(a.get("multiple_choice_answer"), "multiple_choice_answer")
                if mc is None:
                    raise ValueError("no multiple_choice_answer")
                if not isinstance(given, list) or not all(isinstance(x, dict) for x in given):
                    raise ValueError("answers must be a list of {answer, ...} objects")
                texts = [caption_text(x.get("answer"), "answers[].answer") or "" for x in given]
            except ValueError as e:
                skips.append(bad(where, "", "bad_entry", str(e), source))
                continue
            found[qid] = {"a": mc, "answers": texts, "question_type": a.get("question_type"),
                          "type": a.get("answer_type")}  # fmt: skip
    return found, skips


def names(image_id: int, split: str) -> tuple[str, list[str]]:
    """(key, file names) of a COCO image of ``split`` (train2014, val2014, test2015, ...)."""
    num = f"{image_id:012d}"
    if not split:
        return num, [f"{num}.jpg"]
    coco = f"COCO_{split}_{num}"
    return coco, [f"{coco}.jpg", f"{split}/{coco}.jpg", f"{num}.jpg", f"{split}/{num}.jpg"]


def questions(path: Path, given: dict[int, dict[str, Any]] | None, source: str) -> tuple[Grouper, str]:
    """The questions of ``path`` grouped by image (their answers joined in); the file's split."""
    head: dict[str, Any] = {}
    groups = Grouper()
    m = _SUBTYPE.search(path.name)
    for where, q in json_entries(path, member="questions", header=head):
        split = str(head.get("data_subtype") or (m.group(1) if m else ""))
        if (skip := not_object(where, q, source)) is not None:
            groups.skip(skip)
            continue
        image_id, qid = q.get("image_id"), q.get("question_id")
        try:
            if not _is_id(image_id) or not _is_id(qid):
                raise ValueError(f"image_id and question_id must be integers, got {image_id!r}, {qid!r}")
            text = caption_text(q.get("question"), "question")
            if text is None:
                raise ValueError("empty question")
        except ValueError as e:
            groups.skip(bad(where, "", "bad_entry", str(e), source))
            continue
        key = names(image_id, split)[0]
        pair: dict[str, Any] = {"q": text, "question_id": qid}
        if given is not None:
            if qid not in given:
                groups.skip(bad(where, key, "bad_entry", f"question_id {qid} has no annotation", source))
                continue
            pair.update({k: v for k, v in given[qid].items() if v is not None})
        groups.add(image_id, where, key, pair)
    return groups, str(head.get("data_subtype") or (m.group(1) if m else ""))


def read(annotations: list[Path], options: Options) -> Iterator[Record]:
    root = options.media_root or Path(".")
    source = options.source or "vqav2"
    q_files = [p for p in annotations if "questions" in p.name]
    a_files = [p for p in annotations if "annotations" in p.name and p not in q_files]
    other = [str(p) for p in annotations if p not in q_files and p not in a_files]
    if other or not q_files:
        raise AnnotationError(
            f"--format vqa takes *_questions.json and *_annotations.json files; cannot tell {other or 'none'}"
        )
    given, skips = answers(a_files, source) if a_files else (None, [])
    yield from skips
    for path in q_files:
        groups, split = questions(path, given, source)
        for item in groups:
            if isinstance(item, Record):
                yield item
                continue
            key, files = names(item.id, split)
            meta = {"image_id": item.id, "split": split, "qa": item.entries}
            yield Record(item.where, key, image=ClipFile(candidates(root, files)), source=source, meta=meta)


FORMAT = Format(
    name="vqa",
    help="VQA v2: v2_OpenEnded_mscoco_<split>_questions.json + v2_mscoco_<split>_annotations.json; "
    "COCO_<split>_<id>.jpg under --media-root",
    read=read,
)
