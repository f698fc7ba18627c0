"""The optimizer's parameter groups and the learning-rate schedule (plain PyTorch).

MiCo appendix B.2: AdamW, lr 1e-4 with linear decay. The optimizer itself is chosen where the engine
is built (``mico_ds.distributed.engine.make_optimizer``: DeepSpeed's CPU Adam under offload).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from mico_ds.config import OptimConfig

# Parameter-name prefixes of the two branches of MiCoModel (their learning-rate scales).
VISION_PREFIX = "encoder."
TEXT_PREFIX = "text."


OPTIM_IMPLS = ("auto", "torch", "apex", "deepspeed")


def resolve_optim_impl(impl: str, cuda: bool, apex_error: str | None, offload: bool) -> str:
    """``optim.impl`` -> "torch" | "apex" | "deepspeed" | "deepspeed_cpu" (offloaded optimizer states).

    auto picks apex's FusedAdam on CUDA when apex's ``amp_C`` extension imports, else torch's AdamW
    (``fused=True`` on CUDA: one multi-tensor kernel, the algorithm of DeepSpeed's FusedAdam, without
    its JIT build at start). ``apex_error`` is ``apex_import_error(APEX_ADAM_MODULES)``'s answer.
    """
    if impl not in OPTIM_IMPLS:
        raise ValueError(f"optim.impl must be one of {'|'.join(OPTIM_IMPLS)}, got {impl!r}")
    if offload:  # ZeRO-Offload steps on the CPU and refuses a client GPU optimizer
        if impl in ("apex", "deepspeed"):
            raise ValueError(f"optim.impl={impl} cannot step offloaded optimizer states; use auto|torch")
        return "deepspeed_cpu"
    if impl == "auto":
        return "apex" if cuda and apex_error is None else "torch"
    if impl in ("apex", "deepspeed") and not cuda:
        raise RuntimeError(f"optim.impl={impl} needs CUDA (a fused GPU optimizer); use auto|torch")
    if impl == "apex" and apex_error is not None:
        raise RuntimeError(
            f"optim.impl=apex but apex's FusedAdam cannot be imported ({apex_error}); build NVIDIA apex "
            "from source with --cuda_ext, or use auto|torch"
        )
    return impl


def lr_lambda(o: OptimConfig, max_steps: int) -> Callable[[int], float]:
    """Warmup then linear decay (MiCo appendix B.2: lr 1e-4 with linear decay), cosine, or constant."""
    total = max(1, max_steps)
    warm = min(o.warmup_steps, total)

    def f(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        if o.schedule == "constant":
            return 1.0
        frac = min(1.0, (step - warm) / max(1, total - warm))
        if o.schedule == "linear":
            return o.min_lr_ratio + (1 - o.min_lr_ratio) * (1 - frac)
        return o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * frac))  # cosine

    return f


def param_groups(model: torch.nn.Module, o: OptimConfig) -> list[dict[str, Any]]:
    """AdamW groups: weight decay on matrices only (by tensor rank), per-branch learning-rate scales.

    Under ZeRO-3 parameters are flattened partitions, so the rank comes from ``ds_shape``.
    A branch whose scale is 0 is frozen (requires_grad=False) rather than given lr 0.
    """
    scales = {VISION_PREFIX: o.vision_lr_scale, TEXT_PREFIX: o.text_lr_scale}
    groups: dict[tuple[bool, float], list[torch.nn.Parameter]] = {}
    for name, p in model.named_parameters():
        scale = next((s for pre, s in scales.items() if name.startswith(pre)), 1.0)
        if scale == 0:
            p.requires_grad_(False)
        if not p.requires_grad:
            continue
        ndim = len(getattr(p, "ds_shape", p.shape))
        groups.setdefault((ndim >= 2, scale), []).append(p)
    return [
        {
            "params": ps,
            "weight_decay": o.weight_decay if decay else 0.0,
            "lr": o.lr * scale,
            "lr_scale": scale,
        }
        for (decay, scale), ps in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1]))
    ]
