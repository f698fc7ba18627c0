"""Audio / video (or image) classification from a CSV of ``file,label`` rows (ESC-50's
``meta/esc50.csv``, a VGGSound or AudioSet list written with a header, Kinetics-style lists, ...).

Columns are found by name (any case): the file is ``file`` | ``filename`` | ``path`` |
``youtube_id``, the label ``label`` | ``labels`` | ``class`` | ``display_name`` | ``category`` (the
first present of each); a ``fold`` or ``split`` column is kept in the json. A label field may hold
several labels separated by commas (a quoted field: ``"Speech,Music"``): multi-label. Rows naming one
file are one sample, their labels joined (order kept, repeats dropped).

Classes are every label of the given CSV files, sorted: ``OUT/classes.json``; json ``label`` /
``label_index`` (the first label and its position there) and ``labels`` / ``label_indices`` (all).
A split made by another run takes the first run's list: add its ``OUT/classes.json`` to
``--annotations`` (a label not in it is a ``bad_entry`` skip).

The media file is ``<file>`` under the media root when it has a media suffix, else ``<file>`` with
each audio, video and image suffix in turn (``.wav``, ``.flac``, ... ``.mp4``, ... ``.jpg``, ...); its
kind (audio, video, image) is told by the suffix of the file found. Audio is stored as it is (a
format the loader does not read becomes FLAC), video as the clip formats (with its audio track).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from mico_ds.data.write.clips import ANY_VIDEO_SUFFIXES, AUDIO_SUFFIXES, IMAGE_SUFFIXES
from mico_ds.data.write.formats._labels import CLASSES_FILE, given_classes, is_class_list, label_meta
from mico_ds.data.write.formats.common import (
    AnnotationError,
    ClipFile,
    Format,
    Grouper,
    Options,
    Record,
    bad,
    candidates,
    csv_header,
    iter_csv,
    make_key,
    with_suffixes,
)

FILE_COLUMNS = ("file", "filename", "path", "youtube_id")
LABEL_COLUMNS = ("label", "labels", "class", "display_name", "category")
KEPT_COLUMNS = ("fold", "split")
MEDIA_SUFFIXES = (*AUDIO_SUFFIXES, *ANY_VIDEO_SUFFIXES, *IMAGE_SUFFIXES)


def columns(path: Path) -> tuple[str, str]:
    """The (file, label) column names of a CSV file (as its header writes them)."""
    header = csv_header(path)
    by_lower = {h.lower(): h for h in reversed(header)}
    file_col = next((by_lower[c] for c in FILE_COLUMNS if c in by_lower), None)
    label_col = next((by_lower[c] for c in LABEL_COLUMNS if c in by_lower), None)
    if file_col is None or label_col is None:
        raise AnnotationError(
            f"{path}:1: CSV header {header} needs a file column ({'|'.join(FILE_COLUMNS)}) and a label "
            f"column ({'|'.join(LABEL_COLUMNS)})"
        )
    return file_col, label_col


def rows(annotations: list[Path], source: str) -> Grouper:
    """The rows of the CSV files grouped by file: entries ``(labels, kept columns)``; bad rows skipped."""
    groups = Grouper()
    for path in annotations:
        if is_class_list(path):
            continue
        file_col, label_col = columns(path)
        for line, row in iter_csv(path, (file_col, label_col)):
            where = f"{path}:{line}"
            if isinstance(row, str):
                groups.skip(bad(where, "", "bad_entry", f"malformed CSV row: {row}", source))
                continue
            name = row[file_col].strip()
            try:
                key = make_key(name, MEDIA_SUFFIXES)
            except ValueError as e:
                groups.skip(bad(where, "", "bad_entry", f"{file_col}: {e}", source))
                continue
            labels = [x.strip() for x in row[label_col].split(",") if x.strip()]
            if not labels:
                groups.skip(bad(where, key, "bad_entry", f"empty {label_col}", source))
                continue
            kept = {k.lower(): v.strip() for k, v in row.items() if k.lower() in KEPT_COLUMNS and v.strip()}
            groups.add(name, where, key, (labels, kept))
    return groups


def classes(annotations: list[Path], options: Options) -> list[str]:
    """The class list: the given one, else every label of the CSV files, sorted."""
    given = given_classes(annotations)
    if given is not None:
        return given
    groups = [g for g in rows(annotations, "") if not isinstance(g, Record)]
    return sorted({n for g in groups for labels, _ in g.entries for n in labels})


def outputs(annotations: list[Path], options: Options) -> dict[str, Any]:
    return {CLASSES_FILE: classes(annotations, options)}


def read(annotations: list[Path], options: Options) -> Iterator[Record]:
    root = options.media_root or Path(".")
    source = options.source or "labels-csv"
    index = {n: i for i, n in enumerate(classes(annotations, options))}
    for item in rows(annotations, source):
        if isinstance(item, Record):
            yield item
            continue
        labels = list(dict.fromkeys(n for labels, _ in item.entries for n in labels))
        unknown = [n for n in labels if n not in index]
        if unknown:
            detail = f"label(s) {unknown} not in the given {CLASSES_FILE}"
            yield bad(item.where, item.key, "bad_entry", detail, source)
            continue
        meta = {k: v for _, kept in item.entries for k, v in kept.items()}
        meta.update(label_meta(labels, index, multi=True))
        name = str(item.id)
        names = [name] if name.lower().endswith(MEDIA_SUFFIXES) else with_suffixes(name, MEDIA_SUFFIXES)
        media = ClipFile(candidates(root, names))
        yield Record(item.where, item.key, media=media, source=source, meta=meta)


FORMAT = Format(
    name="labels-csv",
    help="classification CSV with file,label columns (multi-label: 'a,b'); media under --media-root; "
    "OUT/classes.json",
    read=read,
    outputs=outputs,
)
