"""DeepSpeed glue: the process group and the engine, built in one straight-line function.

Parallelism is applied from outside the model in :func:`build_engine`: construction under
``deepspeed.zero.Init`` (ZeRO-3: no rank ever holds the whole model), pretrained weights into the
partitions (``mico_ds.distributed.zero_load``), the optimizer and schedule, ``deepspeed.initialize``.
The engine JSON is resolved against the recipe by ``mico_ds.distributed.ds_config``.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
from collections.abc import Callable
from typing import Any

import torch

from mico_ds import distributed as mdist
from mico_ds.config import RunConfig
from mico_ds.distributed.ds_config import offloads_optimizer, resolve_ds_config, zero_stage
from mico_ds.distributed.init_load import InitReport, init_from
from mico_ds.kernels.norms import APEX_ADAM_MODULES, apex_import_error, resolve_norm_impl, swap_norms
from mico_ds.optim import lr_lambda, param_groups, resolve_optim_impl

log = logging.getLogger("mico_ds")


def init_distributed(timeout_s: float) -> None:
    """Start the process group (NCCL on CUDA, gloo on CPU) through DeepSpeed's launcher conventions;
    a process started without a launcher becomes a one-rank world."""
    import deepspeed

    if "RANK" not in os.environ:  # a plain `python -m mico_ds.train` single process
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(mdist.get_local_rank())
    deepspeed.init_distributed(dist_backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
    unlink_shm_buffers()
    configure_threads(int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("LOCAL_SIZE", "1"))))


def configure_threads(local_world_size: int) -> None:
    """Give each CPU rank its share of cores (the deepspeed launcher leaves every rank on all cores)."""
    if torch.cuda.is_available() or os.environ.get("OMP_NUM_THREADS"):
        return
    n = max(1, (os.cpu_count() or 1) // max(1, local_world_size))
    torch.set_num_threads(n)


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


def make_optimizer(groups: list[dict[str, Any]], cfg: RunConfig, ds: dict[str, Any]) -> torch.optim.Optimizer:
    """AdamW of ``optim.impl`` (:func:`mico_ds.optim.resolve_optim_impl`): DeepSpeed's CPU Adam when
    the optimizer states are offloaded, apex's or DeepSpeed's FusedAdam, or torch's (fused on CUDA)."""
    o = cfg.optim
    cuda = torch.cuda.is_available()
    impl = resolve_optim_impl(o.impl, cuda, apex_import_error(APEX_ADAM_MODULES), offloads_optimizer(ds))
    kw = dict(lr=o.lr, betas=tuple(o.betas), eps=o.eps)
    if impl == "deepspeed_cpu":
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, adamw_mode=True, **kw)
    if impl == "apex":
        from apex.optimizers import FusedAdam

        return FusedAdam(groups, adam_w_mode=True, **kw)
    if impl == "deepspeed":
        from deepspeed.ops.adam import FusedAdam as DeepSpeedFusedAdam

        return DeepSpeedFusedAdam(groups, adam_w_mode=True, **kw)
    return torch.optim.AdamW(groups, fused=cuda or None, **kw)


def swap_model_norms(model: torch.nn.Module, cfg: RunConfig) -> str:
    """Put ``model.norm_impl``'s kernels into ``model`` (before the engine registers its hooks);
    returns a line for the log."""
    impl = resolve_norm_impl(cfg.model.norm_impl, torch.cuda.is_available(), apex_import_error())
    counts = swap_norms(model, impl)
    return f"norms: {impl} ({', '.join(f'{k} x{v}' for k, v in sorted(counts.items())) or 'none found'})"


def build_engine(
    cfg: RunConfig, model_fn: Callable[[], torch.nn.Module], init: str | None = None
) -> tuple[Any, dict[str, Any], InitReport | None]:
    """Build the model (under zero.Init at stage 3), load its pretrained weights (then ``init``'s, a
    weights-only start: ``mico_ds.distributed.init_load``) and wrap it in a DeepSpeed engine with the
    recipe's optimizer and schedule.

    ``model_fn()`` constructs the module; returns (engine, resolved DeepSpeed config, what ``init``
    loaded or None).
    """
    import deepspeed

    from mico_ds.distributed.zero_load import load_pretrained

    ds = resolve_ds_config(cfg, mdist.get_world_size())
    zero3 = zero_stage(ds) == 3
    if zero3:
        # Parameters are partitioned as each submodule is built: no rank ever holds the full model.
        with deepspeed.zero.Init(config_dict_or_path=ds):
            model = model_fn()
    else:
        model = model_fn()
    norm_line = swap_model_norms(model, cfg)
    # Before the engine exists, so its fp32 master weights start from the pretrained ones.
    load_pretrained(model, cfg.model, zero3=zero3)
    report = init_from(model, init, zero3=zero3) if init else None
    groups = param_groups(model, cfg.optim)
    optim = make_optimizer(groups, cfg, ds)
    base = lr_lambda(cfg.optim, cfg.train.max_steps)
    sched = torch.optim.lr_scheduler.LambdaLR(optim, [base] * len(groups))
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optim, lr_scheduler=sched, config=ds)
    if mdist.get_rank() == 0:
        log.info("%s; optimizer %s.%s", norm_line, type(optim).__module__, type(optim).__name__)
        if report is not None:
            log.info("%s", report.summary())
    return engine, ds, report
