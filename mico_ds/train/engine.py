"""DeepSpeed glue: resolve the engine JSON against the recipe, build the model under ZeRO-3, wrap it.

This is the one place (with train/loop.py and train/checkpoint.py) that imports DeepSpeed; the model,
losses and data code stay importable without it. Parallelism is applied from outside the model in one
straight-line function, :func:`build_engine`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
from pathlib import Path
from typing import Any

import torch

from mico_ds import distributed as mdist
from mico_ds.config import RunConfig

log = logging.getLogger("mico_ds")

DS_CONFIG_DIR = Path(__file__).resolve().parents[2] / "ds_configs"
AUTO = "auto"


def find_ds_config(name_or_path: str) -> Path:
    """A DeepSpeed JSON by path or by name in ds_configs/."""
    p = Path(name_or_path)
    if p.exists():
        return p
    q = DS_CONFIG_DIR / name_or_path
    if q.exists():
        return q
    known = sorted(x.name for x in DS_CONFIG_DIR.glob("*.json"))
    raise ValueError(f"train.ds_config {name_or_path!r} not found (not a file, not one of {known})")


def micro_batch_size(cfg: RunConfig) -> int:
    """Per-rank micro-batch size DeepSpeed is told about.

    Corpora have their own batch sizes (MiCo appendix B.2); DeepSpeed only uses this number for its
    throughput accounting, so it is the largest corpus batch size.
    """
    if not cfg.data.corpora:
        raise ValueError("data.corpora is empty: a run needs at least one corpus")
    return max(c.batch_size for c in cfg.data.corpora)


def use_bf16(cfg: RunConfig) -> bool:
    if cfg.train.precision == "fp32":
        return False
    if cfg.train.precision == "bf16":
        return True
    if cfg.train.precision != "auto":
        raise ValueError(f"train.precision must be auto|bf16|fp32, got {cfg.train.precision!r}")
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def resolve_ds_config(cfg: RunConfig, world_size: int) -> dict[str, Any]:
    """Load the recipe's DeepSpeed JSON and fill every "auto" field from the recipe.

    Raises ValueError naming every factor when explicit batch fields disagree with the world size.
    """
    path = find_ds_config(cfg.train.ds_config)
    try:
        ds = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON: {e}") from None
    for c in cfg.data.corpora:
        if c.batch_size < 1:
            raise ValueError(f"data.corpora[{c.name}].batch_size must be >= 1, got {c.batch_size}")
    micro = micro_batch_size(cfg)
    accum = cfg.optim.grad_accum
    if accum < 1:
        raise ValueError(f"optim.grad_accum must be >= 1, got {accum}")
    if world_size < 1:
        raise ValueError(f"world size must be >= 1, got {world_size}")

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
    bf16 = use_bf16(cfg)
    ds.setdefault("bf16", {})
    if ds["bf16"].get("enabled", AUTO) == AUTO:
        ds["bf16"]["enabled"] = bf16
    if ds.get("fp16", {}).get("enabled") is True:
        raise ValueError(f"{path.name}: fp16 is not supported (use bf16); set fp16.enabled=false")
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


def zero_stage(ds: dict[str, Any]) -> int:
    return int(ds.get("zero_optimization", {}).get("stage", 0))


def lr_lambda(cfg: RunConfig):
    """Warmup then linear decay (MiCo appendix B.2: lr 1e-4 with linear decay), cosine, or constant."""
    o, total = cfg.optim, max(1, cfg.train.max_steps)
    warm = min(o.warmup_steps, total)

    def f(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        if o.schedule == "constant":
            return 1.0
        frac = (step - warm) / max(1, total - warm)
        frac = min(1.0, frac)
        if o.schedule == "linear":
            return o.min_lr_ratio + (1 - o.min_lr_ratio) * (1 - frac)
        if o.schedule == "cosine":
            return o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * frac))
        raise ValueError(f"optim.schedule must be linear|cosine|constant, got {o.schedule!r}")

    return f


def param_groups(model: torch.nn.Module, cfg: RunConfig) -> list[dict[str, Any]]:
    """AdamW groups: weight decay on matrices only (by tensor rank), per-branch learning-rate scales.

    Under ZeRO-3 parameters are flattened partitions, so the rank comes from ``ds_shape``.
    A branch whose scale is 0 is frozen (requires_grad=False) rather than given lr 0.
    """
    o = cfg.optim
    scales = {"encoder.": o.vision_lr_scale, "text.": o.text_lr_scale}
    groups: dict[tuple[bool, float], list[torch.nn.Parameter]] = {}
    for name, p in model.named_parameters():
        scale = next((s for pre, s in scales.items() if name.startswith(pre)), 1.0)
        if scale == 0:
            p.requires_grad_(False)
        if not p.requires_grad:
            continue
        ndim = len(getattr(p, "ds_shape", p.shape))
        key = (ndim >= 2, scale)
        groups.setdefault(key, []).append(p)
    return [
        {
            "params": ps,
            "weight_decay": o.weight_decay if decay else 0.0,
            "lr": o.lr * scale,
            "lr_scale": scale,
        }
        for (decay, scale), ps in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1]))
    ]


def configure_threads(local_world_size: int) -> None:
    """Give each CPU rank its share of cores (the deepspeed launcher leaves every rank on all cores)."""
    if torch.cuda.is_available() or os.environ.get("OMP_NUM_THREADS"):
        return
    n = max(1, (os.cpu_count() or 1) // max(1, local_world_size))
    torch.set_num_threads(n)


def init_distributed(cfg: RunConfig) -> None:
    """Start the process group (NCCL on CUDA, gloo on CPU) through DeepSpeed's launcher conventions."""
    import datetime

    import deepspeed

    if "RANK" not in os.environ:  # a plain `python -m mico_ds.train` single process
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(mdist.get_local_rank())
    deepspeed.init_distributed(
        dist_backend=backend, timeout=datetime.timedelta(seconds=cfg.train.dist_timeout_s)
    )
    unlink_shm_buffers()
    configure_threads(int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("LOCAL_SIZE", "1"))))


def unlink_shm_buffers() -> None:
    """Remove the name of this rank's DeepSpeed CPU all-reduce buffer from /dev/shm.

    On CPU, DeepSpeed's shared-memory all-reduce creates ``/dev/shm/deepspeed_allreduce_buffer_
    <uid>_<MASTER_ADDR>_<MASTER_PORT>_<rank>`` (66 MiB) per rank and never unlinks it, so every run
    leaves its buffers in RAM (tmpfs) until reboot. Once every rank has mapped every peer's buffer
    (during init_distributed, hence the barrier) the names are no longer needed: unlinking them now
    keeps the mappings valid and leaves nothing behind, whatever way the process ends.
    """
    if torch.cuda.is_available():
        return
    name = (
        f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_"
        f"{os.environ.get('MASTER_PORT', '')}_{mdist.get_rank()}"
    )
    mdist.barrier()
    with contextlib.suppress(FileNotFoundError):
        os.unlink(name)


def offloads_optimizer(ds: dict[str, Any]) -> bool:
    """True when ZeRO keeps the optimizer states on the CPU or NVMe (``offload_optimizer.device``)."""
    off = ds.get("zero_optimization", {}).get("offload_optimizer") or {}
    return off.get("device", "none") in ("cpu", "nvme")


def make_optimizer(groups: list[dict[str, Any]], cfg: RunConfig, ds: dict[str, Any]) -> torch.optim.Optimizer:
    """AdamW: DeepSpeed's CPU Adam when the optimizer states are offloaded (ZeRO-Offload steps them on
    the CPU and refuses a client torch optimizer there), torch's fused AdamW on CUDA, else torch's."""
    o = cfg.optim
    if offloads_optimizer(ds):
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, lr=o.lr, betas=tuple(o.betas), eps=o.eps, adamw_mode=True)
    fused = torch.cuda.is_available()
    return torch.optim.AdamW(groups, lr=o.lr, betas=tuple(o.betas), eps=o.eps, fused=fused or None)


def build_engine(cfg: RunConfig, model_fn) -> tuple[Any, dict[str, Any]]:
    """Build the model (under zero.Init at stage 3), load its pretrained weights (mico_ds.train.pretrained)
    and wrap it in a DeepSpeed engine.

    ``model_fn()`` constructs the module; returns (engine, resolved DeepSpeed config).
    """
    import deepspeed

    from mico_ds.train.pretrained import load_pretrained

    ds = resolve_ds_config(cfg, mdist.get_world_size())
    zero3 = zero_stage(ds) == 3
    if zero3:
        # Parameters are partitioned as each submodule is built: no rank ever holds the full model.
        with deepspeed.zero.Init(config_dict_or_path=ds):
            model = model_fn()
    else:
        model = model_fn()
    # Before the engine exists, so its fp32 master weights start from the pretrained ones.
    load_pretrained(model, cfg, zero3=zero3)
    groups = param_groups(model, cfg)
    optim = make_optimizer(groups, cfg, ds)
    base = lr_lambda(cfg)
    sched = torch.optim.lr_scheduler.LambdaLR(optim, [base] * len(groups))
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optim, lr_scheduler=sched, config=ds)
    return engine, ds


def load_checkpoint(engine: Any, ckpt_dir: Path, tag: str, universal: bool = False) -> str | None:
    """``engine.load_checkpoint`` of one tag; ``universal=True`` loads a universal checkpoint.

    DeepSpeed takes "universal or not" from ``checkpoint.load_universal`` of its config, and reads it only
    inside ``load_checkpoint``; the engine is built before we know what the resume tag holds, so the
    parsed setting is switched on for this call (the same as having it in the JSON) and restored after.

    Two defects of DeepSpeed 0.19.8's ZeRO-3 universal load
    (``stage3.load_hp_checkpoint_state_from_checkpoint_dir_stage3``) are repaired here: it gives EVERY
    param group the hyperparameters of group 0 (ours differ in weight_decay and lr_scale): the saved
    groups are put back; and it puts ONE ``step`` tensor into the Adam state of every sub-group, which
    torch's AdamW then increments in place once per sub-group per step (2 groups: the step count
    grows by 2 a step, skewing bias correction, and later checkpoints inherit the alias): each
    sub-group gets its own copy. ZeRO-1/2 restore each group from its own entries.

    Returns:
        The loaded path, or None when DeepSpeed found nothing to load.
    """
    conf = engine._config
    before = conf.load_universal_checkpoint
    conf.load_universal_checkpoint = universal
    try:
        path, _ = engine.load_checkpoint(str(ckpt_dir), tag=tag)
    finally:
        conf.load_universal_checkpoint = before
    if path is not None and universal and engine.zero_optimization_stage() == 3:
        saved = torch.load(Path(ckpt_dir) / tag / "zero" / "optimizer_state.pt", weights_only=False)
        groups = saved["param_groups"]
        live = engine.optimizer.optimizer.param_groups  # the torch optimizer under ZeRO-3
        if len(groups) != len(live):
            raise ValueError(
                f"{ckpt_dir / tag}: {len(groups)} optimizer param groups saved, {len(live)} now "
                f"(optim.* or frozen branches changed?)"
            )
        for g, s in zip(live, groups):
            g.update({k: v for k, v in s.items() if k != "params"})
        for state in engine.optimizer.optimizer.state.values():
            if torch.is_tensor(state.get("step")):
                state["step"] = state["step"].clone()
    return path
