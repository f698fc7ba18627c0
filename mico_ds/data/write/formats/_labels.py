"""What the classification formats (imagefolder, labels-csv) share: the class list (OUT/classes.json,
index = position) and the label fields of a sample's json."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mico_ds.data.write.formats.common import AnnotationError

CLASSES_FILE = "classes.json"


def is_class_list(path: Path) -> bool:
    """An annotation file that is a class list (a ``classes.json`` of another run), by its suffix."""
    return path.suffix.lower() == ".json"


def given_classes(annotations: list[Path]) -> list[str] | None:
    """The class list of the ``.json`` annotation file (None when there is none), so that the splits
    of a dataset, made by separate runs, share one label index.

    Raises:
        AnnotationError: for several lists, or one that is not a JSON list of distinct strings.
    """
    lists = [p for p in annotations if is_class_list(p)]
    if not lists:
        return None
    if len(lists) > 1:
        raise AnnotationError(f"one class list (.json) at most, got {', '.join(map(str, lists))}")
    try:
        names = json.loads(lists[0].read_text(encoding="utf-8"))
    except ValueError as e:
        raise AnnotationError(f"{lists[0]}: not valid JSON ({e})") from None
    if not isinstance(names, list) or not all(isinstance(n, str) and n for n in names):
        raise AnnotationError(f"{lists[0]}: a class list must be a JSON list of class names")
    if len(set(names)) != len(names):
        raise AnnotationError(f"{lists[0]}: the class list names a class twice")
    return names


def label_meta(labels: list[str], index: dict[str, int], multi: bool) -> dict[str, Any]:
    """``label`` / ``label_index`` (the first label), and with ``multi`` also ``labels`` /
    ``label_indices`` (every label)."""
    meta: dict[str, Any] = {"label": labels[0], "label_index": index[labels[0]]}
    if multi:
        meta.update(labels=labels, label_indices=[index[n] for n in labels])
    return meta
