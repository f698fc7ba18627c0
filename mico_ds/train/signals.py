"""Preemption: SIGUSR1/SIGTERM set a flag; the loop acts on it at the next step boundary.

No collective is interrupted: the handler only records the signal; at a step boundary all ranks agree
through one small all_reduce (mico_ds.distributed.any_rank), save, and exit with PREEMPTED_EXIT_CODE,
which launch/slurm_pretrain.sh turns into `scontrol requeue`.
"""

from __future__ import annotations

import signal
import time

PREEMPTED_EXIT_CODE = 99  # "checkpoint saved, requeue me"


class StopFlag:
    """Set by a signal or by the wall-clock budget."""

    def __init__(self, max_minutes: float = 0.0) -> None:
        self.reason: str | None = None
        self.deadline = time.monotonic() + max_minutes * 60 if max_minutes > 0 else None
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            signal.signal(sig, self._handler)

    def _handler(self, signum: int, frame: object) -> None:
        self.reason = self.reason or signal.Signals(signum).name
        if signum == signal.SIGUSR1:
            # The stop is recorded; a repeated request must not kill the process while it saves or
            # exits (interpreter shutdown restores SIG_DFL for Python handlers, not for SIG_IGN).
            signal.signal(signal.SIGUSR1, signal.SIG_IGN)

    def local(self) -> bool:
        if self.reason is None and self.deadline is not None and time.monotonic() >= self.deadline:
            self.reason = "max_minutes"
        return self.reason is not None
