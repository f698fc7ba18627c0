"""What every corpus format shares: the record it yields, its registry entry, and the annotation readers
that keep the line of every entry (JSON documents, JSON lines, CSV).

A format is one module of this package with a module-level ``FORMAT = Format(...)``; its ``read``
function turns (annotation paths, media root, options) into :class:`Record` s in a deterministic
order (the driver's restart counts records). Reading is cheap and runs in the main process; the media
work a record names (probing, remuxing, cutting) runs in the driver's worker processes. Files that
list an item's captions or questions one an entry are grouped with :class:`Grouper` (one record per
item, where its first entry was). Modules whose name starts with ``_`` are helpers, not formats.
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

_KEY_BAD = re.compile(r"[^A-Za-z0-9_\-:+=@,]+")
_WS = re.compile(r"\s*")


class AnnotationError(ValueError):
    """An annotation file that cannot be read at all (not one bad entry): the run stops, naming it."""


@dataclass(frozen=True)
class ClipFile:
    """A media file to store: the first of ``candidates`` that exists."""

    candidates: tuple[str, ...]


@dataclass(frozen=True)
class ClipSpan:
    """A span [start, end) seconds of a long video (the first of ``candidates`` that exists), cut at
    ingestion; ``text`` is the span as the annotation wrote it (for messages)."""

    candidates: tuple[str, ...]
    start: float
    end: float
    text: str = ""


@dataclass(frozen=True)
class TarMember:
    """A member of another tar file (video2dataset output), read by offset in the worker."""

    tar: str
    offset: int
    size: int
    ext: str


AudioRef = ClipFile | ClipSpan | TarMember


@dataclass(frozen=True)
class Record:
    """One sample to build, as the annotation describes it.

    Attributes:
        where: ``FILE:LINE`` of the annotation entry (every report about the record names it).
        key: the sample key (already a valid WebDataset key).
        video: alternatives tried in order (e.g. the clip file, else its span of the long video).
        audio: an audio file or member, when the corpus has separate audio, or alternatives tried in
            order (an already-cut clip file, else its ClipSpan of the long recording, cut to FLAC).
        image: an image file (stored byte for byte once Pillow decodes it).
        media: a file whose kind (image, video or audio) is told by the suffix of the one found
            (classification lists naming bare ids).
        captions: by field; a field may hold a list (the loader draws one per visit).
        source: the json ``source``.
        meta: further json fields (``category``, ``url``, ...).
        expects_audio: a video without sound is worth a note (the corpus describes its audio).
        error: the entry is unusable: the record is skipped with this reason (kind, detail).
    """

    where: str
    key: str
    video: tuple[ClipFile | ClipSpan | TarMember, ...] = ()
    audio: AudioRef | tuple[AudioRef, ...] | None = None
    image: ClipFile | None = None
    media: ClipFile | None = None
    captions: dict[str, str | list[str]] = field(default_factory=dict)
    source: str = ""
    meta: dict[str, Any] = field(default_factory=dict)
    expects_audio: bool = False
    error: tuple[str, str] | None = None


@dataclass(frozen=True)
class Options:
    """What the command line hands a format besides its files."""

    media_root: Path | None = None
    split: str | None = None
    source: str | None = None


@dataclass(frozen=True)
class Format:
    """A registry entry: ``read(annotations, options)`` yields the records of the annotation files."""

    name: str
    help: str  # one line for --help
    read: Callable[[list[Path], Options], Iterator[Record]]
    needs_media_root: bool = True
    needs_annotations: bool = True  # False: --annotations is optional (imagefolder)
    splits: tuple[str, ...] | None = None  # None: the annotation files are per split (no --split)
    upstream: Callable[[list[Path]], dict[str, Any] | None] | None = None  # counts the corpus tool wrote
    # JSON files the driver writes into OUT before the records (name -> content, e.g. classes.json)
    outputs: Callable[[list[Path], Options], dict[str, Any]] | None = None


def bad(where: str, key: str, kind: str, detail: str, source: str = "") -> Record:
    """A record that is skipped with ``(kind, detail)``."""
    return Record(where=where, key=key, source=source, error=(kind, detail))


def make_key(raw: object, strip_suffixes: tuple[str, ...] = ()) -> str:
    """A WebDataset key from an annotation id: a trailing media suffix dropped, every run of characters
    other than letters, digits and ``_-:+=@,`` replaced by ``_`` (``QMi8x8o55Ns.1.mp4`` -> ``QMi8x8o55Ns_1``).

    Raises:
        ValueError: for an id that is not a non-empty string or number.
    """
    if isinstance(raw, bool) or not isinstance(raw, (str, int)) or raw == "":
        raise ValueError(f"id must be a non-empty string, got {raw!r}")
    text = str(raw).strip()
    for s in strip_suffixes:
        if text.lower().endswith(s) and len(text) > len(s):
            text = text[: -len(s)]
            break
    key = _KEY_BAD.sub("_", text)
    if not key.strip("_"):
        raise ValueError(f"id {raw!r} has no usable character")
    return key


def caption_list(value: object, name: str) -> list[str]:
    """A caption field as a list of non-blank strings (a single string is a list of one)."""
    if value is None:
        return []
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"{name} must be a string or a list of strings, got {_short(value)}")
    return [v.strip() for v in value if v.strip()]


def caption_text(value: object, name: str) -> str | None:
    """A single caption string (None when absent or blank)."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise ValueError(f"{name} must be a string, got {_short(value)}")
    return value.strip() or None


def _short(value: object, n: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= n else text[: n - 3] + "..."


def candidates(root: Path, names: list[str]) -> tuple[str, ...]:
    """Absolute paths of ``names`` under ``root``, without duplicates, in order."""
    return tuple(dict.fromkeys(str(root / n) for n in names))


def with_suffixes(name: str, suffixes: tuple[str, ...]) -> list[str]:
    """``name`` itself when it already ends in one of ``suffixes``, then ``name`` + each suffix."""
    return ([name] if name.lower().endswith(suffixes) else []) + [f"{name}{s}" for s in suffixes]


# ----------------------------------------------------------------------------- annotation readers


def iter_jsonl(path: Path) -> Iterator[tuple[int, Any | json.JSONDecodeError]]:
    """``(line, object)`` of a JSON-lines file (blank lines skipped); a line that is not JSON yields
    ``(line, JSONDecodeError)``, so the caller skips that line and goes on."""
    with open(path, encoding="utf-8") as f:
        for lineno, text in enumerate(f, start=1):
            if not text.strip():
                continue
            try:
                yield lineno, json.loads(text)
            except json.JSONDecodeError as e:
                yield lineno, e


class _Cursor:
    """A read buffer over a text file that knows the line (and where it starts) of its position."""

    CHUNK = 1 << 20

    def __init__(self, f: Any, path: Path) -> None:
        self.f, self.path = f, path
        self.buf, self.pos, self.line, self.eof = "", 0, 1, False
        self.base = self.line_start = 0  # file offsets (characters) of buf[0] and of the current line

    def fill(self) -> bool:
        if self.eof:
            return False
        # Grow the read with the unread part: a value longer than a chunk costs O(size), not O(size^2).
        chunk = self.f.read(max(self.CHUNK, len(self.buf) - self.pos))
        if not chunk:
            self.eof = True
            return False
        self.base += self.pos
        self.buf = self.buf[self.pos :] + chunk
        self.pos = 0
        return True

    def advance(self, to: int) -> None:
        n = self.buf.count("\n", self.pos, to)
        if n:
            self.line += n
            self.line_start = self.base + self.buf.rfind("\n", self.pos, to) + 1
        self.pos = to

    def skip_ws(self) -> str:
        """The next non-whitespace character ('' at the end of the file), the position on it."""
        while True:
            self.advance(_WS.match(self.buf, self.pos).end())  # type: ignore[union-attr]
            if self.pos < len(self.buf):
                return self.buf[self.pos]
            if not self.fill():
                return ""

    def error(self, what: str, at: int | None = None) -> AnnotationError:
        at = self.pos if at is None else at
        line = self.line + self.buf.count("\n", self.pos, at)
        nl = self.buf.rfind("\n", self.pos, at)
        col = at - nl if nl >= 0 else self.base + at - self.line_start + 1
        return AnnotationError(f"{self.path}:{line}:{col}: not valid JSON: {what}")

    def value(self) -> Any:
        """Decode the JSON value at the position (reading on while it is cut by the buffer's end)."""
        decoder = json.JSONDecoder()
        while True:
            try:
                obj, end = decoder.raw_decode(self.buf, self.pos)
            except json.JSONDecodeError as e:
                if self.fill():
                    continue
                raise self.error(e.msg, e.pos) from None
            # A number at the buffer's end may continue in the next chunk: decode again with more text.
            if end >= len(self.buf) and not self.eof and self.fill():
                continue
            self.advance(end)
            return obj


def iter_json_array(
    path: Path, member: str | None = None, header: dict[str, Any] | None = None
) -> Iterator[tuple[int, int, Any]]:
    """``(line, index, entry)`` of the entries of a JSON array: the document itself, or its object's
    ``member`` (WavCaps: ``"data"``; the members before it are put in ``header``). Streams the file (an
    entry at a time), so a file of millions of entries is not held in memory; the line is where the
    entry starts. (The stdlib's C decoder does the parsing; this only walks the array, which ijson
    cannot do with line numbers.)

    Raises:
        AnnotationError: naming the file, line and column, when the document is not valid JSON or is
        not shaped so.
    """
    with open(path, encoding="utf-8") as f:
        cur = _Cursor(f, path)
        first = cur.skip_ws()
        if first == "[" and member is None:
            yield from _array_entries(cur)
        elif first == "{" and member is not None:
            cur.advance(cur.pos + 1)
            found = False
            while True:
                ch = cur.skip_ws()
                if ch == "}":
                    break
                if ch == ",":
                    cur.advance(cur.pos + 1)
                    continue
                if ch != '"':
                    raise cur.error("expected a member name")
                name = cur.value()
                if cur.skip_ws() != ":":
                    raise cur.error("expected ':'")
                cur.advance(cur.pos + 1)
                ch = cur.skip_ws()  # raw_decode takes no leading whitespace
                if name == member and ch == "[":
                    found = True
                    yield from _array_entries(cur)
                else:
                    value = cur.value()
                    if header is not None and not found:
                        header[name] = value
            if not found:
                raise AnnotationError(f"{path}: no {member!r} array in the top-level object")
        else:
            want = f"an object with a {member!r} array" if member else "an array"
            raise AnnotationError(f"{path}:{cur.line}: expected {want} at the top level, found {first!r}")


def _array_entries(cur: _Cursor) -> Iterator[tuple[int, int, Any]]:
    cur.advance(cur.pos + 1)  # '['
    index = 0
    while True:
        ch = cur.skip_ws()
        if ch == "]":
            cur.advance(cur.pos + 1)
            return
        if index and ch == ",":
            cur.advance(cur.pos + 1)
            ch = cur.skip_ws()
        elif index:
            raise cur.error("expected ',' or ']' between entries")
        if ch == "":
            raise cur.error("the file ends inside the array")
        line = cur.line
        yield line, index, cur.value()
        index += 1


def csv_header(path: Path, delimiter: str = ",") -> list[str]:
    """The header row of a CSV file (column names stripped).

    Raises:
        AnnotationError: for an empty file.
    """
    with open(path, encoding="utf-8", newline="") as f:
        header = next(csv.reader(f, delimiter=delimiter), None)
    if header is None:
        raise AnnotationError(f"{path}: empty CSV file (no header)")
    return [h.strip() for h in header]


def iter_csv(
    path: Path, required: tuple[str, ...], delimiter: str = ","
) -> Iterator[tuple[int, dict[str, str] | str]]:
    """``(line, row)`` of a CSV file with a header (the line a row starts on; column names stripped);
    a row with the wrong number of fields yields ``(line, message)``. ``delimiter="\\t"`` reads TSV.

    Raises:
        AnnotationError: when the header lacks a ``required`` column.
    """
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.reader(f, delimiter=delimiter)
        try:
            header = [h.strip() for h in next(reader)]
        except StopIteration:
            raise AnnotationError(f"{path}: empty CSV file (no header)") from None
        missing = [c for c in required if c not in header]
        if missing:
            raise AnnotationError(f"{path}:1: CSV header {header} lacks the column(s) {missing}")
        start = reader.line_num + 1
        for row in reader:
            line, start = start, reader.line_num + 1
            if not row or not any(x.strip() for x in row):
                continue
            if len(row) != len(header):
                yield line, f"{len(row)} fields, the header has {len(header)}"
                continue
            yield line, dict(zip(header, row))


def json_entries(
    path: Path, member: str | None = None, header: dict[str, Any] | None = None
) -> Iterator[tuple[str, Any]]:
    """``(FILE:LINE (entry N), entry)`` of a JSON list file (or of its object's ``member`` array, the
    members before it put in ``header``), or ``(FILE:LINE, object)`` of a JSON-lines file (``.jsonl``;
    a bad line gives its JSONDecodeError)."""
    if path.suffix.lower() == ".jsonl":
        for line, obj in iter_jsonl(path):
            yield f"{path}:{line}", obj
    else:
        for line, index, obj in iter_json_array(path, member, header):
            yield f"{path}:{line} (entry {index})", obj


def not_object(where: str, obj: Any, source: str) -> Record | None:
    """The skip of an entry that is not a JSON object (a bad JSON line, a list ...); None for an object."""
    if isinstance(obj, Exception):
        return bad(where, "", "bad_entry", f"not valid JSON ({obj})", source)
    if not isinstance(obj, dict):
        return bad(where, "", "bad_entry", f"expected a JSON object, got {type(obj).__name__}", source)
    return None


# ----------------------------------------------------------------------------- grouping entries


@dataclass
class Group:
    """The entries of one item (a video's questions, a clip's caption rows) that ``id`` names;
    ``where`` is the first entry's."""

    id: Any
    where: str
    key: str
    entries: list[Any] = field(default_factory=list)


class Grouper:
    """Entries grouped by item in the order of first appearance, interleaved with the skips of bad
    entries at their own places: iterating yields each :class:`Group` where its first entry was, and
    each skipped :class:`Record` where it was (a deterministic order whatever the grouping)."""

    def __init__(self) -> None:
        self._order: list[Group | Record] = []
        self._groups: dict[object, Group] = {}

    def add(self, item: object, where: str, key: str, entry: Any) -> Group:
        """Add ``entry`` to the group of ``item`` (made at ``where`` with ``key`` when new)."""
        group = self._groups.get(item)
        if group is None:
            group = self._groups[item] = Group(item, where, key)
            self._order.append(group)
        group.entries.append(entry)
        return group

    def skip(self, record: Record) -> None:
        self._order.append(record)

    def get(self, item: object) -> Group | None:
        return self._groups.get(item)

    def __iter__(self) -> Iterator[Group | Record]:
        return iter(self._order)
