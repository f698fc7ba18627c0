"""Writing WebDataset shards: a deterministic tar writer, raw-media manifests -> shards, nested subsets.

Shard layout (DESIGN.md §4): POSIX tar files ``prefix-000000.tar`` ..., one sample = consecutive members
``<key>.<ext>`` sharing a key, with ``schema.SIZES_FILE`` (``{"prefix-000000.tar": n_samples}``) next to
them. Every file is written to a temporary name and renamed into place, so a reader never sees a
half-written shard. Tar headers carry a fixed mtime/owner, so equal samples give byte-identical shards.

A raw-media manifest is JSON lines, one sample per line (paths relative to the manifest file)::

    {"key": "clip0001", "image": "img/0001.jpg", "video": "vid/0001.mp4", "audio": "aud/0001.flac",
     "depth": "depth/0001.png", "normal": "normal/0001.png",
     "captions": {"vision": "...", "audio": "...", "subtitle": "...", "depth": "..."},
     "category": "music", "source": "my-corpus"}

Every field but ``key`` is optional. Each media file is validated by opening it with the library the
loader decodes it with (Pillow, PyAV, soundfile, numpy); its original bytes are stored unchanged under
the member name of the contract (``jpg``/``png``/``webp``, ``mp4``/``webm``/``gif``,
``flac``/``wav``/``mp3``, ``depth.png``/``depth.npy``, ``normal.png``, ``json``).
"""

from __future__ import annotations

import io
import json
import os
import re
import tarfile
import threading
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mico_ds.data import schema
from mico_ds.data.media import encode_normal_png, normals_from_depth

# Fixed tar header fields: shards depend only on their samples, not on when or by whom they were written.
TAR_MTIME = 946684800  # 2000-01-01T00:00:00Z
MANIFEST_MEDIA_FIELDS: tuple[str, ...] = ("image", "video", "audio", "depth", "normal")
MANIFEST_FIELDS: tuple[str, ...] = ("key", *MANIFEST_MEDIA_FIELDS, "captions", "category", "source")
_KEY_RE = re.compile(r"^[A-Za-z0-9_\-:+=@,]+$")
SHARD_NAME = "{prefix}-{index:06d}.tar"


# ----------------------------------------------------------------------------- tar writing


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


# ----------------------------------------------------------------------------- tar reading


def expand_shards(spec: str | Path | Sequence[str | Path]) -> list[Path]:
    """Shard paths from a directory (its ``*.tar``, sorted), a brace pattern, a glob, or a list of these."""
    import glob

    import braceexpand

    if isinstance(spec, (list, tuple)):
        return [p for s in spec for p in expand_shards(s)]
    spec = str(spec)
    if os.path.isdir(spec):
        paths = sorted(Path(spec).glob("*.tar"))
    else:
        paths = []
        for pat in braceexpand.braceexpand(spec):
            hits = sorted(glob.glob(pat)) if glob.has_magic(pat) else [pat]
            paths.extend(Path(h) for h in hits)
    missing = [str(p) for p in paths if not p.is_file()]
    if missing or not paths:
        raise ValueError(
            f"shards {spec!r}: {'missing ' + ', '.join(missing[:5]) if missing else 'no .tar files'}"
        )
    return paths


def split_member_name(name: str) -> tuple[str, str]:
    """``dir/key.ext.more`` -> (``dir/key``, ``ext.more``): WebDataset's rule (first dot of the base name)."""
    dirname, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    if not dot:
        raise ValueError(f"tar member {name!r} has no extension")
    return (f"{dirname}/{stem}" if dirname else stem), ext


def iter_tar_samples(path: str | Path) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Samples ``(key, {ext: bytes})`` of one tar shard, grouping consecutive members by key."""
    key: str | None = None
    members: dict[str, bytes] = {}
    with tarfile.open(path, "r") as tar:
        for info in tar:
            if not info.isfile():
                continue
            k, ext = split_member_name(info.name)
            if k != key and key is not None:
                yield key, members
                members = {}
            key = k
            f = tar.extractfile(info)
            assert f is not None
            members[ext] = f.read()
    if key is not None:
        yield key, members


def member_modalities(exts: Iterable[str]) -> list[str]:
    """Knowledge modalities (schema.MODALITIES order) present among a sample's member extensions."""
    exts = set(exts)
    found = {
        "image": any(e in exts for e in schema.IMAGE_EXTS),
        "video": any(e in exts for e in schema.VIDEO_EXTS)
        or any(e.startswith(schema.FRAME_PREFIX) for e in exts),
        "audio": any(e in exts for e in schema.AUDIO_EXTS),
        "depth": any(e in exts for e in schema.DEPTH_EXTS),
        "normal": any(e in exts for e in schema.NORMAL_EXTS),
    }
    return [m for m in schema.MODALITIES if found[m]]


def scan_shards(shards: str | Path | Sequence[str | Path]) -> list[dict[str, Any]]:
    """One record per sample of the shards: ``{"key", "category", "modalities", "shard"}``.

    The category comes from the json member (None when there is none, e.g. img2dataset txt shards).
    """
    records = []
    for shard in expand_shards(shards):
        for key, members in iter_tar_samples(shard):
            category = None
            if schema.JSON_EXT in members:
                try:
                    category = json.loads(members[schema.JSON_EXT]).get("category")
                except (json.JSONDecodeError, AttributeError) as e:
                    raise ValueError(f"{shard}: sample {key!r} has an invalid json member: {e}") from e
            records.append(
                {
                    "key": key,
                    "category": category,
                    "modalities": member_modalities(members),
                    "shard": str(shard),
                }
            )
    return records


# ----------------------------------------------------------------------------- manifest -> shards


class ManifestError(ValueError):
    """A manifest line that cannot be turned into a sample; the message names the line and the file."""


@dataclass
class ManifestEntry:
    """One parsed manifest line; media paths are resolved against the manifest's directory."""

    line: int
    key: str
    media: dict[str, Path] = field(default_factory=dict)  # field -> absolute path
    raw_media: dict[str, str] = field(default_factory=dict)  # field -> path as written in the manifest
    captions: dict[str, str] = field(default_factory=dict)
    category: str | None = None
    source: str | None = None


def read_manifest(path: str | Path) -> list[ManifestEntry]:
    """Parse and check a JSON-lines manifest (fields, types, key syntax, duplicate keys, file existence).

    Raises:
        ManifestError: naming the manifest, the 1-based line number and the offending value.
    """
    path = Path(path)
    base = path.parent
    entries: list[ManifestEntry] = []
    seen: dict[str, int] = {}
    with open(path, encoding="utf-8") as f:
        for lineno, text in enumerate(f, start=1):
            if not text.strip():
                continue
            where = f"{path}:{lineno}: "
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as e:
                raise ManifestError(f"{where}not valid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(obj, dict):
                raise ManifestError(f"{where}expected a JSON object, got {type(obj).__name__}")
            unknown = sorted(set(obj) - set(MANIFEST_FIELDS))
            if unknown:
                raise ManifestError(f"{where}unknown field(s) {unknown}; allowed: {list(MANIFEST_FIELDS)}")
            if "key" not in obj:
                raise ManifestError(f"{where}missing 'key'")
            try:
                key = validate_key(obj["key"])
            except ValueError as e:
                raise ManifestError(f"{where}{e}") from None
            if key in seen:
                raise ManifestError(f"{where}duplicate key {key!r} (first on line {seen[key]})")
            seen[key] = lineno
            entry = ManifestEntry(line=lineno, key=key)
            for name in MANIFEST_MEDIA_FIELDS:
                value = obj.get(name)
                if value is None:
                    continue
                if not isinstance(value, str) or not value:
                    raise ManifestError(f"{where}{name} must be a path string, got {value!r}")
                full = (base / value).resolve()
                if not full.is_file():
                    raise ManifestError(f"{where}{name} file {value!r} not found ({full})")
                entry.media[name], entry.raw_media[name] = full, value
            caps = obj.get("captions", {})
            if not isinstance(caps, dict) or not all(isinstance(v, str) for v in caps.values()):
                raise ManifestError(f"{where}captions must be an object of strings, got {caps!r}")
            bad = sorted(set(caps) - set(schema.CAPTION_FIELDS))
            if bad:
                raise ManifestError(
                    f"{where}unknown caption field(s) {bad}; allowed: {list(schema.CAPTION_FIELDS)}"
                )
            entry.captions = dict(caps)
            for name in ("category", "source"):
                value = obj.get(name)
                if value is not None and not isinstance(value, str):
                    raise ManifestError(f"{where}{name} must be a string, got {value!r}")
                setattr(entry, name, value)
            entries.append(entry)
    if not entries:
        raise ManifestError(f"{path}: manifest has no samples")
    return entries


_IMAGE_FORMATS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}
_VIDEO_EXTS = {".mp4": "mp4", ".webm": "webm", ".gif": "gif"}
_AUDIO_EXTS = {".flac": "flac", ".wav": "wav", ".mp3": "mp3"}


def probe_image(path: Path) -> str:
    """Decode an image fully with Pillow; returns its member extension (jpg/png/webp)."""
    from PIL import Image

    with Image.open(path) as im:
        fmt = im.format
        if fmt not in _IMAGE_FORMATS:
            raise ValueError(f"unsupported image format {fmt} (accepted: JPEG, PNG, WebP)")
        im.load()  # decodes every pixel: catches truncated or corrupt data
        if im.size[0] < 1 or im.size[1] < 1:
            raise ValueError(f"empty image {im.size}")
    return _IMAGE_FORMATS[fmt]


def probe_video(path: Path) -> str:
    """Open a video with PyAV and decode its first frame; returns mp4/webm/gif from the file extension."""
    import av

    ext = _VIDEO_EXTS.get(path.suffix.lower())
    if ext is None:
        raise ValueError(f"unsupported video extension {path.suffix!r} (accepted: {sorted(_VIDEO_EXTS)})")
    with av.open(str(path)) as container:
        if not container.streams.video:
            raise ValueError("no video stream")
        frame = next(container.decode(video=0), None)
        if frame is None:
            raise ValueError("no decodable video frame")
    return ext


def probe_audio(path: Path) -> str:
    """Decode audio fully (soundfile for WAV/FLAC, PyAV for MP3); returns flac/wav/mp3."""
    ext = _AUDIO_EXTS.get(path.suffix.lower())
    if ext is None:
        raise ValueError(f"unsupported audio extension {path.suffix!r} (accepted: {sorted(_AUDIO_EXTS)})")
    if ext == "mp3":
        import av

        with av.open(str(path)) as container:
            if not container.streams.audio:
                raise ValueError("no audio stream")
            n = sum(frame.samples for frame in container.decode(audio=0))
    else:
        import soundfile as sf

        info = sf.info(str(path))
        if info.format != ext.upper():
            raise ValueError(f"file extension says {ext} but soundfile reads {info.format}")
        n = len(sf.read(str(path), dtype="float32", always_2d=True)[0])
    if n < 1:
        raise ValueError("audio has no samples")
    return ext


def load_depth(path: Path) -> tuple[str, bytes, np.ndarray]:
    """Validate a depth map; returns (member ext, member bytes, depth float32 (H, W)).

    16-bit greyscale PNG is kept as it is; ``.npy`` must hold a 2-D (or (H, W, 1)) numeric array and is
    stored as float32 (re-serialized only when it was another dtype).
    """
    data = path.read_bytes()
    if path.suffix.lower() == ".npy":
        arr = np.load(io.BytesIO(data), allow_pickle=False)
        stored_as_is = arr.dtype == np.float32 and arr.ndim == 2
        if arr.ndim == 3 and arr.shape[2] == 1:
            arr = arr[..., 0]
        if arr.ndim != 2 or not np.issubdtype(arr.dtype, np.number):
            raise ValueError(f"depth .npy must be a numeric (H, W) array, got {arr.dtype} {arr.shape}")
        if not stored_as_is:
            buf = io.BytesIO()
            np.save(buf, arr.astype(np.float32))
            data = buf.getvalue()
        return "depth.npy", data, arr.astype(np.float32)
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        if im.format != "PNG":
            raise ValueError(f"depth must be a 16-bit PNG or .npy, got {im.format}")
        if im.mode not in ("I;16", "I;16B", "I;16L", "I"):
            raise ValueError(f"depth PNG must be 16-bit greyscale, got mode {im.mode}")
        arr = np.asarray(im).astype(np.float32)
    return "depth.png", data, arr


def probe_normal(path: Path) -> str:
    """Decode a normal map: an 8-bit RGB PNG."""
    from PIL import Image

    with Image.open(path) as im:
        if im.format != "PNG" or im.mode != "RGB":
            raise ValueError(f"normal map must be an 8-bit RGB PNG, got {im.format} mode {im.mode}")
        im.load()
    return "normal.png"


def entry_members(
    entry: ManifestEntry, *, source: str, derive_normals: bool = False, depth_scale: float = 1.0
) -> dict[str, bytes]:
    """Validate one manifest entry's media and build its tar members ``{ext: bytes}``.

    Raises:
        ManifestError: naming the line, the field and the path of a file that cannot be decoded.
    """
    members: dict[str, bytes] = {}
    depth: np.ndarray | None = None
    for name, full in entry.media.items():
        try:
            if name == "image":
                ext, data = probe_image(full), full.read_bytes()
            elif name == "video":
                ext, data = probe_video(full), full.read_bytes()
            elif name == "audio":
                ext, data = probe_audio(full), full.read_bytes()
            elif name == "depth":
                ext, data, depth = load_depth(full)
            else:
                ext, data = probe_normal(full), full.read_bytes()
        except Exception as e:  # noqa: BLE001 - decoders raise many types; all mean "unreadable"
            raise ManifestError(
                f"line {entry.line} (key {entry.key!r}): {name} file {entry.raw_media[name]!r} ({full}) "
                f"cannot be read: {type(e).__name__}: {e}"
            ) from e
        members[ext] = data
    if derive_normals and depth is not None and "normal.png" not in members:
        members["normal.png"] = encode_normal_png(normals_from_depth(depth, scale=depth_scale))
    meta: dict[str, Any] = {"captions": entry.captions}
    if entry.category is not None:
        meta["category"] = entry.category
    meta["source"] = entry.source or source
    members[schema.JSON_EXT] = json.dumps(meta, ensure_ascii=False, sort_keys=True).encode()
    return members


def make_shards(
    manifest: str | Path,
    out_dir: str | Path,
    *,
    samples_per_shard: int = 1000,
    max_shard_bytes: int | None = None,
    prefix: str = "corpus",
    derive_normals: bool = False,
    depth_scale: float = 1.0,
    source: str | None = None,
    skip_bad: bool = False,
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Turn a raw-media manifest into tar shards ``out_dir/prefix-000000.tar`` ... and ``sizes.json``.

    ``depth_scale`` converts depth units to pixel widths for ``derive_normals`` (see normals_from_depth).
    Without ``skip_bad`` the first unreadable file raises a ManifestError naming its line and path and
    every shard of this run is removed; with it, such samples are skipped and counted.

    Returns:
        {"sizes": {shard: n}, "num_samples": n, "skipped": [(line, key, reason), ...]}
    """
    from tqdm import tqdm

    manifest = Path(manifest)
    out_dir = Path(out_dir)
    entries = read_manifest(manifest)
    out_dir.mkdir(parents=True, exist_ok=True)
    old = sorted(out_dir.glob(f"{glob_escape(prefix)}-[0-9][0-9][0-9][0-9][0-9][0-9].tar"))
    if old and not overwrite:
        raise ValueError(
            f"{out_dir} already holds {len(old)} shard(s) named {prefix}-*.tar (e.g. {old[0].name}); "
            "pass overwrite=True (--overwrite) or another prefix/directory"
        )
    for p in old:
        p.unlink()
    (out_dir / schema.SIZES_FILE).unlink(missing_ok=True)
    source = source or manifest.stem
    skipped: list[tuple[int, str, str]] = []
    writer = ShardWriter(out_dir, prefix, samples_per_shard, max_shard_bytes)
    with writer:
        for entry in tqdm(entries, desc=f"shards {prefix}", unit="sample", disable=not progress):
            try:
                members = entry_members(
                    entry, source=source, derive_normals=derive_normals, depth_scale=depth_scale
                )
            except ManifestError as e:
                if not skip_bad:
                    raise ManifestError(f"{manifest}: {e}") from e.__cause__
                skipped.append((entry.line, entry.key, str(e)))
                continue
            writer.write(entry.key, members)
    if not writer.sizes:
        raise ManifestError(f"{manifest}: every sample was skipped ({len(skipped)}); first: {skipped[0][2]}")
    return {"sizes": writer.sizes, "num_samples": sum(writer.sizes.values()), "skipped": skipped}


def glob_escape(text: str) -> str:
    """Escape glob metacharacters of a literal file-name part."""
    import glob

    return glob.escape(text)


# ----------------------------------------------------------------------------- nested stratified subsets


def _largest_remainder(total: int, weights: np.ndarray, caps: np.ndarray) -> np.ndarray:
    """Split ``total`` in proportion to ``weights`` with counts <= ``caps`` (Hamilton's method).

    Each count is floor(ideal) or floor(ideal) + 1; the leftover units go to the largest remainders among
    categories still below their cap (ties broken by lower index, so the result is deterministic).
    """
    ideal = total * weights / weights.sum()
    counts = np.minimum(np.floor(ideal).astype(np.int64), caps)
    left = total - int(counts.sum())
    order = np.lexsort((np.arange(len(ideal)), -(ideal - np.floor(ideal))))
    for i in order:
        if left == 0:
            break
        if counts[i] < caps[i]:
            counts[i] += 1
            left -= 1
    if left:  # the floor of some category was clipped by its cap: fill anywhere there is room
        for i in order:
            room = int(caps[i] - counts[i])
            take = min(room, left)
            counts[i] += take
            left -= take
    assert left == 0, "caps sum below total"
    return counts


def resolve_sizes(sizes: Sequence[int | float], total: int) -> list[int]:
    """Subset sizes as counts: Python floats are fractions of ``total`` in (0, 1], ints are counts."""
    if not sizes:
        raise ValueError("no subset sizes given")
    if all(isinstance(s, float) for s in sizes):
        if not all(0 < s <= 1 for s in sizes):
            raise ValueError(f"fractional subset sizes must be in (0, 1], got {list(sizes)}")
        counts = [max(1, round(s * total)) for s in sizes]
    elif all(isinstance(s, int) for s in sizes):
        if not all(s >= 1 for s in sizes):
            raise ValueError(f"subset counts must be >= 1, got {list(sizes)}")
        counts = [int(s) for s in sizes]
    else:
        raise ValueError(f"subset sizes {list(sizes)} mix fractions and counts")
    too_big = [c for c in counts if c > total]
    if too_big:
        raise ValueError(f"subset sizes {too_big} exceed the {total} samples available")
    return counts


def nested_stratified_subsets(
    categories: Sequence[str], sizes: Sequence[int], seed: int = 42
) -> list[np.ndarray]:
    """Nested subsets stratified by category (MiCo appendix, "Dataset Split", Algorithm 2).

    Algorithm 2 draws each subset with sklearn's stratified ``train_test_split``; drawing them
    independently does not make the 1M subset part of the 10M one. Here every category's samples are
    shuffled once (seeded) and each subset takes a prefix of every category's order, so each subset
    lies inside the next. Per-category counts come from largest-remainder rounding of
    size * n_c / N, computed from the largest subset down with each count capped by the count of the
    next larger subset (plain Hamilton rounding is not monotone in the size - the Alabama paradox).

    Args:
        categories: the category of every sample (index i = sample i).
        sizes: subset sizes as counts (any order; each <= len(categories)).
        seed: shuffling seed.

    Returns:
        For each entry of ``sizes`` (same order), the sorted sample indices of that subset.
    """
    n = len(categories)
    if any(not 1 <= s <= n for s in sizes):
        raise ValueError(f"subset sizes {list(sizes)} must be in [1, {n}]")
    names, inverse = np.unique(np.asarray(categories, dtype=object).astype(str), return_inverse=True)
    counts = np.bincount(inverse, minlength=len(names))
    rng = np.random.default_rng(seed)
    members = [rng.permutation(np.flatnonzero(inverse == c)) for c in range(len(names))]
    order = sorted(range(len(sizes)), key=lambda i: -sizes[i])
    quotas: dict[int, np.ndarray] = {}
    caps = counts.astype(np.int64)
    for i in order:
        caps = _largest_remainder(int(sizes[i]), counts.astype(np.float64), caps)
        quotas[i] = caps
    return [np.sort(np.concatenate([m[:q] for m, q in zip(members, quotas[i])])) for i in range(len(sizes))]
