"""video2dataset output (github.com/iejMac/video2dataset), both of its layouts:

* ``webdataset``: ``OUT/00000.tar`` with members ``000000001.mp4`` (and ``.m4a``/``.mp3``/``.wav``/``.flac``
  audio when asked for), ``.txt`` (the caption) and ``.json`` (url, status, ...), next to
  ``00000.parquet`` and ``00000_stats.json``;
* ``files``: ``OUT/00000/000000001.mp4``, ``.txt``, ``.json`` next to ``00000_stats.json``.

``--annotations`` takes output folders (either layout) or single tars. The samples are reshaped into our
member contract: the video kept byte for byte (``mp4``/``webm``), an audio member kept (FLAC/WAV/MP3) or
decoded into FLAC (M4A and other formats the loader does not read), ``json`` with ``captions.vision``
= the txt and the url. video2dataset also writes a sample that failed (json status
``failed_to_download`` / ``failed_to_subsample``, no video): it is skipped with its error message.
The ``*_stats.json`` counts are summed into the run's report.
"""

from __future__ import annotations

import json
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from mico_ds.data.write.formats.common import (
    AnnotationError,
    ClipFile,
    Format,
    Options,
    Record,
    TarMember,
    bad,
    make_key,
)

VIDEO_EXTS = ("mp4", "webm", "mkv", "mov")
AUDIO_EXTS = ("m4a", "mp3", "wav", "flac", "ogg", "opus", "aac")
STATS = ("count", "successes", "failed_to_download", "failed_to_subsample")


def _split(name: str) -> tuple[str, str]:
    """WebDataset's split of a member name: key = up to the first dot of the base name."""
    base = name.rsplit("/", 1)[-1]
    key, _, ext = base.partition(".")
    return key, ext.lower()


def _tar_groups(path: Path) -> Iterator[tuple[str, dict[str, tarfile.TarInfo], tarfile.TarFile]]:
    with tarfile.open(path, "r:") as tar:
        key, group = None, {}
        for info in tar:
            if not info.isfile():
                continue
            k, ext = _split(info.name)
            if key is not None and k != key:
                yield key, group, tar
                group = {}
            key = k
            group[ext] = info
        if key is not None:
            yield key, group, tar


def _meta_of(raw: bytes | None, where: str) -> dict[str, Any] | str:
    if raw is None:
        return {}
    try:
        meta = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        return f"json member is not valid JSON ({e})"
    return meta if isinstance(meta, dict) else f"json member is a {type(meta).__name__}, not an object"


def _record(
    where: str, key: str, video: Any, audio: Any, txt: bytes | None, meta: Any, source: str
) -> Record:
    if isinstance(meta, str):
        return bad(where, key, "bad_entry", meta, source)
    status = meta.get("status")
    if status not in (None, "success"):
        detail = f"video2dataset status {status!r}: {meta.get('error_message')}"
        return bad(where, key, "upstream_failed", detail, source)
    if video is None and audio is None:
        return bad(where, key, "missing_file", "no video or audio member", source)
    try:
        text = txt.decode("utf-8").strip() if txt is not None else ""
    except UnicodeDecodeError as e:
        return bad(where, key, "bad_entry", f"txt is not UTF-8 ({e})", source)
    extra = {"url": meta["url"]} if isinstance(meta.get("url"), str) else {}
    return Record(
        where, key, (video,) if video is not None else (), audio=audio,
        captions={"vision": text} if text else {}, source=source, meta=extra,
    )  # fmt: skip


def _pick(group: dict[str, Any], exts: tuple[str, ...]) -> tuple[str, Any] | None:
    for ext in exts:
        if ext in group:
            return ext, group[ext]
    return None


def _read_small(tar: tarfile.TarFile, group: dict[str, tarfile.TarInfo], ext: str) -> bytes | None:
    """A caption or metadata member's bytes (None when the sample has none)."""
    f = tar.extractfile(group[ext]) if ext in group else None
    return f.read() if f is not None else None


def _from_tar(path: Path, source: str) -> Iterator[Record]:
    for raw_key, group, tar in _tar_groups(path):
        where = f"{path}[{raw_key}]"
        try:
            key = make_key(raw_key)
        except ValueError as e:
            yield bad(where, "", "bad_entry", str(e), source)
            continue

        def member(hit: tuple[str, tarfile.TarInfo] | None) -> TarMember | None:
            if hit is None:
                return None
            ext, info = hit
            return TarMember(str(path), info.offset_data, info.size, ext)

        txt, meta = _read_small(tar, group, "txt"), _meta_of(_read_small(tar, group, "json"), where)
        video, audio = member(_pick(group, VIDEO_EXTS)), member(_pick(group, AUDIO_EXTS))
        yield _record(where, key, video, audio, txt, meta, source)


def _from_files(folder: Path, source: str) -> Iterator[Record]:
    groups: dict[str, dict[str, Path]] = {}
    for p in sorted(folder.iterdir()):
        if p.is_file() and not p.name.startswith("."):
            k, ext = _split(p.name)
            groups.setdefault(k, {})[ext] = p
    for raw_key, group in groups.items():
        where = str(group.get("json") or next(iter(group.values())))
        try:
            key = make_key(raw_key)
        except ValueError as e:
            yield bad(where, "", "bad_entry", str(e), source)
            continue
        hit_v, hit_a = _pick(group, VIDEO_EXTS), _pick(group, AUDIO_EXTS)
        meta = _meta_of(group["json"].read_bytes() if "json" in group else None, where)
        txt = group["txt"].read_bytes() if "txt" in group else None
        video = ClipFile((str(hit_v[1]),)) if hit_v else None
        audio = ClipFile((str(hit_a[1]),)) if hit_a else None
        yield _record(where, key, video, audio, txt, meta, source)


def layout(path: Path) -> tuple[str, list[Path]]:
    """("webdataset", tars) or ("files", shard folders) of an output folder or tar file."""
    if path.is_file() and path.suffix == ".tar":
        return "webdataset", [path]
    if not path.is_dir():
        raise AnnotationError(f"{path}: not a video2dataset output folder or .tar file")
    tars = sorted(path.glob("*.tar"))
    if tars:
        return "webdataset", tars
    folders = sorted(p for p in path.iterdir() if p.is_dir() and p.name.isdigit())
    if folders:
        return "files", folders
    raise AnnotationError(f"{path}: no shard tars (00000.tar) nor shard folders (00000/) of video2dataset")


def read(annotations: list[Path], options: Options) -> Iterator[Record]:
    source = options.source or "video2dataset"
    for path in annotations:
        kind, parts = layout(path)
        for part in parts:
            yield from (_from_tar(part, source) if kind == "webdataset" else _from_files(part, source))


def upstream(annotations: list[Path]) -> dict[str, Any] | None:
    """The ``*_stats.json`` counts summed over the output folders (None when there are none)."""
    totals = dict.fromkeys(STATS, 0)
    files = 0
    for path in annotations:
        folder = path if path.is_dir() else path.parent
        names = None if path.is_dir() else {f"{path.stem}_stats.json"}
        for f in sorted(folder.glob("*_stats.json")):
            if names is not None and f.name not in names:
                continue
            try:
                stats = json.loads(f.read_text())
            except (OSError, json.JSONDecodeError):
                continue
            files += 1
            for k in STATS:
                totals[k] += int(stats.get(k, 0) or 0)
    return {"stats_files": files, **totals} if files else None


FORMAT = Format(
    name="video2dataset",
    help="video2dataset output folders (webdataset tars or files layout, with *_stats.json); no --media-root",
    read=read,
    needs_media_root=False,
    upstream=upstream,
)
