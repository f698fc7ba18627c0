"""AudioCaps (Kim et al., NAACL 2019; github.com/cdjkim/audiocaps): ``dataset/train.csv``, ``val.csv``,
``test.csv`` with the header ``audiocap_id,youtube_id,start_time,caption``, one row per caption (train
has one caption per clip, val and test five, in rows that share ``youtube_id`` and ``start_time``).

Rows of one clip (``youtube_id``, ``start_time``; across the given files) are one sample, its
captions a list in ``captions.audio`` (row order), key ``<youtube_id>_<start_time>``. Audio under the
media root, the first found of:

1. an already-cut clip ``<youtube_id>_<start_time>.<ext>`` or ``<audiocap_id>.<ext>`` (any row's id),
   stored as it is (a format the loader does not read becomes FLAC);
2. the recording ``<youtube_id>.<ext>`` (audio, or a video's audio track), cut to
   [start_time, start_time + 10) s as 16-bit FLAC; a recording no longer than 10.5 s is taken as the
   already-cut clip (noted when start_time > 0).

``<ext>``: wav, flac, mp3, m4a, aac, ogg, opus (2.: also the video suffixes). json: ``youtube_id``,
``start_time``, ``audiocap_ids``, ``video_id`` (= youtube_id: clips of one recording share it).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from mico_ds.data.write.clips import AUDIO_SUFFIXES, VIDEO_SUFFIXES, parse_timestamp
from mico_ds.data.write.formats.common import (
    ClipFile,
    ClipSpan,
    Format,
    Grouper,
    Options,
    Record,
    bad,
    candidates,
    iter_csv,
    make_key,
)

COLUMNS = ("audiocap_id", "youtube_id", "start_time", "caption")
CLIP_SECONDS = 10.0


def _number(text: str) -> int | float:
    value = parse_timestamp(text)
    return int(value) if value.is_integer() else value


def rows(annotations: list[Path], source: str) -> Grouper:
    """The caption rows grouped by clip; malformed rows as skips."""
    groups = Grouper()
    for path in annotations:
        for line, row in iter_csv(path, COLUMNS):
            where = f"{path}:{line}"
            if isinstance(row, str):
                groups.skip(bad(where, "", "bad_entry", f"malformed CSV row: {row}", source))
                continue
            yt, caption = row["youtube_id"].strip(), row["caption"].strip()
            try:
                key_id = make_key(yt)
                start = _number(row["start_time"].strip())
            except ValueError as e:
                groups.skip(bad(where, "", "bad_entry", f"youtube_id / start_time: {e}", source))
                continue
            key = f"{key_id}_{make_key(str(start))}"
            if not caption:
                groups.skip(bad(where, key, "bad_entry", "empty caption", source))
                continue
            groups.add((yt, start), where, key, (row["audiocap_id"].strip(), caption))
    return groups


def read(annotations: list[Path], options: Options) -> Iterator[Record]:
    root = options.media_root or Path(".")
    source = options.source or "audiocaps"
    for item in rows(annotations, source):
        if isinstance(item, Record):
            yield item
            continue
        yt, start = item.id
        ids = list(dict.fromkeys(i for i, _ in item.entries if i))
        cut_names = [f"{yt}_{start}", *ids]
        alts: list[ClipFile | ClipSpan] = [
            ClipFile(candidates(root, [f"{name}{s}" for s in AUDIO_SUFFIXES])) for name in cut_names
        ]
        long_names = [f"{yt}{s}" for s in (*AUDIO_SUFFIXES, *VIDEO_SUFFIXES)]
        alts.append(ClipSpan(candidates(root, long_names), float(start), float(start) + CLIP_SECONDS))
        meta = {
            "youtube_id": yt,
            "start_time": start,
            "video_id": yt,
            "audiocap_ids": [int(i) if i.isdigit() else i for i in ids],
        }
        captions = {"audio": [c for _, c in item.entries]}
        yield Record(item.where, item.key, audio=tuple(alts), captions=captions, source=source, meta=meta)


FORMAT = Format(
    name="audiocaps",
    help="AudioCaps: CSV audiocap_id,youtube_id,start_time,caption; <youtube_id>.wav (cut to 10 s) or "
    "cut clips under --media-root",
    read=read,
)
