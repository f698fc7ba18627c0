"""Weight files other code loads: (sharded) safetensors or torch pickles, Hugging Face's layout.

Everything here works on a *mapping of tensor-likes*: objects with ``shape``, ``dtype`` and
``contiguous()`` (a ``torch.Tensor``, or DeepSpeed's lazy ``GatheredTensor`` that gathers one
parameter from the ZeRO-3 partitions when asked). Writers materialize one output shard at a time and
drop it before the next, so peak memory is about one shard, not the model. This module does not
import DeepSpeed; reading ZeRO checkpoints is ``mico_ds.distributed.zero_checkpoint``.

    save_state_dict(tensors, "out/", max_shard_size=parse_size("5GB"))   # model*.safetensors (+ index)
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Protocol

import torch


class TensorLike(Protocol):
    """A tensor or a lazy stand-in that becomes one on ``contiguous()``."""

    shape: torch.Size
    dtype: torch.dtype

    def contiguous(self) -> torch.Tensor: ...


def nbytes(t: TensorLike, dtype: torch.dtype | None = None) -> int:
    dt = dtype if dtype is not None and t.dtype.is_floating_point else t.dtype
    return int(torch.Size(t.shape).numel()) * torch.empty((), dtype=dt).element_size()


def plan_shards(sizes: Mapping[str, int], max_bytes: int | None) -> list[list[str]]:
    """Group names, in order, into shards of at most ``max_bytes`` (a bigger tensor gets its own shard),
    the greedy rule of ``huggingface_hub.split_torch_state_dict_into_shards``."""
    if max_bytes is None:
        return [list(sizes)]
    if max_bytes <= 0:
        raise ValueError(f"max shard size must be > 0 bytes, got {max_bytes}")
    shards: list[list[str]] = []
    cur: list[str] = []
    used = 0
    for name, n in sizes.items():
        if cur and used + n > max_bytes:
            shards.append(cur)
            cur, used = [], 0
        cur.append(name)
        used += n
    if cur or not shards:
        shards.append(cur)
    return shards


def _file_names(n: int, safe: bool) -> tuple[list[str], str]:
    base, ext = ("model", "safetensors") if safe else ("pytorch_model", "bin")
    if n == 1:
        return [f"{base}.{ext}"], f"{base}.{ext}.index.json"
    return [f"{base}-{i:05d}-of-{n:05d}.{ext}" for i in range(1, n + 1)], f"{base}.{ext}.index.json"


def owning(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself when it owns exactly its storage, else a copy: a view into a bigger buffer (a flat
    ZeRO partition) would make ``torch.save`` write the whole buffer and safetensors refuse it."""
    if t.storage_offset() == 0 and t.untyped_storage().nbytes() == t.numel() * t.element_size():
        return t
    return t.clone()


def save_state_dict(
    tensors: Mapping[str, TensorLike],
    out_dir: str | Path,
    *,
    max_shard_size: int | None = None,
    safe: bool = True,
    dtype: torch.dtype | None = None,
    progress: Callable[[int, int, str], None] | None = None,
) -> list[Path]:
    """Write ``tensors`` as Hugging Face-style weight files, one shard in memory at a time.

    Args:
        tensors: name -> tensor-like, written in this order.
        out_dir: created if missing; existing weight files of the same names are replaced.
        max_shard_size: bytes per file; above it ``model-0000i-of-0000n.safetensors`` files and a
            ``model.safetensors.index.json`` (``pytorch_model*.bin`` with ``safe=False``). None: one file.
        safe: safetensors (True) or ``torch.save`` pickles (False).
        dtype: cast floating-point tensors (integer buffers keep theirs); None keeps each dtype.
        progress: called as ``progress(shard_index, num_shards, file_name)`` after each file.

    Returns:
        The files written (the index last, when there is one).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sizes = {k: nbytes(t, dtype) for k, t in tensors.items()}
    groups = plan_shards(sizes, max_shard_size)
    names, index_name = _file_names(len(groups), safe)
    written: list[Path] = []
    for i, (fname, keys) in enumerate(zip(names, groups)):
        shard: dict[str, torch.Tensor] = {}
        for k in keys:
            t = tensors[k].contiguous()
            if dtype is not None and t.is_floating_point():
                t = t.to(dtype)
            shard[k] = owning(t)
        tmp = out / f".{fname}.tmp{os.getpid()}"
        if safe:
            from safetensors.torch import save_file

            save_file(shard, str(tmp), metadata={"format": "pt"})
        else:
            torch.save(shard, tmp)
        os.replace(tmp, out / fname)
        written.append(out / fname)
        del shard  # this shard's tensors are freed before the next is gathered
        if progress is not None:
            progress(i + 1, len(groups), fname)
    if len(groups) > 1:
        index = {
            "metadata": {"total_size": sum(sizes.values())},
            "weight_map": {k: fname for fname, keys in zip(names, groups) for k in keys},
        }
        (out / index_name).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        written.append(out / index_name)
    return written


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read what :func:`save_state_dict` wrote: a directory (index or single file) or one file."""
    p = Path(path)
    if p.is_dir():
        for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
            if (p / index).is_file():
                files = sorted(set(json.loads((p / index).read_text())["weight_map"].values()))
                break
        else:
            files = [f for f in ("model.safetensors", "pytorch_model.bin") if (p / f).is_file()][:1]
            if not files:
                raise ValueError(f"{p}: no model.safetensors, pytorch_model.bin or index file")
        out: dict[str, torch.Tensor] = {}
        for f in files:
            out.update(load_state_dict(p / f))
        return out
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(p))
    return torch.load(p, map_location="cpu", weights_only=True)


class Renamed(Mapping):
    """A read-only view of ``source`` under new names (``mapping``: new name -> source name)."""

    def __init__(self, source: Mapping[str, TensorLike], mapping: Mapping[str, str]) -> None:
        self.source, self.mapping = source, dict(mapping)

    def __getitem__(self, key: str) -> TensorLike:
        return self.source[self.mapping[key]]

    def __iter__(self):
        return iter(self.mapping)

    def __len__(self) -> int:
        return len(self.mapping)
