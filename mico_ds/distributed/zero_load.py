"""Pretrained weights from local paths into the model the engine will wrap, ZeRO-3 partitions included.

Under ZeRO-3 ``deepspeed.zero.Init`` has already partitioned every parameter when the model exists, so
the weights cannot be loaded with ``load_state_dict`` (that would need the whole model on one rank).
Instead, for each parameter in turn: rank 0 reads the tensor it comes from (one shard file open, one
tensor in memory, ``mico_ds.checkpoint.formats.reader.CheckpointReader``) and converts it
(position-table resampling, 1-channel patch embeddings, vocabulary growth: the plans of the format
adapters in ``mico_ds.checkpoint.formats``); all ranks
gather that one parameter (``deepspeed.zero.GatheredParameters([p], modifier_rank=0)``), rank 0 writes
it, and leaving the context broadcasts it and re-partitions it. Peak extra memory: one full parameter
on every rank plus one shard's pages and one converted tensor on rank 0.

The plan (names and shapes only) is built and checked on rank 0 and broadcast, so a checkpoint that
does not fit fails on every rank with the same message before any tensor is read, and only rank 0
needs to read the weight files (every rank reads the Llama directory's small config.json when the
model is built). Without ZeRO-3 every rank holds the whole model and loads it itself.

Weights are written before ``deepspeed.initialize``, so the fp32 master copy starts from them (rounded
to bf16 first when the model is bf16, as it is on GPUs: Llama-2's released weights are fp16 anyway).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from mico_ds import distributed as mdist
from mico_ds.checkpoint.formats.hf_llama import hf_llama_plan
from mico_ds.checkpoint.formats.reader import (
    CheckpointReader,
    Conversion,
    load_plan_into,
    materialize,
    order_by_file,
)
from mico_ds.checkpoint.formats.timm import timm_plan
from mico_ds.config import ModelConfig

log = logging.getLogger("mico_ds")

PlanFn = Callable[[dict[str, tuple[int, ...]], nn.Module, str], list[Conversion]]


@dataclass
class LoadReport:
    """What one branch's load did (logged; the tests check the memory claims with it)."""

    branch: str
    path: str
    tensors: int
    files_read: int  # shard files rank 0 opened (each once, in order)
    max_gathered_numel: int  # largest parameter gathered at once: one parameter at a time
    seconds: float


def load_pretrained(model: nn.Module, cfg: ModelConfig, zero3: bool) -> list[LoadReport]:
    """Load ``model.vision.pretrained`` into ``model.encoder`` and ``model.text.pretrained`` into
    ``model.text`` (whichever are set); call on every rank, after construction, before the engine."""
    reports = []
    if cfg.vision.pretrained:
        reports.append(load_branch(model.encoder, "encoder", cfg.vision.pretrained, timm_plan, zero3))
    if cfg.text.pretrained:
        reports.append(load_branch(model.text, "text", cfg.text.pretrained, hf_llama_plan, zero3))
    for r in reports:
        if mdist.is_main_process():
            log.info(
                "loaded %s from %s: %d tensors, %d file(s), largest gathered parameter %d elements, %.1f s",
                r.branch, r.path, r.tensors, r.files_read, r.max_gathered_numel, r.seconds,
            )  # fmt: skip
    return reports


def load_branch(
    module: nn.Module, branch: str, path: str, make_plan: PlanFn, zero3: bool, label: str | None = None
) -> LoadReport:
    """One branch (``encoder`` or ``text``) from ``path`` through ``make_plan``; errors start with
    ``label`` (default: the config key that names the path)."""
    t0 = time.perf_counter()
    rank = mdist.get_rank()
    reads = rank == 0 or not zero3
    reader: CheckpointReader | None = None
    plan: list[Conversion] | None = None
    error: str | None = None
    if reads:
        try:
            reader = CheckpointReader(Path(path))
            plan = order_by_file(make_plan(reader.shapes(), module, str(path)), reader.key_to_file)
        except (ValueError, OSError) as e:
            error = str(e)
    if zero3:  # every rank walks rank 0's plan, or fails with rank 0's message
        plan, error = mdist.broadcast_object((plan, error))
    if error is not None:
        raise ValueError(f"{label or f'model.{branch_key(branch)}.pretrained'}: {error}")
    assert plan is not None
    try:
        if not zero3:
            assert reader is not None
            load_plan_into(module, plan, reader)
            largest = max((p.numel() for p in module.parameters()), default=0)
        else:
            largest = load_plan_zero3(module, plan, reader, path)
    finally:
        if reader is not None:
            reader.close()
    files = len(reader.files_opened) if reader is not None else 0
    return LoadReport(branch, str(path), len(plan), files, largest, time.perf_counter() - t0)


def load_plan_zero3(
    module: nn.Module, plan: list[Conversion], reader: CheckpointReader | None, path: str
) -> int:
    """Gather one parameter at a time; rank 0 (which alone holds ``reader``) writes it; leaving the
    context broadcasts and re-partitions. A failure is raised on every rank, prefixed with ``path``.
    Returns the largest parameter's element count."""
    import deepspeed

    rank = mdist.get_rank()
    params = dict(module.named_parameters())
    failed: str | None = None
    largest = 0
    for conv in plan:
        p = params[conv.target]
        largest = max(largest, int(getattr(p, "ds_numel", p.numel())))
        with deepspeed.zero.GatheredParameters([p], modifier_rank=0), torch.no_grad():
            if rank == 0 and failed is None:
                try:
                    p.data.copy_(materialize(conv, reader, tuple(p.shape)))  # type: ignore[arg-type]
                except Exception as e:  # reported on every rank below: never a hang in the next gather
                    failed = f"{path}: {conv.target}: {type(e).__name__}: {e}"
    raise_on_every_rank(failed)
    return largest


def branch_key(branch: str) -> str:
    return "vision" if branch == "encoder" else "text"


def raise_on_every_rank(failed: str | None) -> None:
    """Rank 0's error (None: none) raised on every rank: a failure on one rank is never a hang of
    the others in their next collective."""
    failed = mdist.broadcast_object(failed)
    if failed is not None:
        raise ValueError(failed)


def load_state_dict_into(
    model: nn.Module, sd: dict[str, torch.Tensor] | None, where: str, zero3: bool
) -> None:
    """Load a whole consolidated state dict (``sd``: on rank 0; None elsewhere under ZeRO-3) strictly.

    Under ZeRO-3 every parameter is gathered for the copy and re-partitioned after it (rank 0 holds
    the whole model for that moment: evaluation of an exported or re-partitioned checkpoint).
    """

    def load(m: nn.Module) -> None:
        assert sd is not None
        missing, unexpected = m.load_state_dict(sd, strict=False)
        if missing or unexpected:
            raise ValueError(
                f"{where} does not fit the model of the config: missing {missing[:8]} ({len(missing)}), "
                f"unexpected {unexpected[:8]} ({len(unexpected)})"
            )

    if not zero3:
        load(model)
        return
    import deepspeed

    failed: str | None = None
    with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=0):
        if mdist.is_main_process():
            try:
                load(model)
            except ValueError as e:
                failed = str(e)
    raise_on_every_rank(failed)
