"""Pretrained checkpoints on disk, read one tensor at a time, and conversion plans into our modules.

A *plan* is a list of :class:`Conversion` rows, one per parameter of the target module: which
checkpoint keys it is computed from and by which operation (:data:`OPS`). A plan is built from the
checkpoint's key names and shapes only (no tensor data), so it can be checked completely, against
every target shape, before a single tensor is read, and it is small enough to broadcast: under
ZeRO-3 one rank reads and converts while every rank walks the same plan (``mico_ds.distributed.zero_load``
does that; this module imports neither DeepSpeed nor ``torch.distributed``).

Formats (:class:`CheckpointReader`): a ``.safetensors`` file (tensors read lazily with ``safe_open``), a
``.pth``/``.pt``/``.bin`` file (``torch.load(mmap=True)``: storage is paged in when a tensor is used),
and a Hugging Face model directory with ``model.safetensors[.index.json]`` or
``pytorch_model.bin[.index.json]``. The reader keeps at most one file open, so converting a sharded
checkpoint shard after shard holds at most one shard's pages plus the tensor being converted.

The format-specific plans are the adapters beside this module: ``timm.timm_plan`` (timm / EVA ViT)
and ``hf_llama.hf_llama_plan`` (Hugging Face Llama).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from timm.layers import resample_abs_pos_embed, resample_patch_embed
from torch import nn

log = logging.getLogger("mico_ds")

Shape = tuple[int, ...]


# ----------------------------------------------------------------------------- reading


def unwrap_state_dict(sd: Any) -> dict[str, torch.Tensor]:
    """The state dict inside a training checkpoint ({"model": ...}, {"state_dict": ...}, {"module": ...})."""
    for key in ("model", "state_dict", "module"):
        if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
            sd = sd[key]
    if not isinstance(sd, dict):
        raise ValueError(f"not a state dict: {type(sd).__name__}")
    return {k: v for k, v in sd.items() if torch.is_tensor(v)}


class CheckpointReader:
    """Lazy access to the tensors of a checkpoint file or a (sharded) Hugging Face directory.

    Args:
        path: a ``.safetensors`` / ``.pth`` / ``.pt`` / ``.bin`` file, or a directory holding
            ``model.safetensors.index.json``, ``model.safetensors``, ``pytorch_model.bin.index.json``
            or ``pytorch_model.bin``.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.key_to_file: dict[str, Path] = {}
        self._shapes: dict[str, Shape] = {}
        self._open_file: Path | None = None
        self._handle: Any = None
        self.files_opened: list[Path] = []  # opens after the header scan (one pass per shard: tests)
        if self.path.is_dir():
            files = self._files_of_dir(self.path)
        elif self.path.is_file():
            files = [self.path]
        else:
            raise ValueError(f"{self.path}: no such checkpoint file or directory")
        for f in files:
            for k, shape in self._scan(f).items():
                if k in self.key_to_file:
                    raise ValueError(f"{f}: key {k!r} is also in {self.key_to_file[k]}")
                self.key_to_file[k] = f
                self._shapes[k] = shape
        self._close()
        self.files_opened = []

    @staticmethod
    def _files_of_dir(d: Path) -> list[Path]:
        for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
            if (d / index).is_file():
                try:
                    weight_map = json.loads((d / index).read_text())["weight_map"]
                except (json.JSONDecodeError, KeyError) as e:
                    raise ValueError(f"{d / index}: not a Hugging Face shard index ({e})") from None
                names = sorted(set(weight_map.values()))
                missing = [n for n in names if not (d / n).is_file()]
                if missing:
                    raise ValueError(f"{d / index} names shard files that do not exist: {missing}")
                return [d / n for n in names]
        for single in ("model.safetensors", "pytorch_model.bin"):
            if (d / single).is_file():
                return [d / single]
        raise ValueError(
            f"{d}: no model.safetensors[.index.json] or pytorch_model.bin[.index.json] in this directory"
        )

    def _scan(self, f: Path) -> dict[str, Shape]:
        if f.suffix == ".safetensors":
            self._switch(f)
            return {k: tuple(self._handle.get_slice(k).get_shape()) for k in self._handle.keys()}  # noqa: SIM118
        self._switch(f)
        return {k: tuple(v.shape) for k, v in self._handle.items()}

    def _switch(self, f: Path) -> None:
        """Make ``f`` the one open file."""
        if self._open_file == f:
            return
        self._close()
        if f.suffix == ".safetensors":
            from safetensors import safe_open

            self._handle = safe_open(str(f), framework="pt", device="cpu")
        else:
            try:
                sd = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError:  # legacy (non-zip) serialization cannot be memory-mapped
                log.warning("%s: legacy torch serialization, loading the whole file", f)
                sd = torch.load(f, map_location="cpu", weights_only=True)
            try:
                self._handle = unwrap_state_dict(sd)
            except ValueError as e:
                raise ValueError(f"{f}: {e}") from None
        self._open_file = f
        self.files_opened.append(f)

    def _close(self) -> None:
        self._handle = None
        self._open_file = None

    def keys(self) -> list[str]:
        return list(self.key_to_file)

    def shapes(self) -> dict[str, Shape]:
        """Every key's shape, read from headers (no tensor data)."""
        return dict(self._shapes)

    def files(self) -> list[Path]:
        return list(dict.fromkeys(self.key_to_file.values()))

    def get(self, key: str) -> torch.Tensor:
        """One tensor (a CPU copy for safetensors; a memory-mapped view for torch files)."""
        if key not in self.key_to_file:
            raise KeyError(f"{self.path}: no tensor {key!r}")
        self._switch(self.key_to_file[key])
        if self._open_file.suffix == ".safetensors":  # type: ignore[union-attr]
            return self._handle.get_tensor(key)
        return self._handle[key]

    def close(self) -> None:
        self._close()


class DictReader:
    """A :class:`CheckpointReader` over an in-memory state dict (tests, ``timm_to_encoder_state_dict``)."""

    def __init__(self, sd: dict[str, torch.Tensor]) -> None:
        self.sd = unwrap_state_dict(sd)
        self.path = Path("<state dict>")

    def keys(self) -> list[str]:
        return list(self.sd)

    def shapes(self) -> dict[str, Shape]:
        return {k: tuple(v.shape) for k, v in self.sd.items()}

    def files(self) -> list[Path]:
        return [self.path]

    def get(self, key: str) -> torch.Tensor:
        return self.sd[key]

    def close(self) -> None:
        pass


# ----------------------------------------------------------------------------- conversions


@dataclass
class Conversion:
    """One target parameter: ``OPS[op](tensors of sources, target_shape, **args)``."""

    target: str
    sources: tuple[str, ...]
    op: str = "copy"
    args: dict[str, Any] = field(default_factory=dict)


def _copy(ts: list[torch.Tensor], shape: Shape) -> torch.Tensor:
    return ts[0]


def _sum_in_chans(ts: list[torch.Tensor], shape: Shape) -> torch.Tensor:
    """(O, C, kh, kw) -> (O, 1, kh', kw'): the channels summed, then the kernel resampled.

    Summing (not averaging) makes a 1-channel input x respond exactly as the RGB filters respond to
    the grey image (x, x, x), so the pretrained token statistics carry over; this is timm's
    ``adapt_input_conv(1, w)`` and AST's adaptation of ImageNet ViTs to spectrograms. A different
    patch size (e.g. 16x16 audio patches from a /14 ViT) is resampled with FlexiViT's
    pseudo-inverse resize (``timm.layers.resample_patch_embed``), which keeps the response to the
    correspondingly resized patch, rather than plain interpolation, which would scale it.
    """
    w = ts[0].float().sum(dim=1, keepdim=True)
    if tuple(w.shape[-2:]) != tuple(shape[-2:]):
        w = resample_patch_embed(w, list(shape[-2:]), interpolation="bicubic", antialias=True)
    return w


def _pos_embed(ts: list[torch.Tensor], shape: Shape, new_grid: list[int], prefix: int = 1) -> torch.Tensor:
    """(1, prefix + n, D) on a square sqrt(n) grid -> (1, prefix + gh * gw, D) (bicubic, timm)."""
    v = ts[0].float()
    n = v.shape[1] - prefix
    side = math.isqrt(n)
    if [side, side] == list(new_grid):
        return v
    return resample_abs_pos_embed(v, new_size=list(new_grid), old_size=[side, side], num_prefix_tokens=prefix)


def _qkv_bias(ts: list[torch.Tensor], shape: Shape) -> torch.Tensor:
    """EVA/BEiT keep q and v biases apart and no k bias: qkv.bias = [q_bias, 0, v_bias]."""
    q, v = ts
    return torch.cat([q, torch.zeros_like(q), v])


def _rows(ts: list[torch.Tensor], shape: Shape) -> torch.Tensor:
    """Vocabulary rows (n, H) -> (N, H), N >= n: the old rows, then new rows at their mean.

    Tokens our tokenizer adds to Llama-2's (``<pad>``, ``<mask>``) start at the mean embedding and the
    mean output row, which keeps the pretrained model's predictions nearly unchanged at step 0
    (Hewitt 2021, "Initializing new word embeddings for pretrained language models").
    """
    w = ts[0]
    if w.shape[0] == shape[0]:
        return w
    extra = w.float().mean(dim=0, keepdim=True).expand(shape[0] - w.shape[0], -1).to(w.dtype)
    return torch.cat([w, extra])


def _zero_bias(ts: list[torch.Tensor], shape: Shape) -> torch.Tensor:
    """A bias the checkpoint's layer does not have (CLIP's bias-free patch embedding): zeros."""
    return torch.zeros(shape, dtype=ts[0].dtype)


OPS: dict[str, Callable[..., torch.Tensor]] = {
    "copy": _copy,
    "sum_in_chans": _sum_in_chans,
    "pos_embed": _pos_embed,
    "qkv_bias": _qkv_bias,
    "rows": _rows,
    "zero_bias": _zero_bias,
}


def shape_error(conv: Conversion, src: list[Shape], target: Shape) -> str | None:
    """Why ``conv`` cannot produce ``target`` from sources of shapes ``src`` (None when it can)."""
    op, t = conv.op, tuple(target)
    prefix = conv.args.get("prefix", 1)
    ok = {
        "copy": lambda: src[0] == t,
        "sum_in_chans": lambda: len(src[0]) == 4 and len(t) == 4 and src[0][0] == t[0] and t[1] == 1,
        "pos_embed": lambda: (
            len(src[0]) == 3
            and src[0][2] == t[2]
            and math.isqrt(src[0][1] - prefix) ** 2 == src[0][1] - prefix
            and t[1] == prefix + math.prod(conv.args["new_grid"])
        ),
        "qkv_bias": lambda: len(src) == 2 and src[0] == src[1] and len(t) == 1 and t[0] == 3 * src[0][0],
        "rows": lambda: len(src[0]) == 2 and len(t) == 2 and src[0][1] == t[1] and src[0][0] <= t[0],
        "zero_bias": lambda: len(t) == 1 and t[0] == src[0][0],
    }
    if op not in ok:
        return f"unknown conversion op {op!r}"
    if ok[op]():
        return None
    return f"{conv.target} {t} cannot be made by {op} from {list(conv.sources)} {src}"


def check_plan(
    plan: list[Conversion], source_shapes: dict[str, Shape], target_shapes: dict[str, Shape], where: str
) -> None:
    """Every target covered exactly once, every source present, every shape compatible.

    Raises:
        ValueError: naming ``where`` (the checkpoint), the uncovered targets and the bad rows.
    """
    targets = [c.target for c in plan]
    dup = sorted({t for t in targets if targets.count(t) > 1})
    missing = sorted(set(target_shapes) - set(targets))
    unknown = sorted(set(targets) - set(target_shapes))
    problems = []
    if missing:
        problems.append(f"parameters the checkpoint does not provide: {missing[:10]}")
    if unknown or dup:
        problems.append(f"plan rows for unknown/duplicate parameters: {unknown[:10]} {dup[:10]}")
    for c in plan:
        if c.target not in target_shapes:
            continue
        absent = [s for s in c.sources if s not in source_shapes]
        if absent:
            problems.append(f"{c.target}: checkpoint keys {absent} are missing")
            continue
        err = shape_error(c, [source_shapes[s] for s in c.sources], target_shapes[c.target])
        if err:
            problems.append(err)
    if problems:
        more = f" (and {len(problems) - 8} more)" if len(problems) > 8 else ""
        raise ValueError(f"{where}: does not fit this model: " + "; ".join(problems[:8]) + more)


def order_by_file(plan: list[Conversion], key_to_file: dict[str, Path] | None) -> list[Conversion]:
    """The plan sorted so each shard file is read in one pass (stable within a file)."""
    if not key_to_file:
        return list(plan)
    files = list(dict.fromkeys(key_to_file.values()))
    rank = {f: i for i, f in enumerate(files)}
    return sorted(plan, key=lambda c: max(rank[key_to_file[s]] for s in c.sources))


def materialize(conv: Conversion, reader: CheckpointReader | DictReader, target_shape: Shape) -> torch.Tensor:
    """The tensor of one plan row (CPU, the checkpoint's dtype or float32)."""
    out = OPS[conv.op]([reader.get(s) for s in conv.sources], tuple(target_shape), **conv.args)
    if tuple(out.shape) != tuple(target_shape):
        raise ValueError(f"{reader.path}: {conv.target} came out {tuple(out.shape)}, expected {target_shape}")
    return out


def full_shape(p: torch.Tensor) -> Shape:
    """A parameter's logical shape (ZeRO-3 keeps it in ``ds_shape`` while ``p`` holds a partition)."""
    return tuple(getattr(p, "ds_shape", p.shape))


def target_shapes(module: nn.Module) -> dict[str, Shape]:
    return {n: full_shape(p) for n, p in module.named_parameters()}


def load_plan_into(
    module: nn.Module, plan: Iterable[Conversion], reader: CheckpointReader | DictReader
) -> None:
    """Copy every plan row into a plain (not partitioned) module, one tensor at a time."""
    params = dict(module.named_parameters())
    with torch.no_grad():
        for conv in plan:
            p = params[conv.target]
            p.copy_(materialize(conv, reader, tuple(p.shape)))
