"""Clotho v2 (Drossos et al., ICASSP 2020; zenodo.org/records/4783391):
``clotho_captions_{development,validation,evaluation}.csv`` with the header
``file_name,caption_1,caption_2,caption_3,caption_4,caption_5``, one audio file a row, and the audio
``<file_name>`` (WAV) in the unzipped ``development/``, ``validation/``, ``evaluation/`` folders:
pass that folder as the media root (or their parent: ``<split folder>/<file_name>`` is looked in too).
The five captions are a list in ``captions.audio``; json ``file_name``. File names hold spaces and
other characters, so keys are the names with each run of other characters than ``A-Za-z0-9_-:+=@,``
replaced by ``_`` (two names that give one key: the second is a ``duplicate_key`` skip).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from mico_ds.data.write.clips import AUDIO_SUFFIXES
from mico_ds.data.write.formats.common import (
    ClipFile,
    Format,
    Options,
    Record,
    bad,
    candidates,
    iter_csv,
    make_key,
)

CAPTIONS = tuple(f"caption_{i}" for i in range(1, 6))
SPLIT_FOLDERS = ("development", "validation", "evaluation")


def read(annotations: list[Path], options: Options) -> Iterator[Record]:
    root = options.media_root or Path(".")
    source = options.source or "clotho"
    for path in annotations:
        for line, row in iter_csv(path, ("file_name", *CAPTIONS)):
            where = f"{path}:{line}"
            if isinstance(row, str):
                yield bad(where, "", "bad_entry", f"malformed CSV row: {row}", source)
                continue
            name = row["file_name"].strip()
            try:
                if "/" in name:
                    raise ValueError(f"file_name {name!r} is not a file name")
                key = make_key(name, AUDIO_SUFFIXES)
            except ValueError as e:
                yield bad(where, "", "bad_entry", f"file_name: {e}", source)
                continue
            caps = [c.strip() for c in (row[n] for n in CAPTIONS) if c.strip()]
            if not caps:
                yield bad(where, key, "bad_entry", "no caption (caption_1 .. caption_5 are empty)", source)
                continue
            files = candidates(root, [name, *(f"{d}/{name}" for d in SPLIT_FOLDERS)])
            yield Record(where, key, audio=ClipFile(files), captions={"audio": caps}, source=source,
                         meta={"file_name": name})  # fmt: skip


FORMAT = Format(
    name="clotho",
    help="Clotho v2: CSV file_name,caption_1..caption_5; <file_name> under --media-root",
    read=read,
)
