"""Writing WebDataset shards: deterministic tar members, atomic files, size limits, ``sizes.json``.

Shard layout (docs/architecture.md, "Data contract"): POSIX tar files ``prefix-000000.tar`` ..., one
sample = consecutive members ``<key>.<ext>`` sharing a key, with ``schema.SIZES_FILE``
(``{"prefix-000000.tar": n_samples}``) next to them. Every file is written to a temporary name and
renamed into place, so a reader never sees a half-written shard. Tar headers carry a fixed
mtime/owner, so equal samples give byte-identical shards.
"""

from __future__ import annotations

import glob
import io
import json
import os
import re
import tarfile
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from mico_ds.data import schema

# Fixed tar header fields: shards depend only on their samples, not on when or by whom they were written.
TAR_MTIME = 946684800  # 2000-01-01T00:00:00Z
_KEY_RE = re.compile(r"^[A-Za-z0-9_\-:+=@,]+$")
SHARD_NAME = "{prefix}-{index:06d}.tar"


def validate_key(key: object, where: str = "") -> str:
    """Return ``key`` if it is usable as a WebDataset key, else raise ValueError.

    WebDataset splits member names at the first dot of the base name, so a key must not contain '.'
    (nor '/', which would create directories inside the tar).
    """
    if not isinstance(key, str) or not _KEY_RE.match(key):
        raise ValueError(
            f"{where}invalid sample key {key!r}: use a non-empty string of letters, digits and _-:+=@, "
            "(no '.', '/' or spaces; WebDataset splits member names at the first dot)"
        )
    return key


def _tarinfo(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = size, TAR_MTIME, 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def add_sample(tar: tarfile.TarFile, key: str, members: dict[str, bytes]) -> int:
    """Append one sample (members ``{ext: bytes}``, written in the given order); returns bytes added."""
    total = 0
    for ext, data in members.items():
        tar.addfile(_tarinfo(f"{key}.{ext}", len(data)), io.BytesIO(data))
        total += 512 + -(-len(data) // 512) * 512  # header + data padded to the 512-byte block
    return total


def _temp_path(path: Path) -> Path:
    """A hidden sibling name unique to this process and thread (plain open(): permissions follow umask)."""
    return path.with_name(f".{path.name}.tmp{os.getpid()}-{threading.get_ident()}")


def write_tar(path: str | Path, samples: Iterable[tuple[str, dict[str, bytes]]]) -> int:
    """Write a whole shard atomically (temporary file, then ``os.replace``); returns the sample count."""
    path = Path(path)
    tmp = _temp_path(path)
    n = 0
    try:
        with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tar:
            for key, members in samples:
                add_sample(tar, key, members)
                n += 1
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return n


def write_json_atomic(path: str | Path, obj: Any) -> None:
    """Write JSON to ``path`` via a temporary file in the same directory and ``os.replace``."""
    path = Path(path)
    tmp = _temp_path(path)
    try:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=1, sort_keys=False)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_sizes(out_dir: str | Path, sizes: dict[str, int]) -> Path:
    """Write ``schema.SIZES_FILE`` ({shard file name: samples}) atomically into ``out_dir``."""
    path = Path(out_dir) / schema.SIZES_FILE
    write_json_atomic(path, dict(sorted(sizes.items())))
    return path


def shard_pattern(prefix: str, num_shards: int) -> str:
    """Brace pattern of ``num_shards`` shards: ``prefix-{000000..000007}.tar`` (or the single name)."""
    if num_shards < 1:
        raise ValueError(f"num_shards must be >= 1, got {num_shards}")
    if num_shards == 1:
        return SHARD_NAME.format(prefix=prefix, index=0)
    return f"{prefix}-{{{0:06d}..{num_shards - 1:06d}}}.tar"


class ShardWriter:
    """Streams samples into ``prefix-000000.tar``, ``prefix-000001.tar``, ... with size limits.

    A shard is closed when it holds ``samples_per_shard`` samples or when the next sample would take it
    past ``max_shard_bytes`` (a single larger sample still gets a shard of its own). Each shard is
    written under a temporary name and renamed when complete; ``close()`` writes ``sizes.json``.
    ``abort()`` removes the temporary file and every shard this writer completed.
    """

    def __init__(
        self,
        out_dir: str | Path,
        prefix: str = "corpus",
        samples_per_shard: int = 1000,
        max_shard_bytes: int | None = None,
    ) -> None:
        if samples_per_shard < 1:
            raise ValueError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
        if max_shard_bytes is not None and max_shard_bytes < 1024:
            raise ValueError(f"max_shard_bytes must be >= 1024, got {max_shard_bytes}")
        if not prefix or "/" in prefix:
            raise ValueError(f"shard prefix must be a non-empty file name prefix, got {prefix!r}")
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.prefix, self.samples_per_shard, self.max_shard_bytes = prefix, samples_per_shard, max_shard_bytes
        self.sizes: dict[str, int] = {}
        self._tar: tarfile.TarFile | None = None
        self._tmp: Path | None = None
        self._count = self._bytes = 0

    def _open(self) -> None:
        name = SHARD_NAME.format(prefix=self.prefix, index=len(self.sizes))
        self._tmp = _temp_path(self.out_dir / name)
        # Kept open across write() calls; closed by _finish() or abort().
        self._tar = tarfile.open(self._tmp, "w", format=tarfile.PAX_FORMAT)  # noqa: SIM115
        self._count, self._bytes = 0, 1024  # the tar end-of-archive blocks

    def _finish(self) -> None:
        if self._tar is None:
            return
        assert self._tmp is not None
        self._tar.close()
        name = SHARD_NAME.format(prefix=self.prefix, index=len(self.sizes))
        os.replace(self._tmp, self.out_dir / name)
        self.sizes[name] = self._count
        self._tar = self._tmp = None

    def write(self, key: str, members: dict[str, bytes]) -> None:
        """Append one sample ``{ext: bytes}`` under ``key``."""
        size = sum(512 + -(-len(v) // 512) * 512 for v in members.values())
        if self._tar is not None and (
            self._count >= self.samples_per_shard
            or (self.max_shard_bytes is not None and self._bytes + size > self.max_shard_bytes)
        ):
            self._finish()
        if self._tar is None:
            self._open()
        assert self._tar is not None
        self._bytes += add_sample(self._tar, key, members)
        self._count += 1

    def close(self) -> dict[str, int]:
        """Finish the open shard, write sizes.json; returns {shard name: samples}."""
        self._finish()
        write_sizes(self.out_dir, self.sizes)
        return dict(self.sizes)

    def abort(self) -> None:
        """Remove the shard in progress and every shard completed by this writer."""
        if self._tar is not None:
            self._tar.close()
        if self._tmp is not None:
            self._tmp.unlink(missing_ok=True)
        for name in self.sizes:
            (self.out_dir / name).unlink(missing_ok=True)
        self._tar = self._tmp = None
        self.sizes = {}

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type: object, *_: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def glob_escape(text: str) -> str:
    """Escape glob metacharacters of a literal file-name part."""
    return glob.escape(text)
