"""Corpus ingestion: a format's records (``mico_ds.data.write.formats``) -> shards, in parallel and
restartable (``tools/make_shards.py --format F``; docs/data.md, "Pretraining corpora", "Downstream
datasets").

* **Work**: each record's media work (probe, remux, cut; ``mico_ds.data.write.clips``) runs in
  ``workers`` processes; results come back in record order (ordered ``imap``), so the shards are the
  same whatever the number of workers. At most ``4 * workers`` records are in flight.
* **Skips**: a record that cannot be used is skipped and named, ``FILE:LINE: key: kind: detail``, in
  ``OUT/skipped.txt`` (the first ones on stderr too); remarks about kept samples (a video without sound,
  a span cut at the video's end) go to ``OUT/notes.txt``. More skips than ``max_skip`` (a count, or a
  fraction of the records) fail the run at its end (:class:`TooManySkipped`); the shards stay.
* **Restart**: ``OUT/ingest.json`` is rewritten (atomically) after every completed shard with the
  number of records those shards consumed, their sizes and the report files' lengths. A rerun with the
  same arguments continues after them: it drops the hidden partial shard and anything written after
  the last state, truncates the reports, and writes the same bytes an uninterrupted run writes.
  Different arguments are refused; ``overwrite`` starts over. A lock on ``OUT/.ingest.lock`` keeps
  two runs out of one directory. (Workers of a killed run exit by themselves: their task and result
  pipes close with it.) A format's own files (``OUT/classes.json``) are written at the start; a
  restart refuses them changed, as the samples written hold indices into them.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import multiprocessing as mp
import os
import signal
import sys
import threading
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from mico_ds.data import schema
from mico_ds.data.write import formats
from mico_ds.data.write.clips import (
    ANY_VIDEO_SUFFIXES,
    IMAGE_SUFFIXES,
    MediaSkip,
    Stored,
    cut_audio,
    cut_clip,
    first_existing,
    store_audio,
    store_image,
    store_video,
)
from mico_ds.data.write.clips import video_member as video_bytes_member
from mico_ds.data.write.formats.common import AudioRef, ClipFile, ClipSpan, Format, Options, Record, TarMember
from mico_ds.data.write.tar import ShardWriter, glob_escape, write_json_atomic

STATE_FILE = "ingest.json"
SKIPPED_FILE = "skipped.txt"
NOTES_FILE = "notes.txt"
LOCK_FILE = ".ingest.lock"
STATE_VERSION = 1
DEFAULT_MAX_SKIP = "0.1"
SHOWN_SKIPS = 10  # skip lines also printed to stderr
EARLY_ABORT = 1000  # records: when every one so far was skipped, the run stops (wrong --media-root ...)
KILL_HOOK = "MICO_TEST_INGEST_KILL"  # test hook: SIGKILL this process after N samples (tests/unit/data)


class IngestError(ValueError):
    """An ingestion that cannot start or go on; the message says what to do."""


class TooManySkipped(IngestError):
    """More records skipped than ``max_skip`` allows (the shards of the kept ones are complete)."""


@dataclass
class Outcome:
    """A record's result, from a worker: members to write, or the reason it is skipped; notes."""

    index: int
    where: str
    key: str
    members: dict[str, bytes] | None = None
    skip: tuple[str, str] | None = None
    notes: list[str] = field(default_factory=list)


# ----------------------------------------------------------------------------- per-record work


def _read_member(m: TarMember) -> bytes:
    with open(m.tar, "rb") as f:
        f.seek(m.offset)
        data = f.read(m.size)
    if len(data) != m.size:
        raise MediaSkip("unreadable", f"member of {m.size} bytes at {m.offset} is cut short ({len(data)})")
    return data


def _looked_for(cands: tuple[str, ...]) -> str:
    """``/r/x.{mp4,webm}`` for candidates that differ in the suffix only, else the list."""
    stems = {os.path.splitext(c)[0] for c in cands}
    if len(stems) == 1 and len(cands) > 1:
        return f"{stems.pop()}.{{{','.join(os.path.splitext(c)[1][1:] for c in cands)}}}"
    return ", ".join(cands)


def _first(
    alts: tuple[ClipFile | ClipSpan | TarMember, ...],
    what: str,
    member: Callable[[TarMember], Stored],
    file: Callable[[Path], Stored],
    span: Callable[[Path, ClipSpan], Stored],
) -> Stored:
    """The first alternative that exists, stored by the function of its kind; else missing_file
    naming every path looked for."""
    missing: list[str] = []
    for alt in alts:
        if isinstance(alt, TarMember):
            return member(alt)
        path = first_existing(alt.candidates)
        if path is None:
            missing.append(_looked_for(alt.candidates))
            continue
        return file(path) if isinstance(alt, ClipFile) else span(path, alt)
    raise MediaSkip("missing_file", f"{what} not found: " + "; nor ".join(missing))


def _video(rec: Record) -> Stored:
    def span(path: Path, alt: ClipSpan) -> Stored:
        stored = cut_clip(path, alt.start, alt.end)
        if len(rec.video) > 1:
            text = alt.text or f"[{alt.start}, {alt.end}]"
            stored.notes.append(f"no clip file: cut from the long video {path.name}, span {text}")
        return stored

    return _first(rec.video, "video", lambda m: video_bytes_member(_read_member(m), m.ext), store_video, span)


def _audio(ref: AudioRef | tuple[AudioRef, ...]) -> Stored:
    return _first(
        ref if isinstance(ref, tuple) else (ref,),
        "audio",
        lambda m: store_audio(_read_member(m), m.ext),
        lambda path: store_audio(path.read_bytes(), path.suffix.lstrip(".")),
        lambda path, alt: cut_audio(path, alt.start, alt.end),
    )


def _found(ref: ClipFile, what: str) -> Path:
    path = first_existing(ref.candidates)
    if path is None:
        raise MediaSkip("missing_file", f"{what} not found: {_looked_for(ref.candidates)}")
    return path


def _media(ref: ClipFile) -> Stored:
    """A file of the kind its suffix tells (image, video, else audio)."""
    path = _found(ref, "media file")
    suffix = path.suffix.lower()
    if suffix in IMAGE_SUFFIXES:
        return store_image(path)
    if suffix in ANY_VIDEO_SUFFIXES:
        return store_video(path)
    return store_audio(path.read_bytes(), suffix.lstrip("."))


def build(item: tuple[int, Record]) -> Outcome:
    """The members of one record (runs in the worker processes); never raises for bad media."""
    index, rec = item
    out = Outcome(index, rec.where, rec.key)
    if rec.error is not None:
        out.skip = rec.error
        return out
    members: dict[str, bytes] = {}
    try:
        has_audio = False
        parts: list[Stored] = []
        if rec.image is not None:
            parts.append(store_image(_found(rec.image, "image")))
        if rec.media is not None:
            parts.append(_media(rec.media))
        if rec.video:
            parts.append(_video(rec))
        if rec.audio is not None:
            parts.append(_audio(rec.audio))
        for part in parts:
            members[part.ext] = part.data
            has_audio = has_audio or part.has_audio
            out.notes += part.notes
        if rec.expects_audio and not has_audio:
            out.notes.append("no audio stream: kept as a video-only sample")
    except MediaSkip as e:
        out.skip = (e.kind, str(e))
        return out
    except Exception as e:  # noqa: BLE001 - decoders raise many types; all mean "this media is unreadable"
        out.skip = ("unreadable", f"{type(e).__name__}: {e}")
        return out
    meta: dict[str, Any] = {"captions": rec.captions, "source": rec.source, **rec.meta}
    members[schema.JSON_EXT] = json.dumps(meta, ensure_ascii=False, sort_keys=True).encode()
    out.members = members
    return out


# ----------------------------------------------------------------------------- the driver


class _Writer(ShardWriter):
    """ShardWriter that calls ``on_shard`` after each completed shard and can drop its partial shard
    without removing the completed ones (a stopped run keeps them for the restart)."""

    on_shard = staticmethod(lambda: None)

    def _finish(self) -> None:
        had = self._tar is not None
        super()._finish()
        if had:
            self.on_shard()

    def discard(self) -> None:
        if self._tar is not None:
            self._tar.close()
        if self._tmp is not None:
            self._tmp.unlink(missing_ok=True)
        self._tar = self._tmp = None


def parse_max_skip(text: str | int | float) -> float | int:
    """``"100"`` -> 100 records; ``"0.05"`` -> 5% of the records (values written with a '.')."""
    s = str(text).strip()
    try:
        value: float | int = float(s) if "." in s else int(s)
    except ValueError:
        raise IngestError(f"--max-skip must be a count (100) or a fraction (0.05), got {text!r}") from None
    if value < 0 or (isinstance(value, float) and value > 1):
        raise IngestError(f"--max-skip must be a count >= 0 or a fraction in [0, 1], got {text!r}")
    return value


def _fingerprint(fmt: str, annotations: list[Path], media_root: Path | None, **kw: Any) -> dict[str, Any]:
    """What decides the shards' bytes (the media files themselves are not fingerprinted)."""
    files = [p.resolve() for p in annotations]
    return {
        "format": fmt,
        "annotations": [str(p) for p in files],
        "annotation_bytes": [p.stat().st_size if p.is_file() else None for p in files],
        "media_root": str(media_root.resolve()) if media_root is not None else None,
        **kw,
    }


def _changed(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    keys = sorted(set(old) | set(new))
    return [f"{k}: was {old.get(k)!r}, now {new.get(k)!r}" for k in keys if old.get(k) != new.get(k)]


def _shards_in(out: Path, prefix: str) -> list[Path]:
    return sorted(out.glob(f"{glob_escape(prefix)}-[0-9][0-9][0-9][0-9][0-9][0-9].tar"))


def _lock(out: Path) -> Any:
    f = open(out / LOCK_FILE, "w")  # noqa: SIM115 - held for the whole run
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        raise IngestError(f"another make_shards run is writing {out} (it holds {out / LOCK_FILE})") from None
    return f


def _gated(items: Iterable[Any], permits: threading.Semaphore, stop: threading.Event) -> Iterator[Any]:
    """``items``, each only after a permit is taken (the consumer gives one back per result)."""
    for item in items:
        while not permits.acquire(timeout=0.2):
            if stop.is_set():
                return
        if stop.is_set():
            return
        yield item


def _results(items: Iterator[tuple[int, Record]], workers: int, stop: threading.Event) -> Iterator[Outcome]:
    if workers <= 1:
        yield from map(build, items)
        return
    permits = threading.Semaphore(4 * workers)
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload([__name__, "av", "numpy"])  # imported once, not in every worker
    with ctx.Pool(workers) as pool:
        try:
            for outcome in pool.imap(build, _gated(items, permits, stop), chunksize=1):
                permits.release()
                yield outcome
        finally:
            stop.set()


def ingest(
    fmt: str,
    annotations: list[str | Path],
    out_dir: str | Path,
    *,
    media_root: str | Path | None = None,
    split: str | None = None,
    source: str | None = None,
    prefix: str | None = None,
    samples_per_shard: int = 1000,
    max_shard_bytes: int | None = None,
    workers: int | None = None,
    max_skip: str | int | float = DEFAULT_MAX_SKIP,
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Write the shards of a corpus in format ``fmt`` (see module docstring).

    Returns:
        {"sizes", "num_samples", "records", "skipped", "skip_kinds", "notes", "resumed_at", "upstream",
        "complete_before"} (``resumed_at``: records a previous run had consumed).

    Raises:
        IngestError: bad arguments, changed arguments on a restart, an unreadable annotation file;
        TooManySkipped after a complete run with more skips than ``max_skip``.
    """
    from mico_ds.data.write.formats.common import AnnotationError

    spec = formats.get(fmt)
    paths = [Path(p) for p in annotations]
    if not paths and spec.needs_annotations:
        raise IngestError(f"--format {fmt} needs --annotations FILE [FILE ...]")
    for p in paths:
        if not p.exists():
            raise IngestError(f"annotation file {p} not found")
    root = Path(media_root) if media_root is not None else None
    if spec.needs_media_root and root is None:
        raise IngestError(f"--format {fmt} needs --media-root (where the media files are)")
    if root is not None and not root.is_dir():
        raise IngestError(f"--media-root {root} is not a directory")
    if split is not None and (spec.splits is None or split not in spec.splits):
        allowed = f"one of {list(spec.splits)}" if spec.splits else "none: its annotation files are per split"
        raise IngestError(f"--split {split!r} for --format {fmt}: {allowed}")
    limit = parse_max_skip(max_skip)
    prefix = prefix or fmt
    workers = (os.cpu_count() or 1) if workers is None else workers
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    lock = _lock(out)
    try:
        args = _fingerprint(fmt, paths, root, split=split, source=source, prefix=prefix,
                            samples_per_shard=samples_per_shard, max_shard_bytes=max_shard_bytes)  # fmt: skip
        state = _prepare(out, prefix, args, overwrite)
        if state.get("complete"):
            return _finish_report(out, state, limit, complete_before=True)
        job = _Job(spec, paths, Options(root, split, source), out, prefix, samples_per_shard, max_shard_bytes,
                   workers, progress, limit)  # fmt: skip
        try:
            return job.run(state)
        except AnnotationError as e:
            raise IngestError(str(e)) from None
    finally:
        lock.close()


def _listed_shards(state_path: Path) -> list[Path]:
    """The shards an earlier run's state lists (an --overwrite with another --prefix removes them too)."""
    try:
        names = list(json.loads(state_path.read_text()).get("shards", {}))
    except (OSError, ValueError, AttributeError):
        return []
    return [
        state_path.parent / n for n in names if isinstance(n, str) and "/" not in n and n.endswith(".tar")
    ]


def _prepare(out: Path, prefix: str, args: dict[str, Any], overwrite: bool) -> dict[str, Any]:
    """The state to continue from (a fresh one when there is none or ``overwrite``); cleans ``out``."""
    state_path = out / STATE_FILE
    shards = _shards_in(out, prefix)
    state: dict[str, Any] | None = None
    if state_path.exists() and not overwrite:
        try:
            state = json.loads(state_path.read_text())
        except json.JSONDecodeError as e:
            raise IngestError(
                f"{state_path} is not valid JSON ({e}); pass --overwrite to start anew"
            ) from None
        if state.get("format_version") != STATE_VERSION:
            raise IngestError(f"{state_path} was written by another version; pass --overwrite to start over")
        diff = _changed(state["args"], args)
        if diff:
            raise IngestError(
                f"{out} holds an ingestion run with other arguments ({'; '.join(diff)}): rerun with the "
                "same arguments to continue it, or pass --overwrite to start over"
            )
        for name in state["shards"]:
            if not (out / name).is_file():
                raise IngestError(f"shard {name} of {state_path} is missing; pass --overwrite to start over")
        keep = set(state["shards"])
        for p in shards:  # completed after the last state was written: rewritten the same way
            if p.name not in keep:
                p.unlink()
    elif shards and not overwrite:
        raise IngestError(
            f"{out} already holds {len(shards)} shard(s) named {prefix}-*.tar (e.g. {shards[0].name}) and no "
            f"{STATE_FILE} of an ingestion run; pass --overwrite or another --prefix / --out"
        )
    if state is None:
        for p in [*shards, *_listed_shards(state_path), out / schema.SIZES_FILE, state_path,
                  out / SKIPPED_FILE, out / NOTES_FILE]:  # fmt: skip
            p.unlink(missing_ok=True)
        state = {"format_version": STATE_VERSION, "args": args, "consumed": 0, "shards": {}, "skipped": 0,
                 "skip_kinds": {}, "notes": 0, "reports": {SKIPPED_FILE: 0, NOTES_FILE: 0},
                 "complete": False}  # fmt: skip
    partial = (f".{glob_escape(prefix)}-*.tar.tmp*", f".{schema.SIZES_FILE}.tmp*", f".{STATE_FILE}.tmp*")
    for pattern in partial:
        for p in out.glob(pattern):  # a stopped run's partial files
            p.unlink(missing_ok=True)
    for name, size in state["reports"].items():
        path = out / name
        with open(path, "a+b") as f:
            f.truncate(size)
    return state


@dataclass
class _Job:
    """One ingestion run's settings (see :func:`ingest`)."""

    spec: Format
    paths: list[Path]
    options: Options
    out: Path
    prefix: str
    samples_per_shard: int
    max_shard_bytes: int | None
    workers: int
    progress: bool
    limit: float | int

    def run(self, state: dict[str, Any]) -> dict[str, Any]:
        """Continue from ``state`` (fresh or a stopped run's) to the end; see the module docstring."""
        from tqdm import tqdm

        spec, out = self.spec, self.out
        start = int(state["consumed"])
        state["upstream"] = spec.upstream(self.paths) if spec.upstream is not None else None
        self._write_outputs(state, start)
        kinds = Counter(state["skip_kinds"])
        counts = {"skipped": int(state["skipped"]), "notes": int(state["notes"]), "written": 0}
        seen: set[str] = set()

        def numbered() -> Iterator[tuple[int, Record]]:
            for i, rec in enumerate(spec.read(self.paths, self.options)):
                if rec.error is None:  # the first record of a key claims it (decided here, in order)
                    if rec.key in seen:
                        why = f"key {rec.key!r} is used by an earlier record"
                        rec = replace(rec, error=("duplicate_key", why))
                    else:
                        seen.add(rec.key)
                if i >= start:
                    yield i, rec

        skipped_f = open(out / SKIPPED_FILE, "ab")  # noqa: SIM115 - closed below
        notes_f = open(out / NOTES_FILE, "ab")  # noqa: SIM115
        writer = _Writer(out, self.prefix, self.samples_per_shard, self.max_shard_bytes)
        writer.sizes = dict(state["shards"])
        cursor = start  # records before it are written or reported

        def save(complete: bool = False) -> None:
            for f in (skipped_f, notes_f):
                f.flush()
                os.fsync(f.fileno())
            state.update(consumed=cursor, shards=dict(writer.sizes), skipped=counts["skipped"],
                         skip_kinds=dict(kinds), notes=counts["notes"], complete=complete,
                         reports={SKIPPED_FILE: skipped_f.tell(), NOTES_FILE: notes_f.tell()})  # fmt: skip
            write_json_atomic(out / STATE_FILE, state)

        writer.on_shard = save
        kill_after = int(os.environ.get(KILL_HOOK, "0") or 0)
        stop = threading.Event()
        bar = tqdm(desc=f"{spec.name} -> {out}", unit="record", initial=start, disable=not self.progress,
                   file=sys.stderr, dynamic_ncols=True)  # fmt: skip
        if start:
            done = f"continuing after {start} records ({len(writer.sizes)} complete shards)"
            bar.write(done, file=sys.stderr)
        try:
            for res in _results(numbered(), self.workers, stop):
                cursor = res.index
                if res.members is not None:
                    writer.write(res.key, res.members)  # may complete a shard: save() before this record
                    counts["written"] += 1
                    if kill_after and counts["written"] == kill_after:
                        os.kill(os.getpid(), signal.SIGKILL)
                else:
                    kind, detail = res.skip or ("unknown", "")
                    line = f"{res.where}: {res.key or '-'}: {kind}: {detail}"
                    skipped_f.write((line + "\n").encode())
                    kinds[kind] += 1
                    counts["skipped"] += 1
                    if counts["skipped"] <= SHOWN_SKIPS:
                        bar.write(f"skipped {line}", file=sys.stderr)
                for note in res.notes:
                    notes_f.write(f"{res.where}: {res.key}: {note}\n".encode())
                    counts["notes"] += 1
                cursor = res.index + 1
                bar.update(1)
                if counts["skipped"] and counts["skipped"] % 100 == 0:
                    bar.set_postfix(skipped=counts["skipped"], refresh=False)
                if cursor - start >= EARLY_ABORT and not writer.sizes and counts["written"] == 0:
                    raise IngestError(
                        f"the first {cursor} records were all skipped ({dict(kinds)}); see "
                        f"{out / SKIPPED_FILE}. Is --media-root right?"
                    )
            if cursor == 0:
                where = ", ".join(map(str, self.paths)) or str(self.options.media_root)
                raise IngestError(f"no records in {where}")
            writer.close()  # the last shard (save()), then sizes.json
            save(complete=True)
        except BaseException:
            stop.set()
            writer.discard()
            raise
        finally:
            bar.close()
            skipped_f.close()
            notes_f.close()
        return _finish_report(out, state, self.limit, complete_before=False, resumed_at=start)

    def _write_outputs(self, state: dict[str, Any], start: int) -> None:
        """The format's own files of OUT (classes.json); a restart must find them unchanged, as the
        samples already written depend on them (label indices)."""
        if self.spec.outputs is None:
            return
        files = self.spec.outputs(self.paths, self.options)
        digests = {
            n: hashlib.sha256(json.dumps(c, sort_keys=True).encode()).hexdigest() for n, c in files.items()
        }
        if start and state.get("outputs") != digests:
            raise IngestError(
                f"{', '.join(files)} of {self.out} would differ from the stopped run's (the media or "
                "annotations changed): pass --overwrite to start over"
            )
        state["outputs"] = digests
        for name, content in files.items():
            write_json_atomic(self.out / name, content)


def _finish_report(
    out: Path, state: dict[str, Any], limit: float | int, complete_before: bool, resumed_at: int = 0
) -> dict[str, Any]:
    records, skipped = int(state["consumed"]), int(state["skipped"])
    result = {
        "sizes": dict(state["shards"]),
        "num_samples": sum(state["shards"].values()),
        "records": records,
        "skipped": skipped,
        "skip_kinds": dict(state["skip_kinds"]),
        "notes": int(state["notes"]),
        "upstream": state.get("upstream"),
        "resumed_at": resumed_at,
        "complete_before": complete_before,
        "report": {"skipped": str(out / SKIPPED_FILE), "notes": str(out / NOTES_FILE)},
    }
    allowed = limit * records if isinstance(limit, float) else limit
    if skipped > allowed:
        share = f"{skipped / max(records, 1):.1%}"
        raise TooManySkipped(
            f"{skipped} of {records} records skipped ({share}; {dict(state['skip_kinds'])}), more than "
            f"--max-skip {limit}: see {out / SKIPPED_FILE}. The {result['num_samples']} samples kept are in "
            f"{len(result['sizes'])} complete shard(s); rerun with a larger --max-skip to accept them"
        )
    if not result["num_samples"]:
        raise IngestError(f"every one of the {records} records was skipped; see {out / SKIPPED_FILE}")
    return result
