"""What every corpus format shares: the record it yields, its registry entry, and the annotation readers
that keep the line of every entry (JSON documents, JSON lines, CSV).

A format is one module of this package with a module-level ``FORMAT = Format(...)``; its ``read``
function turns (annotation paths, media root, options) into :class:`Record` s in a deterministic
order (the driver's restart counts records). Reading is cheap and runs in the main process; the media
work a record names (probing, remuxing, cutting) runs in the driver's worker processes.
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


@dataclass(frozen=True)
class Record:
    """One sample to build, as the annotation describes it.

    Attributes:
        where: ``FILE:LINE`` of the annotation entry (every report about the record names it).
        key: the sample key (already a valid WebDataset key).
        video: alternatives tried in order (e.g. the clip file, else its span of the long video).
        audio: an audio file or member, when the corpus has separate audio.
        captions: by field; a field may hold a list (the loader draws one per visit).
        source: the json ``source``.
        meta: further json fields (``category``, ``url``, ...).
        expects_audio: a video without sound is worth a note (the corpus describes its audio).
        error: the entry is unusable: the record is skipped with this reason (kind, detail).
    """

    where: str
    key: str
    video: tuple[ClipFile | ClipSpan | TarMember, ...] = ()
    audio: ClipFile | TarMember | None = None
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
    splits: tuple[str, ...] | None = None  # None: the annotation files are per split (no --split)
    upstream: Callable[[list[Path]], dict[str, Any] | None] | None = None  # counts the corpus tool wrote


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


def iter_csv(path: Path, required: tuple[str, ...]) -> Iterator[tuple[int, dict[str, str] | str]]:
    """``(line, row)`` of a CSV file with a header (the line a row starts on); a row with the wrong
    number of fields yields ``(line, message)``.

    Raises:
        AnnotationError: when the header lacks a ``required`` column.
    """
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.reader(f)
        try:
            header = next(reader)
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
