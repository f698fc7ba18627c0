"""Weights-only initialization from a pretrained run (``model.init``; ``--init PATH`` of the trainer).

What ``PATH`` may be (resolved on rank 0):

* a mico_ds run directory, its ``checkpoints/`` directory or one checkpoint directory (any ZeRO stage,
  universal checkpoints included; a run directory means its committed ``latest``);
* consolidated weights: a ``.safetensors`` / ``.bin`` / ``.pt`` file or a directory of shards, as
  ``tools/zero_to_fp32.py`` writes them;
* the exported branches of ``tools/zero_to_fp32.py --export-branches`` (a directory holding
  ``vision/`` and ``text/``): loaded through the timm and Hugging Face plans of the pretrained loading;
* the official MiCo release's ``model_step_*.pt`` (a state dict whose keys hold an EVA-CLIP tower under
  ``vision_encoder.visual.``): converted by the plan of ``mico_ds.checkpoint.formats.mico_release``
  instead of the name match (kind ``mico_release``; its unused keys come with the reason of each group).

Only the weights come over: the optimizer, the schedule, the step counter and the data streams start
fresh (``--resume`` is what continues a run). The checkpoint is compared with the model by names and
shapes before any tensor is read: a key both have with different shapes is an error naming it; keys the
model adds (a task head) keep their initialization and are listed; keys the checkpoint has and the
model does not use are listed. Under ZeRO-3 the parameters are loaded one at a time into their
partitions, as ``mico_ds.distributed.zero_load`` does for pretrained branches: rank 0 reads one tensor
(a ZeRO-3 checkpoint is read through DeepSpeed's lazy consolidation, which assembles one parameter
from the memory-mapped partitions when asked), every rank gathers that one parameter, rank 0 writes it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mico_ds import distributed as mdist
from mico_ds.checkpoint.formats.hf_llama import hf_llama_plan
from mico_ds.checkpoint.formats.mico_release import is_mico_release, mico_release_plan
from mico_ds.checkpoint.formats.reader import CheckpointReader, Conversion, materialize, target_shapes
from mico_ds.checkpoint.formats.timm import timm_plan
from mico_ds.checkpoint.layout import locate
from mico_ds.distributed.zero_load import branch_key, load_branch, load_plan_zero3

log = logging.getLogger("mico_ds")

Shape = tuple[int, ...]


@dataclass
class InitReport:
    """What ``model.init`` loaded (logged, and written to the run's ``init.json``)."""

    source: str  # the resolved checkpoint: a tag directory, a state-dict path or an export directory
    kind: str  # "zero", "state_dict", "branches" or "mico_release"
    loaded: list[str] = field(default_factory=list)
    added: list[str] = field(default_factory=list)  # the model's parameters the checkpoint lacks
    unused: list[str] = field(default_factory=list)  # the checkpoint's tensors the model has no use for
    seconds: float = 0.0
    reasons: dict[str, str] = field(default_factory=dict)  # mico_release: group of unused keys -> why

    def summary(self) -> str:
        def names(xs: list[str]) -> str:
            return ", ".join(xs[:12]) + (f", ... ({len(xs)} in all)" if len(xs) > 12 else "")

        out = f"init from {self.source} ({self.kind}): {len(self.loaded)} loaded in {self.seconds:.1f} s"
        if self.added:
            out += f"; initialized by the model, not in the checkpoint: {names(self.added)}"
        if self.unused:
            out += f"; in the checkpoint, unused by the model: {names(self.unused)}"
        if self.reasons:
            out += "; unused because: " + "; ".join(f"{g}: {why}" for g, why in self.reasons.items())
        return out


def is_branch_export(p: Path) -> bool:
    return p.is_dir() and (p / "vision").is_dir() and (p / "text").is_dir()


def match_keys(have: Mapping[str, Shape], want: Mapping[str, Shape], where: str) -> tuple[list, list, list]:
    """(loaded, added, unused) key lists; raises ValueError naming every key whose shapes differ."""
    bad = [f"{k}: checkpoint {tuple(have[k])}, model {tuple(want[k])}" for k in want if k in have
           and tuple(have[k]) != tuple(want[k])]  # fmt: skip
    if bad:
        raise ValueError(f"{where}: {len(bad)} tensor(s) do not fit the model: " + "; ".join(bad))
    loaded = [k for k in want if k in have]
    if not loaded:
        raise ValueError(
            f"{where}: no tensor name in common with the model (checkpoint keys start "
            f"{sorted(have)[:3]}, the model's {list(want)[:3]})"
        )
    return loaded, [k for k in want if k not in have], [k for k in have if k not in want]


class _Source:
    """Rank 0's lazy view of the checkpoint: names, shapes, and one tensor at a time."""

    def __init__(self, path: str) -> None:
        loc = locate(path, state_dicts=True, flag="--init")
        self.where = str(loc.tag_dir)
        self.path = Path(self.where)  # a reader for materialize(), which names it in its errors
        self.kind = loc.kind
        self._reader: CheckpointReader | None = None
        if loc.kind == "zero":
            from mico_ds.distributed.zero_checkpoint import fp32_state_dict

            self._lazy: Mapping[str, Any] = fp32_state_dict(loc.path, str(loc.tag))
            self.shapes = {k: tuple(v.shape) for k, v in self._lazy.items()}
        else:
            self._reader = CheckpointReader(loc.path)
            self.shapes = self._reader.shapes()

    def get(self, key: str) -> torch.Tensor:
        if self._reader is not None:
            return self._reader.get(key)
        return self._lazy[key].contiguous()

    def close(self) -> None:
        if self._reader is not None:
            self._reader.close()


# (where, kind, rows, added, unused, reasons): built on rank 0, broadcast, walked by every rank.
_Plan = tuple[str, str, list[Conversion], list[str], list[str], dict[str, str]]


def _plan(src: _Source, model: nn.Module) -> _Plan:
    """The release's conversion plan for a MiCo release state dict; else the identity name match."""
    where = f"--init {src.where}"
    if src.kind == "state_dict" and is_mico_release(src.shapes):
        src.kind = "mico_release"
        rp = mico_release_plan(src.shapes, model, where)
        return src.where, src.kind, rp.rows, rp.added, rp.unused, rp.reasons
    loaded, added, unused = match_keys(src.shapes, target_shapes(model), where)
    return src.where, src.kind, [Conversion(k, (k,)) for k in loaded], added, unused, {}


def init_from(model: nn.Module, path: str, zero3: bool) -> InitReport:
    """Load the weights at ``path`` into ``model`` (every rank; after construction, before the engine)."""
    t0 = time.perf_counter()
    p = Path(path)
    if is_branch_export(p):
        report = InitReport(str(p), "branches")
        branches = (("encoder", model.encoder, timm_plan), ("text", model.text, hf_llama_plan))
        for branch, module, plan in branches:
            r = load_branch(module, branch, str(p / branch_key(branch)), plan, zero3, label=f"--init {p}")
            report.loaded.append(f"{branch}: {r.tensors} tensors")
        own = {n for n, _ in model.encoder.named_parameters(prefix="encoder")}
        own |= {n for n, _ in model.text.named_parameters(prefix="text")}
        report.added = [n for n, _ in model.named_parameters() if n not in own]
        report.seconds = time.perf_counter() - t0
        return report

    reads = mdist.get_rank() == 0 or not zero3
    src: _Source | None = None
    plan: _Plan | None = None
    error: str | None = None
    if reads:
        try:
            src = _Source(path)
            plan = _plan(src, model)
        except (ValueError, OSError, KeyError) as e:
            error = str(e) if str(e).startswith("--init") else f"--init {path}: {e}"
    if zero3:
        plan, error = mdist.broadcast_object((plan, error))
    if error is not None:
        if src is not None:
            src.close()
        raise ValueError(error)
    assert plan is not None
    where, kind, rows, added, unused, reasons = plan
    try:
        if zero3:
            load_plan_zero3(model, rows, src, f"--init {where}")  # type: ignore[arg-type]
        else:
            params = dict(model.named_parameters())
            for conv in rows:
                prm = params[conv.target]
                with torch.no_grad():
                    try:
                        prm.data.copy_(materialize(conv, src, tuple(prm.shape)))  # type: ignore[arg-type]
                    except (ValueError, RuntimeError) as e:  # a bad release value: name the parameter
                        raise ValueError(f"--init {where}: {conv.target}: {e}") from None
    finally:
        if src is not None:
            src.close()
    loaded = [c.target for c in rows]
    return InitReport(where, kind, loaded, added, unused, time.perf_counter() - t0, reasons)
