"""The step guard: non-finite steps are skipped, loss spikes and runs of bad steps roll back.

Every micro-batch, all ranks agree in one small all_reduce whether any loss term is finite on every
rank, and on the global mean loss. A micro-batch that is not finite anywhere gets a poisoned backward
(its loss times NaN), so every gradient of the step is NaN and the optimizer skips the whole step:
DeepSpeed's ZeRO-1/2/3 and bf16 optimizers discard a step whose global gradient norm is not finite
(no parameter, moment or schedule update; ``engine.was_step_applied()`` is False), which also covers a
finite loss whose gradient overflowed. ZeRO-0 with a plain torch optimizer has no such check: there the
trainer drops the gradients itself (see ``Trainer.train_step``).

After each step :meth:`StepGuard.after_step` decides whether to roll back: after
``train.max_bad_steps`` skipped steps in a row, or when the step's loss rises above the spike rule
(``train.spike_sigmas`` standard deviations over the mean of the trailing ``train.spike_window``
steps; the deviation counts as at least 1% of that mean, so a flat plateau does not turn noise into
spikes). A rollback reloads the newest checkpoint and skips the data consumed since it (PaLM's remedy,
Chowdhery et al. 2022, section 5.1); :class:`DataSkips` records the skip in ``RUN_DIR/data_skips.json``
so that a later resume from that checkpoint skips the same window again.

A run in which nothing goes wrong computes exactly what it computed without the guard: the guard
adds one all_reduce of two numbers per micro-batch and reads nothing else.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mico_ds import distributed as mdist

log = logging.getLogger("mico_ds")

SKIPS_FILE = "data_skips.json"
SPIKE_FLOOR = 0.01  # the spike rule's deviation is at least this fraction of the trailing mean


@dataclass
class Verdict:
    """What the guard says after a step: roll back (and why) or go on."""

    rollback: bool = False
    reason: str = ""


class StepGuard:
    """Counts skipped steps and watches the loss for spikes (all ranks hold the same state).

    Args:
        max_bad_steps: skipped steps in a row that trigger a rollback (0: never roll back for them).
        spike_sigmas: the spike rule's k (0: no spike rule).
        spike_window: trailing steps the rule compares against; it is armed once the window is full.
    """

    def __init__(self, max_bad_steps: int, spike_sigmas: float, spike_window: int) -> None:
        self.max_bad_steps = max_bad_steps
        self.spike_sigmas = spike_sigmas
        self.window: deque[tuple[int, float]] = deque(maxlen=max(1, spike_window))
        self.in_a_row = 0
        self.skipped = 0
        self.rollbacks = 0
        self._sums: torch.Tensor | None = None  # this step's [loss sum over good micro-batches, good, bad]

    def check_micro(self, losses: dict[str, torch.Tensor]) -> torch.Tensor:
        """Whether any loss term of this micro-batch is not finite on any rank (a collective).

        Returns a 0-dim bool tensor on the loss's device and never waits for the device: on CUDA the
        forward, this all_reduce and the backward stay queued; the step's one read is in
        :meth:`step_was_bad` / :meth:`after_step`.
        """
        terms = torch.stack([v.detach().float().reshape(()) for v in losses.values()])
        finite = torch.isfinite(terms).all()
        loss = torch.where(finite, losses["loss"].detach().double(), 0.0)
        # On the loss's device: an NCCL group reduces CUDA tensors only.
        s = mdist.all_reduce_sum(torch.stack([loss, finite.double(), (~finite).double()]))
        world = mdist.get_world_size()
        bad = s[2] > 0
        good = torch.where(bad, 0.0, torch.stack([s[0] / world, torch.ones_like(s[0])]))
        step = torch.cat([good, bad.double().reshape(1)])
        self._sums = step if self._sums is None else self._sums + step
        return bad

    def step_was_bad(self) -> bool:
        """Whether a micro-batch of the current step was flagged by :meth:`check_micro` (reads it)."""
        return self._sums is not None and bool(self._sums[2] > 0)

    def after_step(self, step: int, applied: bool) -> Verdict:
        """Account for the step that just ended; ``applied``: the optimizer updated the weights."""
        sums = self._sums.tolist() if self._sums is not None else [0.0, 0.0, 0.0]
        loss = sums[0] / sums[1] if sums[1] else math.nan
        self._sums = None
        if not applied:
            self.skipped += 1
            self.in_a_row += 1
            if self.max_bad_steps > 0 and self.in_a_row >= self.max_bad_steps:
                return Verdict(True, f"{self.in_a_row} skipped (non-finite) steps in a row")
            return Verdict()
        self.in_a_row = 0
        spike = self._spike(loss)
        if spike:
            return Verdict(True, spike)
        self.window.append((step, loss))
        return Verdict()

    def _spike(self, loss: float) -> str:
        if self.spike_sigmas <= 0 or len(self.window) < (self.window.maxlen or 1):
            return ""
        vals = [v for _, v in self.window]
        mean = sum(vals) / len(vals)
        std = math.sqrt(sum((v - mean) ** 2 for v in vals) / len(vals))
        dev = max(std, SPIKE_FLOOR * abs(mean))
        limit = mean + self.spike_sigmas * dev
        if loss > limit:
            return (
                f"loss spike: {loss:.4f} > {limit:.4f} (mean {mean:.4f} + {self.spike_sigmas:g} x "
                f"{dev:.4f} over the last {len(vals)} steps)"
            )
        return ""

    def rolled_back(self, to_step: int) -> None:
        """Forget what was seen after ``to_step``: those steps are trained again on other data."""
        self.rollbacks += 1
        self.in_a_row = 0
        kept = [(s, v) for s, v in self.window if s <= to_step]
        self.window.clear()
        self.window.extend(kept)

    def counters(self) -> dict[str, int]:
        return {"guard/skipped_steps": self.skipped, "guard/rollbacks": self.rollbacks}


class DataSkips:
    """``RUN_DIR/data_skips.json``: micro-batches to skip after loading a checkpoint, by its step.

    A rollback to checkpoint step C after the loader had consumed M micro-batches since C records
    ``{"C": {"micro_batches": M, ...}}``; a second rollback to C overwrites it with the new, larger M.
    Only rank 0 writes (temp file + rename); every rank reads.
    """

    def __init__(self, run_dir: Path) -> None:
        self.path = Path(run_dir) / SKIPS_FILE

    def read(self) -> dict[str, dict[str, Any]]:
        try:
            return json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as e:
            raise ValueError(f"{self.path}: unreadable ({e}); delete it only if no rollback happened") from e

    def after(self, step: int, world_size: int) -> int:
        """Micro-batches to skip after loading checkpoint ``step`` (0: none)."""
        rec = self.read().get(str(step))
        if rec is None:
            return 0
        if int(rec["world_size"]) != world_size:
            log.warning(
                "%s: the skip after step %d was recorded with %s ranks, now %d: not applied",
                self.path, step, rec["world_size"], world_size,
            )  # fmt: skip
            return 0
        return int(rec["micro_batches"])

    def record(self, step: int, micro_batches: int, **info: Any) -> None:
        if mdist.get_rank() != 0:
            return
        doc = self.read()
        doc[str(step)] = {"micro_batches": micro_batches, "world_size": mdist.get_world_size(), **info}
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        tmp.write_text(json.dumps(doc, indent=1, sort_keys=True))
        os.replace(tmp, self.path)


# ----------------------------------------------------------------------------- test hook


def injected_faults(step: int, rank: int) -> set[str]:
    """Test hook: ``MICO_TEST_FAULT=STEP:RANK:KIND[,...]`` injects a fault on rank RANK in step STEP.

    KIND is ``raise`` (the step raises), or a fault in the data, carried by the micro-batches that an
    uninterrupted run reads for step STEP (so a rollback that skips them skips the fault too): ``nan``
    (the float inputs become NaN, as from a sample that decodes to NaN) or ``spike`` (the loss is
    multiplied by 100 before backward, as from a batch the model finds far harder). ``worker`` is read by
    the data workers themselves (mico_ds/data/read/stream.py): each worker of rank RANK raises as it
    collates its STEP-th batch.
    """
    kinds = set()
    for item in filter(None, os.environ.get("MICO_TEST_FAULT", "").split(",")):
        s, r, kind = item.split(":")
        if int(s) == step and int(r) == rank:
            kinds.add(kind)
    return kinds


def poison_inputs(batch: dict[str, Any]) -> None:
    """Fill every floating-point input tensor of ``batch`` with NaN (the ``nan`` fault)."""
    for k, v in batch.items():
        if isinstance(v, torch.Tensor) and v.is_floating_point():
            batch[k] = torch.full_like(v, math.nan)
