"""Checkpoint manifests: every file of a checkpoint with its size and CRC-32, recorded while it is
written, and checked before the checkpoint is used (resume, ``tools/zero_to_fp32.py``,
``tools/to_universal.py``).

``<tag>/mico_manifest.json``, written by rank 0 in the commit step, before ``client/meta.json``::

    {"format": 1, "algorithm": "crc32", "tag": "step00000004",
     "files": {"client/meta.json": {"size": 4978, "crc32": "1c2d3e4f", "rank": 0},
               "zero_pp_rank_1_mp_rank_00_optim_states.pt": {"size": 643903, "crc32": "...", "rank": 1},
               ...},
     "digest": "<CRC-32 of the canonical JSON of files>"}

Paths are relative to the tag directory; ``rank`` is the rank that wrote the file. ``client/meta.json``
is listed although it is written after the manifest: rank 0 serializes it first and hashes the bytes.
``digest`` makes a damaged manifest itself detectable.

Why CRC-32 (``zlib.crc32``): it is in the standard library, the fastest checksum available here
(measured on this project's 2-core CI machine, GiB/s: crc32 2.2, adler32 1.6, sha256 1.1, blake2b 0.9,
md5 0.7), and it finds what a bad disk or a partial copy does: every burst of up to 32 flipped bits and
any change of size. It is not a defence against tampering (``safe_load`` refuses pickles that could
run code).

What verification reports: a listed file that is missing, has another size (truncated, or appended
to), or another checksum (bit flips, overwritten). A file in the directory the manifest does not list is
not an error (notes, converter outputs); :func:`unlisted` names them. A checkpoint without a manifest
(written before mico_ds recorded one, or by DeepSpeed directly) is loaded unverified.

``python -m mico_ds.checkpoint RUN_DIR [--tag TAG]`` checks one checkpoint by hand.
"""

from __future__ import annotations

import contextlib
import json
import os
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from mico_ds.checkpoint.layout import MANIFEST_FILE

FORMAT = 1
ALGORITHM = "crc32"
CHUNK = 8 << 20  # read size when verifying: large enough that the checksum, not the syscalls, dominates


class ManifestError(ValueError):
    """A manifest that cannot be read, or whose own digest does not match."""


def crc_hex(crc: int) -> str:
    return f"{crc & 0xFFFFFFFF:08x}"


class HashingWriter:
    """A write-only file for ``torch.save``: writes ``path`` and keeps its size and CRC-32 as it goes.

    An ``OSError`` from the file system (a full disk, a quota, an I/O error) does not propagate: the
    writer remembers it, closes and removes the partial file, and from then on only counts, so that
    ``torch.save`` finishes and ``size`` is what the file would have taken. ``torch.save`` needs
    nothing but ``write`` and ``flush`` (checked for both of its formats: it never seeks or reads).
    """

    def __init__(self, path: str | Path, *, discard: bool = False) -> None:
        self.path = Path(path)
        self.size = 0
        self.crc = 0
        self.written = 0  # bytes that reached the file before an error
        self.error: OSError | None = None
        self._f = None
        if not discard:
            try:
                self._f = open(self.path, "wb")  # noqa: SIM115 -- closed in close()
            except OSError as e:
                self.error = e

    def write(self, data: Any) -> int:
        n = memoryview(data).nbytes
        self.size += n
        if self._f is not None:
            self.crc = zlib.crc32(data, self.crc)
            try:
                self._f.write(data)
                self.written += n
            except OSError as e:
                self._fail(e)
        return n

    def flush(self) -> None:
        if self._f is not None:
            try:
                self._f.flush()
            except OSError as e:
                self._fail(e)

    def close(self) -> None:
        """Close the file (a network file system may report a full disk only here)."""
        if self._f is not None:
            f, self._f = self._f, None
            try:
                f.close()
            except OSError as e:
                self._fail(e)

    def _fail(self, e: OSError) -> None:
        self.error = e
        f, self._f = self._f, None
        if f is not None:
            with contextlib.suppress(OSError):  # the first error is the one to report
                f.close()
        self.path.unlink(missing_ok=True)

    def record(self, rank: int) -> dict[str, Any]:
        return {"size": self.size, ALGORITHM: crc_hex(self.crc), "rank": rank}


def checksum_file(path: str | Path) -> tuple[int, int]:
    """``(size, crc32)`` of a file, read in :data:`CHUNK` pieces."""
    crc, size = 0, 0
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            crc = zlib.crc32(view[:n], crc)
            size += n
    return size, crc


def _canonical(files: dict[str, Any]) -> bytes:
    return json.dumps(files, sort_keys=True, separators=(",", ":")).encode()


def build(tag: str, files: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The manifest of checkpoint ``tag`` from ``{relative path: {"size", "crc32", "rank"}}``."""
    files = dict(sorted(files.items()))
    return {
        "format": FORMAT,
        "algorithm": ALGORITHM,
        "tag": tag,
        "files": files,
        "digest": crc_hex(zlib.crc32(_canonical(files))),
    }


def encode(manifest: dict[str, Any]) -> bytes:
    return (json.dumps(manifest, indent=1) + "\n").encode()


def write(tag_dir: str | Path, manifest: dict[str, Any]) -> Path:
    """Write ``tag_dir/mico_manifest.json`` (temporary file, then rename)."""
    out = Path(tag_dir) / MANIFEST_FILE
    tmp = out.with_name(f".{out.name}.tmp")
    try:
        tmp.write_bytes(encode(manifest))
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def read(tag_dir: str | Path) -> dict[str, Any] | None:
    """The manifest of a checkpoint directory; None when it has none.

    Raises:
        ManifestError: unreadable, of an unknown format, or its digest does not match its file list.
    """
    f = Path(tag_dir) / MANIFEST_FILE
    if not f.is_file():
        return None
    try:
        m = json.loads(f.read_bytes())
        files = m["files"]
        ok = m["format"] == FORMAT and m["algorithm"] == ALGORITHM
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise ManifestError(f"{f} is damaged: {type(e).__name__}: {e}") from e
    if not ok:
        raise ManifestError(f"{f}: unknown format {m.get('format')!r} / algorithm {m.get('algorithm')!r}")
    if crc_hex(zlib.crc32(_canonical(files))) != m.get("digest"):
        raise ManifestError(f"{f} is damaged: its digest does not match its list of files")
    return m


def total_size(manifest: dict[str, Any]) -> int:
    return sum(int(r["size"]) for r in manifest["files"].values())


@dataclass(frozen=True, order=True)
class Problem:
    """One thing wrong with a checkpoint: ``file`` (relative to the tag dir), ``kind`` and details."""

    file: str
    kind: Literal["missing", "size", "checksum", "manifest", "incomplete"]
    detail: str = ""

    def __str__(self) -> str:
        what = {
            "missing": "missing",
            "size": "wrong size",
            "checksum": "checksum mismatch",
            "manifest": "damaged manifest",
            "incomplete": "incomplete checkpoint",
        }[self.kind]
        return f"{self.file}: {what}" + (f" ({self.detail})" if self.detail else "")


def shares(manifest: dict[str, Any], world: int) -> list[list[str]]:
    """Split the listed files over ``world`` verifiers, balanced by bytes (largest first, each to the
    least loaded); the same on every rank, as it depends only on the manifest."""
    load = [0] * world
    out: list[list[str]] = [[] for _ in range(world)]
    items = sorted(manifest["files"].items(), key=lambda kv: (-int(kv[1]["size"]), kv[0]))
    for name, rec in items:
        r = min(range(world), key=lambda i: (load[i], i))
        out[r].append(name)
        load[r] += int(rec["size"])
    return out


def verify_files(
    tag_dir: str | Path, manifest: dict[str, Any], names: Iterable[str], checksums: bool = True
) -> list[Problem]:
    """Check ``names`` (listed in ``manifest``) under ``tag_dir``: existence, size, and the CRC-32."""
    tag_dir = Path(tag_dir)
    problems = []
    for name in names:
        rec = manifest["files"][name]
        f = tag_dir / name
        try:
            size = f.stat().st_size
        except OSError:
            problems.append(Problem(name, "missing", f"written by rank {rec.get('rank', '?')}"))
            continue
        if size != int(rec["size"]):
            problems.append(Problem(name, "size", f"{size} bytes, the manifest records {rec['size']}"))
            continue
        if checksums:
            _, crc = checksum_file(f)
            if crc_hex(crc) != rec[ALGORITHM]:
                problems.append(
                    Problem(name, "checksum", f"CRC-32 {crc_hex(crc)}, the manifest records {rec[ALGORITHM]}")
                )
    return problems


def verify(
    tag_dir: str | Path, manifest: dict[str, Any], *, rank: int = 0, world: int = 1, checksums: bool = True
) -> list[Problem]:
    """This verifier's share (:func:`shares`) of the checks of :func:`verify_files`."""
    return verify_files(tag_dir, manifest, shares(manifest, world)[rank], checksums)


def unlisted(tag_dir: str | Path, manifest: dict[str, Any]) -> list[str]:
    """Files under ``tag_dir`` the manifest does not list (not errors; the manifest itself excluded)."""
    tag_dir = Path(tag_dir)
    listed = set(manifest["files"]) | {MANIFEST_FILE}
    return sorted(
        rel
        for p in tag_dir.rglob("*")
        if p.is_file() and (rel := p.relative_to(tag_dir).as_posix()) not in listed
    )


def check(tag_dir: str | Path, checksums: bool = True) -> tuple[dict[str, Any] | None, list[Problem]]:
    """Verify a whole checkpoint in this process: ``(manifest or None, problems)``."""
    try:
        m = read(tag_dir)
    except ManifestError as e:
        return None, [Problem(MANIFEST_FILE, "manifest", str(e))]
    if m is None:
        return None, []
    return m, verify_files(tag_dir, m, m["files"], checksums)


def require_intact(tag_dir: str | Path, checksums: bool = True, skip_flag: str | None = "--no-verify") -> str:
    """:func:`check`, raising ``ValueError`` naming every problem; returns a line saying what was checked.

    For the tools that read a checkpoint in one process (``tools/zero_to_fp32.py``,
    ``tools/to_universal.py``); ``skip_flag`` is their option that skips the check.
    """
    m, problems = check(tag_dir, checksums)
    if problems:
        hint = f" (pass {skip_flag} to read it anyway)" if skip_flag else ""
        raise ValueError(f"{tag_dir} is damaged: " + "; ".join(map(str, problems)) + hint)
    if m is None:
        return f"{tag_dir} has no {MANIFEST_FILE} (written by an older mico_ds or by DeepSpeed): not verified"
    what = "sizes and CRC-32 checksums" if checksums else "sizes"
    return f"verified {len(m['files'])} files of {tag_dir} ({what}, {total_size(m) / 2**20:.1f} MiB)"
