"""An image classification folder (ImageNet's ``train/`` and re-sorted ``val/``, torchvision's
``ImageFolder`` layout): ``--media-root ROOT`` with one sub-folder per class, ``ROOT/<class>/<file>``
(files in nested folders too); no ``--annotations``.

Classes are the sub-folders' names, sorted (hidden folders left out): ``OUT/classes.json`` lists
them, and a sample's json ``label`` is its class name, ``label_index`` its position there (the
indices torchvision's ImageFolder gives). A split made by another run takes the first run's list:
``--annotations OUT/classes.json`` (a folder not in it is a ``bad_entry`` skip per image). Images
are the files ending in ``.jpg``, ``.jpeg``, ``.png``, ``.webp`` (any case), in sorted path order,
stored byte for byte once Pillow decodes them; other files are not read. Keys ``<class>_<file stem>``
(other characters than ``A-Za-z0-9_-:+=@,`` replaced by ``_``); reports name the image file.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from mico_ds.data.write.clips import IMAGE_SUFFIXES
from mico_ds.data.write.formats._labels import CLASSES_FILE, given_classes, is_class_list, label_meta
from mico_ds.data.write.formats.common import (
    AnnotationError,
    ClipFile,
    Format,
    Options,
    Record,
    bad,
    make_key,
)


def folders(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def classes(annotations: list[Path], options: Options) -> list[str]:
    """The class list: the given one, else the sub-folders of the media root."""
    other = [str(p) for p in annotations if not is_class_list(p)]
    if other:
        raise AnnotationError(f"--format imagefolder takes no annotation files but a classes.json: {other}")
    root = options.media_root or Path(".")
    names = given_classes(annotations) or folders(root)
    if not names:
        raise AnnotationError(f"{root} has no class sub-folders")
    return names


def outputs(annotations: list[Path], options: Options) -> dict[str, Any]:
    return {CLASSES_FILE: classes(annotations, options)}


def read(annotations: list[Path], options: Options) -> Iterator[Record]:
    root = options.media_root or Path(".")
    source = options.source or root.name or "imagefolder"
    index = {n: i for i, n in enumerate(classes(annotations, options))}
    for name in folders(root):
        for path in sorted(p for p in (root / name).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES):
            if not path.is_file():
                continue
            rel = path.relative_to(root / name).with_suffix("")
            key = make_key(f"{name}_{rel.as_posix()}")
            if name not in index:
                detail = f"class {name!r} is not in the given {CLASSES_FILE}"
                yield bad(str(path), key, "bad_entry", detail, source)
                continue
            meta = label_meta([name], index, multi=False)
            yield Record(str(path), key, image=ClipFile((str(path),)), source=source, meta=meta)


FORMAT = Format(
    name="imagefolder",
    help="image classification: --media-root ROOT/<class>/<image> (no --annotations); OUT/classes.json",
    read=read,
    needs_annotations=False,
    outputs=outputs,
)
