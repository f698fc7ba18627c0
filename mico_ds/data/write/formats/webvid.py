"""WebVid-2.5M / 10M (Bain et al., ICCV 2021; github.com/m-bain/webvid): CSV files ``results_2M_train.csv``
with the header ``videoid,contentUrl,duration,page_dir,name`` (the 10M files order the columns
differently; columns are found by name). Media: ``<page_dir>/<videoid>.mp4`` under the media root (the
layout of WebVid's ``download.py``, which writes ``DATA_DIR/videos/<page_dir>/<videoid>.mp4``: pass
``DATA_DIR/videos``; ``DATA_DIR`` works too). ``name`` is the vision caption. WebVid's stock-footage
previews have no sound: the samples are video only.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

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

COLUMNS = ("videoid", "page_dir", "name")


def read(annotations: list[Path], options: Options) -> Iterator[Record]:
    root = options.media_root or Path(".")
    source = options.source or "webvid"
    for path in annotations:
        for line, row in iter_csv(path, COLUMNS):
            where = f"{path}:{line}"
            if isinstance(row, str):
                yield bad(where, "", "bad_entry", f"malformed CSV row: {row}", source)
                continue
            vid, page, name = row["videoid"].strip(), row["page_dir"].strip(), row["name"].strip()
            try:
                key = make_key(vid)
            except ValueError as e:
                yield bad(where, "", "bad_entry", f"videoid: {e}", source)
                continue
            if not page or page.lower() == "nan" or "/" in page or page in (".", ".."):
                yield bad(where, key, "bad_entry", f"page_dir {page!r} is not a directory name", source)
                continue
            if not name:
                yield bad(where, key, "bad_entry", "empty name (the caption)", source)
                continue
            files = candidates(root, [f"{page}/{vid}.mp4", f"videos/{page}/{vid}.mp4"])
            meta = {"url": row["contentUrl"]} if row.get("contentUrl") else {}
            yield Record(where, key, (ClipFile(files),), captions={"vision": name}, source=source, meta=meta)


FORMAT = Format(
    name="webvid",
    help="WebVid: CSV videoid,contentUrl,duration,page_dir,name; <page_dir>/<videoid>.mp4 under --media-root",
    read=read,
)
