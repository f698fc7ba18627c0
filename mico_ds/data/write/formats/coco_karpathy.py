"""COCO / Flickr30k captions in Karpathy's splits (Karpathy & Fei-Fei, CVPR 2015; the
``caption_datasets.zip`` of cs.stanford.edu/people/karpathy/deepimagesent): ``dataset_coco.json``,
``dataset_flickr30k.json`` (``dataset_flickr8k.json`` too), each one object::

    {"images": [{"filepath": "val2014", "filename": "COCO_val2014_000000391895.jpg", "split": "test",
                 "sentences": [{"raw": "A man with a red helmet ...", "tokens": [...], ...}, ...],
                 "cocoid": 391895, "imgid": 0, "sentids": [...]}, ...], "dataset": "coco"}

Flickr entries have no ``filepath`` (and no ``cocoid``). ``--split train|val|test|restval`` keeps one
split; ``train`` takes ``restval`` too (the 113k-image COCO training set of the literature); without
``--split`` every image is kept. The image is ``<filepath>/<filename>`` under the media root (else
``<filename>``), stored byte for byte once Pillow decodes it. Every ``raw`` sentence is kept, as a
list in ``captions.vision``; json ``split`` (Karpathy's) and ``cocoid`` / ``imgid``.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from mico_ds.data.write.clips import IMAGE_SUFFIXES
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
)

SPLITS = ("train", "val", "test", "restval")


def wanted(split: object, want: str | None) -> bool:
    """Whether an image of Karpathy split ``split`` is kept for ``--split want``."""
    return want is None or split == want or (want == "train" and split == "restval")


def record(where: str, obj: Any, root: Path, source: str) -> Record:
    """One image entry -> a record (or a skipped one naming what is wrong)."""
    filename = obj.get("filename")
    try:
        if not isinstance(filename, str) or not filename.strip() or "/" in filename:
            raise ValueError(f"filename must be a file name, got {filename!r}")
        key = make_key(filename, IMAGE_SUFFIXES)
    except ValueError as e:
        return bad(where, "", "bad_entry", str(e), source)
    sentences = obj.get("sentences")
    if not isinstance(sentences, list):
        detail = f"sentences must be a list, got {type(sentences).__name__}"
        return bad(where, key, "bad_entry", detail, source)
    caps: list[str] = []
    for i, s in enumerate(sentences):
        try:
            text = caption_text(s.get("raw") if isinstance(s, dict) else s, f"sentences[{i}].raw")
        except ValueError as e:
            return bad(where, key, "bad_entry", str(e), source)
        if text:
            caps.append(text)
    if not caps:
        return bad(where, key, "bad_entry", "no sentence with a raw caption", source)
    folder = obj.get("filepath")
    names = [f"{folder}/{filename}", filename] if isinstance(folder, str) and folder else [filename]
    meta = {k: obj[k] for k in ("split", "cocoid", "imgid") if isinstance(obj.get(k), (str, int))}
    return Record(where, key, image=ClipFile(candidates(root, names)), captions={"vision": caps},
                  source=source, meta=meta)  # fmt: skip


def read(annotations: list[Path], options: Options) -> Iterator[Record]:
    root = options.media_root or Path(".")
    for path in annotations:
        # dataset_coco.json -> "coco", dataset_flickr30k.json -> "flickr30k"
        source = options.source or (path.stem.removeprefix("dataset_") or "coco-karpathy")
        for where, obj in json_entries(path, member="images"):
            if (skip := not_object(where, obj, source)) is not None:
                yield skip
            elif wanted(obj.get("split"), options.split):
                yield record(where, obj, root, source)


FORMAT = Format(
    name="coco-karpathy",
    help="COCO/Flickr30k Karpathy splits: dataset_coco.json {images: [{filepath, filename, split, "
    "sentences}]}; images under --media-root",
    read=read,
    splits=SPLITS,
)
