"""The low-level shard I/O both directions share: URL expansion, tar reading, member names, modality
detection, the ``sizes.json`` index. The reader (``mico_ds.data.read``) and the writer
(``mico_ds.data.write``) build on this module and on nothing of each other.

A raw sample is a dict ``{"__key__": str, "__url__": str, <member ext>: bytes, ...}``: the members of
a WebDataset tar that share a key (member ``dir/000123.depth.png`` -> key ``dir/000123``, ext
``depth.png``: WebDataset splits at the first dot of the base name).
"""

from __future__ import annotations

import glob as globlib
import json
import os
import subprocess
import tarfile
import zlib
from collections.abc import Iterable, Iterator, Mapping, Sequence

from mico_ds.data import schema
from mico_ds.data.remote import open_http

# Member extensions that carry each knowledge modality (first match wins when several are present).
MODALITY_EXTS: dict[str, tuple[str, ...]] = {
    "image": schema.IMAGE_EXTS,
    "video": schema.VIDEO_EXTS,
    "audio": schema.AUDIO_EXTS,
    "depth": schema.DEPTH_EXTS,
    "normal": schema.NORMAL_EXTS,
}
FRAMES = "frames"  # find_member's name for pre-extracted video frames (frame0.jpg, frame1.jpg, ...)
OVERSIZED = "__oversized__"  # {ext: size} of the members iter_tar left unread (over max_member_bytes)


# ----------------------------------------------------------------------------- URLs


def _braceexpand(pattern: str) -> list[str]:
    import braceexpand

    return list(braceexpand.braceexpand(pattern))


def expand_urls(spec: str | os.PathLike | Sequence[str | os.PathLike], root: str | None = None) -> list[str]:
    """Shard URLs of ``spec``: brace patterns (``a-{000..009}.tar``), globs, a directory (its
    ``*.tar``, sorted), a list of any of these, or several joined by ``::`` (WebDataset style).
    Local paths are relative to ``root``; ``pipe:CMD`` commands and ``http(s)://`` URLs pass through
    unchanged (they are not checked: a remote shard that fails is retried, then skipped and counted,
    ``mico_ds.data.remote``).

    Raises:
        ValueError: naming the pattern when it matches nothing or a named file does not exist.
    """
    parts: list[str] = []
    for s in [spec] if isinstance(spec, (str, os.PathLike)) else list(spec):
        parts += [p.strip() for p in str(s).split("::") if p.strip()]
    if not parts:
        raise ValueError(f"no shard URLs in {spec!r}")
    urls: list[str] = []
    for part in parts:
        missing: list[str] = []
        expanded = _braceexpand(part)
        for u in expanded:
            if u.startswith(("pipe:", "http://", "https://")):
                urls.append(u)
                continue
            path = u if os.path.isabs(u) or not root else os.path.join(root, u)
            if any(ch in path for ch in "*?["):
                found = sorted(globlib.glob(path))
                if not found:
                    raise ValueError(f"shard pattern {u!r} (as {path!r}) matches no file: no .tar files")
                urls += found
            elif os.path.isdir(path):
                found = sorted(globlib.glob(os.path.join(path, "*.tar")))
                if not found:
                    raise ValueError(f"shard directory {path!r} holds no *.tar file")
                urls += found
            elif os.path.exists(path):
                urls.append(path)
            else:
                missing.append(path)
        if missing:
            raise ValueError(
                f"{len(missing)} of {len(expanded)} shards of {part!r} not found (data.root={root!r}), "
                f"e.g. {missing[:3]}"
            )
    return urls


def read_sizes(directory: str | os.PathLike) -> dict[str, int]:
    """The ``sizes.json`` of a shard directory ({shard file name: samples}); {} when there is none."""
    try:
        with open(os.path.join(directory, schema.SIZES_FILE)) as f:
            sizes = json.load(f)
    except (OSError, ValueError):
        return {}
    return {k: v for k, v in sizes.items() if isinstance(v, int)} if isinstance(sizes, dict) else {}


# ----------------------------------------------------------------------------- member names


def split_member_name(name: str) -> tuple[str, str]:
    """``dir/000123.depth.png`` -> (``dir/000123``, ``depth.png``): WebDataset's rule, the first dot of
    the base name. A name without a dot has the extension ``""`` (readers skip such members)."""
    d, base = os.path.split(name)
    if "." not in base:
        return name, ""
    stem, ext = base.split(".", 1)
    return (os.path.join(d, stem) if d else stem), ext


def frame_members(sample: Iterable[str]) -> list[str]:
    """Names of pre-extracted frame members (``frame{i}.jpg``), in frame order."""
    names = []
    for k in sample:
        if k.startswith(schema.FRAME_PREFIX) and "." in k:
            idx = k[len(schema.FRAME_PREFIX) : k.index(".")]
            if idx.isdigit():
                names.append((int(idx), k))
    return [k for _, k in sorted(names)]


def find_member(
    sample: Mapping[str, object] | Iterable[str], modality: str, audio_track: bool = False
) -> str | None:
    """The member carrying ``modality`` (:data:`FRAMES` for pre-extracted video frames), or None.

    With ``audio_track``, ``audio`` falls back to a video member whose audio stream may serve it
    (schema.AUDIO_TRACK_EXTS: mp4, webm) when the sample has no audio member: the decoder's rule for a
    corpus that declares audio (docs/data.md, "Shard format"). Whether that video has sound is known
    only once it is opened, so nothing that merely lists modalities passes it.
    """
    exts = set(sample)
    if modality == "video" and frame_members(exts):
        return FRAMES
    found = next((e for e in MODALITY_EXTS[modality] if e in exts), None)
    if found is None and audio_track and modality == "audio":
        found = next((e for e in schema.AUDIO_TRACK_EXTS if e in exts), None)
    return found


def member_modalities(exts: Iterable[str]) -> list[str]:
    """Knowledge modalities (schema.MODALITIES order) present among a sample's member extensions.

    A video member counts as video only, not as audio: whether it has an audio stream is known only
    by opening it (see :func:`find_member`'s ``audio_track``)."""
    exts = set(exts)
    return [m for m in schema.MODALITIES if find_member(exts, m) is not None]


# ----------------------------------------------------------------------------- tar reading


def _error(reason: str, url: str, detail: str) -> dict:
    return {"__error__": reason, "__key__": os.path.basename(url), "__url__": url, "__detail__": detail}


def iter_tar(url: str, max_member_bytes: int = 0) -> Iterator[dict]:
    """Raw samples ``{"__key__", "__url__", ext: bytes}`` of one tar (a local path, a ``pipe:CMD``
    command or an ``http(s)://`` URL, streamed), in file order.

    A member larger than ``max_member_bytes`` (0: no cap) is not read: the sample lists it under
    :data:`OVERSIZED` (``{ext: size}``) instead, for the decoder to skip the sample if it needs it.

    Never raises for bad data: an unreadable shard, a truncated tar (an HTTP body shorter than its
    Content-Length included), an HTTP error status or a failing ``pipe:`` command yields an error
    marker ``{"__error__": "shard_error" | "truncated_tar", ...}`` after the samples read before the
    damage (the sample being read when it happened is dropped). Members without an extension and
    WebDataset metadata members (``__index__`` ...) are skipped. Remote shards are retried by
    ``mico_ds.data.remote.iter_with_retries``, not here.
    """
    proc = None
    try:
        if url.startswith("pipe:"):
            proc = subprocess.Popen(url[5:], shell=True, stdout=subprocess.PIPE, bufsize=1 << 20)
            stream = proc.stdout
        elif url.startswith(("http://", "https://")):
            stream = open_http(url)
        else:
            stream = open(url, "rb", buffering=1 << 20)  # noqa: SIM115 - closed in finally
    except OSError as e:
        yield _error("shard_error", url, f"{type(e).__name__}: {e}")
        return
    cur: dict | None = None
    err: dict | None = None
    rc = 0
    try:
        try:
            tf = tarfile.open(fileobj=stream, mode="r|*")  # noqa: SIM115 - `stream` is closed below
        except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
            err = _error("shard_error", url, f"not a readable tar: {type(e).__name__}: {e}")
        else:
            for ti in tf:
                if not ti.isfile():
                    continue
                key, ext = split_member_name(ti.name)
                if not ext or os.path.basename(key).startswith("__"):
                    continue
                if cur is not None and cur["__key__"] != key:
                    yield cur  # complete: a new key starts (before reading it, which may fail)
                    cur = None
                if cur is None:
                    cur = {"__key__": key, "__url__": url}
                if max_member_bytes and ti.size > max_member_bytes:
                    cur.setdefault(OVERSIZED, {})[ext] = ti.size  # tarfile passes over its data, unkept
                    continue
                data = tf.extractfile(ti).read()
                if len(data) != ti.size:
                    raise tarfile.ReadError(f"member {ti.name} truncated ({len(data)} of {ti.size} bytes)")
                cur[ext] = data
            if cur is not None:
                yield cur
                cur = None
            if proc is not None:
                while stream.read(1 << 16):  # drain the end-of-archive padding: no SIGPIPE for the writer
                    pass
    except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
        dropped = f" (dropped the partial sample {cur['__key__']})" if cur is not None else ""
        err = _error("truncated_tar", url, f"{type(e).__name__}: {e}{dropped}")
    finally:
        stream.close()
        if proc is not None:
            if proc.poll() is None and err is not None:
                proc.kill()
            rc = proc.wait()
    if err is not None:
        yield err
    elif rc != 0:
        yield _error("shard_error", url, f"pipe command exited with status {rc}")


def iter_tar_samples(url: str | os.PathLike) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Samples ``(key, {ext: bytes})`` of one shard, for tools that must see it whole: the damage
    :func:`iter_tar` reports as a marker is raised here.

    Raises:
        ValueError: naming the shard and what is wrong with it.
    """
    for item in iter_tar(str(url)):
        if "__error__" in item:
            raise ValueError(f"{url}: {item['__error__']}: {item['__detail__']}")
        yield item["__key__"], {k: v for k, v in item.items() if not k.startswith("__")}
