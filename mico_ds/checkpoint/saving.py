"""The write side of a save: what one rank writes, with sizes and checksums, and what happens when the
file system refuses (a full disk, a quota, an I/O error).

Every file a rank writes in a save goes through :class:`~mico_ds.checkpoint.manifest.HashingWriter`:
DeepSpeed's (its checkpoint engine's ``save(state_dict, path)`` is pointed at :meth:`RankWrites.save_torch`
for the save) and mico_ds' client file. A write that fails does not raise on that rank: DeepSpeed's
save has collectives between its files, and a rank leaving it early would leave the others waiting.
The rank remembers the error, removes the partial file, and serializes what is left only to count its
bytes, so that the space the checkpoint needs is known exactly. The manager then has every rank agree
(one collective) before the commit; see :mod:`mico_ds.checkpoint.manager`.

This module imports neither DeepSpeed nor ``torch.distributed``.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from mico_ds.checkpoint import manifest

log = logging.getLogger("mico_ds")

SPACE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
# Scripts DeepSpeed's rank 0 copies into the checkpoints dir at every save (outside any tag dir).
RECOVERY_SCRIPTS = ("zero_to_fp32.py", "zero_to_torch.py")


class CheckpointSaveError(RuntimeError):
    """A save that failed on some rank; raised on every rank, with the same message."""


def fmt_bytes(n: int | None) -> str:
    if n is None:
        return "an unknown amount"
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} bytes"


def free_bytes(path: Path) -> int | None:
    """Bytes free for this user on the file system of ``path`` (None when it cannot be asked)."""
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


def checkpoint_size(tag_dir: Path) -> int:
    """A checkpoint's size: its manifest's total, else the sum of its files' sizes."""
    try:
        m = manifest.read(tag_dir)
    except manifest.ManifestError:
        m = None
    if m is not None:
        return manifest.total_size(m)
    return sum(p.stat().st_size for p in Path(tag_dir).rglob("*") if p.is_file())


def describe_error(e: OSError) -> dict[str, Any]:
    code = e.errno if isinstance(e.errno, int) else None
    return {
        "errno": code,
        "name": errno.errorcode.get(code, "") if code is not None else "",
        "strerror": e.strerror or str(e),
        "space": code in SPACE_ERRNOS,
    }


class RankWrites:
    """The files one rank writes in one save (relative path -> size, CRC-32), and its first error."""

    def __init__(self, tag_dir: Path, rank: int) -> None:
        self.tag_dir, self.rank = Path(tag_dir), rank
        self.files: dict[str, dict[str, Any]] = {}
        self.paths: list[Path] = []  # written here, removed again if the save is abandoned
        self.size = 0  # what this rank's part takes (files not written because of an error included)
        self.written = 0
        self.error: dict[str, Any] | None = None

    def _rel(self, path: Path) -> str:
        rel = os.path.relpath(path, self.tag_dir)
        if rel.startswith(".."):
            raise ValueError(f"{path} is outside the checkpoint {self.tag_dir}")
        return Path(rel).as_posix()

    def _fail(self, path: Path, e: OSError, written: int) -> None:
        if self.error is None:
            self.error = {
                "rank": self.rank,
                "host": socket.gethostname(),
                "file": str(path),
                "written": written,
                **describe_error(e),
            }

    def save_torch(self, obj: Any, path: str | Path, *, zipfile: bool = True, atomic: bool = False) -> None:
        """``torch.save(obj, path)`` through a :class:`HashingWriter`; after an error only counted.

        ``atomic``: write ``.NAME.tmp`` and rename (a reader never sees half a file under the name).
        """
        path = Path(path)
        target = path.with_name(f".{path.name}.tmp") if atomic else path
        discard = self.error is not None
        if not discard:
            try:
                target.parent.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                self._fail(path, e, 0)
                discard = True
        w = manifest.HashingWriter(target, discard=discard)
        torch.save(obj, w, _use_new_zipfile_serialization=zipfile)
        w.close()
        self.size += w.size
        if discard:
            return
        if w.error is None and atomic:
            try:
                os.replace(target, path)
            except OSError as e:
                target.unlink(missing_ok=True)
                w.error = e
        if w.error is not None:
            self._fail(path, w.error, w.written)
            return
        self.written += w.size
        self.files[self._rel(path)] = w.record(self.rank)
        self.paths.append(path)

    def save_with(self, save: Callable[[Any, str], None], obj: Any, path: str | Path) -> None:
        """A checkpoint engine other than DeepSpeed's torch one: its own ``save``, then a read-back for
        the checksum (it gives us no bytes to hash)."""
        path = Path(path)
        if self.error is not None:
            return  # its size cannot be counted without writing it
        try:
            save(obj, str(path))
            size, crc = manifest.checksum_file(path)
        except OSError as e:
            path.unlink(missing_ok=True)
            self._fail(path, e, 0)
            return
        self.size += size
        self.written += size
        self.files[self._rel(path)] = {
            "size": size,
            manifest.ALGORITHM: manifest.crc_hex(crc),
            "rank": self.rank,
        }
        self.paths.append(path)

    def expect(self, n: int) -> None:
        """Count ``n`` more bytes this rank will write in the commit step (rank 0's ``meta.json``)."""
        self.size += n

    @contextlib.contextmanager
    def hooked(self, engine: Any) -> Iterator[None]:
        """Route ``engine.save_checkpoint``'s file writes through this object for the block."""
        ce = engine.checkpoint_engine
        native = type(ce).__name__ == "TorchCheckpointEngine"  # its save is one torch.save(sd, path)
        original = ce.save

        def save(state_dict: Any, path: str) -> None:
            if native:
                self.save_torch(state_dict, path, zipfile=getattr(ce, "zipfile_serialization", True))
            else:
                self.save_with(original, state_dict, path)

        copy = getattr(engine, "_copy_recovery_script", None)

        def copy_scripts(save_path: str) -> None:
            # Conveniences beside the checkpoints, not part of one: a failure is a warning. Raising here
            # would leave rank 0 out of DeepSpeed's last barrier while the others wait in it.
            if self.error is not None:
                return
            try:
                copy(save_path)  # type: ignore[misc]
            except OSError as e:
                log.warning("could not copy DeepSpeed's recovery scripts into %s: %s", save_path, e)
                for name in RECOVERY_SCRIPTS:
                    (Path(save_path) / name).unlink(missing_ok=True)

        with (
            _instance_attr(ce, "save", save),
            _instance_attr(engine, "_copy_recovery_script", copy_scripts if copy is not None else None),
        ):
            yield

    def part(self) -> dict[str, Any]:
        """What the other ranks and the commit need to know of this rank's writes."""
        return {
            "rank": self.rank,
            "files": self.files,
            "size": self.size,
            "written": self.written,
            "error": self.error,
        }

    def remove_written(self) -> None:
        for p in self.paths:
            p.unlink(missing_ok=True)


@contextlib.contextmanager
def _instance_attr(obj: Any, name: str, value: Any) -> Iterator[None]:
    """Set ``obj.name = value`` for the block (nothing when ``value`` is None), then restore it."""
    if value is None:
        yield
        return
    had, before = name in vars(obj), vars(obj).get(name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        if had:
            setattr(obj, name, before)
        else:
            vars(obj).pop(name, None)


def _what(err: dict[str, Any]) -> str:
    kind = "disk quota exceeded" if err["errno"] == errno.EDQUOT else "disk full"
    head = f"{kind}: " if err["space"] else ""
    code = f"[Errno {err['errno']}] " if err["errno"] is not None else ""
    return f"{head}{code}{err['strerror']}"


def failure_message(
    tag: str,
    ckpt_dir: Path,
    errors: list[dict[str, Any]],
    need: int,
    free: int | None,
    latest: str | None,
) -> str:
    """One line (the failure report of every rank shows the first line) for a save given up."""
    first = errors[0]
    others = f" (and on {len(errors) - 1} other rank(s))" if len(errors) > 1 else ""
    kept = f"`latest` still names {latest}" if latest else "no checkpoint had been committed before"
    msg = (
        f"checkpoint {tag} could not be saved in {ckpt_dir}: {_what(first)}, on rank {first['rank']} "
        f"({first['host']}) writing {first['file']} (after {fmt_bytes(first['written'])} of it){others}; "
        f"the partial {tag} was removed and {kept}"
    )
    if any(e["space"] for e in errors):
        short = need - (free or 0)
        msg += (
            f". The checkpoint needs {fmt_bytes(need)} ({need} bytes), {fmt_bytes(free)} is free there: "
            + (
                f"free at least {fmt_bytes(short)} more (or move the run dir), then --resume latest"
                if short > 0
                else "enough now (another writer had filled the disk?): resume with --resume latest"
            )
        )
    else:
        msg += ". Fix the file system, then resume with --resume latest"
    return msg


def short_of_space_message(tag: str, ckpt_dir: Path, prev: str, need: int, free: int) -> str:
    """The up-front check (``checkpoint.check_free_space``) refused a save: nothing was written."""
    return (
        f"checkpoint {tag} would not fit in {ckpt_dir}: disk full: it needs about {fmt_bytes(need)} "
        f"({need} bytes, the size of {prev}) and {fmt_bytes(free)} is free there; nothing was written "
        f"and `latest` still names {prev}. Free at least {fmt_bytes(need - free)} more (or move the run "
        f"dir), then resume with --resume latest (checkpoint.check_free_space=false skips this check)"
    )
