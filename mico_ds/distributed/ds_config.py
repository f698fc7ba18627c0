"""The DeepSpeed JSON of a run: engine settings from ``mico_ds/ds_configs/``, every ``"auto"`` field
filled from the recipe, every disagreement an error that names the values involved.

The recipe owns the batch sizes (per corpus, MiCo appendix B.2), gradient accumulation and clipping,
and precision (``train.precision``); the JSON owns the ZeRO stage, buckets and offload. This module
reads JSON only; it does not import DeepSpeed.
"""

from __future__ import annotations

import json
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any

import torch

from mico_ds import resources
from mico_ds.config import RunConfig

AUTO = "auto"


def find_ds_config(name_or_path: str) -> Traversable | Path:
    """A DeepSpeed JSON by path or by name in ``mico_ds/ds_configs/``."""
    return resources.find(resources.DS_CONFIGS, name_or_path, ".json", "train.ds_config")


def list_ds_configs() -> list[str]:
    """The JSON file names shipped in ``mico_ds/ds_configs/``."""
    return [f"{n}.json" for n in resources.names(resources.DS_CONFIGS, ".json")]


def resolve_precision(precision: str) -> str:
    """``train.precision`` -> "bf16" | "fp32" (auto: bf16 on a CUDA device that supports it)."""
    if precision == AUTO:
        return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp32"
    return precision


def use_bf16(cfg: RunConfig) -> bool:
    return resolve_precision(cfg.train.precision) == "bf16"


def micro_batch_size(cfg: RunConfig) -> int:
    """Per-rank micro-batch size DeepSpeed is told about.

    Corpora have their own batch sizes (MiCo appendix B.2); DeepSpeed only uses this number for its
    throughput accounting, so it is the largest corpus batch size.
    """
    if not cfg.data.corpora:
        raise ValueError("data.corpora is empty: a run needs at least one corpus")
    return max(c.batch_size or 0 for c in cfg.data.corpora)


def resolve_ds_config(cfg: RunConfig, world_size: int) -> dict[str, Any]:
    """Load the recipe's DeepSpeed JSON and fill every "auto" field from the recipe.

    Also resolves each corpus's per-rank batch size for ``world_size`` (``global_batch_size``).

    Raises:
        ValueError: naming every factor when explicit batch fields disagree with the world size, and
            the values when the JSON's precision disagrees with ``train.precision``.
    """
    path = find_ds_config(cfg.train.ds_config)
    try:
        ds = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON: {e}") from None
    accum = cfg.optim.grad_accum
    cfg.data.resolve_batch_sizes(world_size, accum)  # checks both factors
    micro = micro_batch_size(cfg)

    def fill(key: str, value: Any) -> None:
        if ds.get(key, AUTO) == AUTO:
            ds[key] = value

    fill("train_micro_batch_size_per_gpu", micro)
    fill("gradient_accumulation_steps", accum)
    fill("train_batch_size", micro * accum * world_size)
    fill("gradient_clipping", cfg.optim.grad_clip)
    m, a, t = ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"], ds["train_batch_size"]
    if m * a * world_size != t:
        raise ValueError(
            f"{path.name}: train_batch_size={t} must equal train_micro_batch_size_per_gpu={m} x "
            f"gradient_accumulation_steps={a} x world_size={world_size} (= {m * a * world_size}); "
            f"recipe: largest corpus batch_size={micro}, optim.grad_accum={accum}"
        )
    if m != micro or a != accum:
        raise ValueError(
            f"{path.name}: train_micro_batch_size_per_gpu={m}, gradient_accumulation_steps={a} disagree "
            f"with the recipe (largest corpus batch_size={micro}, optim.grad_accum={accum}); set them to "
            f'"auto" so the recipe decides'
        )
    _fill_precision(ds, cfg.train.precision, path.name)
    if "optimizer" in ds or "scheduler" in ds:
        raise ValueError(
            f"{path.name}: optimizer/scheduler belong to the recipe (optim.*), not the DeepSpeed JSON; "
            f"remove the keys {[k for k in ('optimizer', 'scheduler') if k in ds]}"
        )
    z = ds.get("zero_optimization", {})
    misplaced = [k for k in ds if k.startswith("stage3_")]
    if misplaced:
        raise ValueError(f"{path.name}: {misplaced} must be inside zero_optimization")
    if z.get("stage", 0) not in (0, 1, 2, 3):
        raise ValueError(f"{path.name}: zero_optimization.stage must be 0-3, got {z.get('stage')}")
    return ds


def _fill_precision(ds: dict[str, Any], precision: str, name: str) -> None:
    """``bf16.enabled`` from ``train.precision``; an explicit value must agree with it. fp16 (loss
    scaling) is not supported: bf16 trains without it on every GPU this project targets."""
    want = resolve_precision(precision) == "bf16"
    block = ds.setdefault("bf16", {})
    have = block.get("enabled", AUTO)
    if have == AUTO:
        block["enabled"] = want
    elif have is not want:
        raise ValueError(
            f"{name}: bf16.enabled={json.dumps(have)} disagrees with train.precision={precision!r} "
            f'(bf16 {"on" if want else "off"} here); set it to "auto" so the recipe decides'
        )
    if ds.get("fp16", {}).get("enabled") is True:
        raise ValueError(f"{name}: fp16 is not supported (use train.precision=bf16); set fp16.enabled=false")


def zero_stage(ds: dict[str, Any]) -> int:
    return int(ds.get("zero_optimization", {}).get("stage", 0))


def offloads_optimizer(ds: dict[str, Any]) -> bool:
    """True when ZeRO keeps the optimizer states on the CPU or NVMe (``offload_optimizer.device``)."""
    off = ds.get("zero_optimization", {}).get("offload_optimizer") or {}
    return off.get("device", "none") in ("cpu", "nvme")
