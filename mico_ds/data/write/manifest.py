"""Raw-media manifests -> shards (``tools/make_shards.py``).

A raw-media manifest is JSON lines, one sample per line (paths relative to the manifest file)::

    {"key": "clip0001", "image": "img/0001.jpg", "video": "vid/0001.mp4", "audio": "aud/0001.flac",
     "depth": "depth/0001.png", "normal": "normal/0001.png",
     "captions": {"vision": "...", "audio": "...", "subtitle": "...", "depth": "..."},
     "category": "music", "source": "my-corpus"}

Every field but ``key`` is optional. Each media file is validated by opening it with the library the
loader decodes it with (``mico_ds.data.write.probe``); its original bytes are stored unchanged under
the member name of the contract (``jpg``/``png``/``webp``, ``mp4``/``webm``/``gif``,
``flac``/``wav``/``mp3``/``m4a``/``aac``/``ogg``/``opus``, ``depth.png``/``depth.npy``, ``normal.png``,
``json``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mico_ds.data import schema
from mico_ds.data.write.media import encode_normal_png, normals_from_depth
from mico_ds.data.write.probe import load_depth, probe_audio, probe_image, probe_normal, probe_video
from mico_ds.data.write.tar import ShardWriter, glob_escape, validate_key

MANIFEST_MEDIA_FIELDS: tuple[str, ...] = ("image", "video", "audio", "depth", "normal")
MANIFEST_FIELDS: tuple[str, ...] = ("key", *MANIFEST_MEDIA_FIELDS, "captions", "category", "source")


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
            bad = sorted(set(caps) - set(schema.TEXT_FIELDS))
            if bad:
                raise ManifestError(
                    f"{where}unknown caption field(s) {bad}; allowed: {list(schema.TEXT_FIELDS)}"
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
