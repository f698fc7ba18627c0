"""Preemption: SIGUSR1/SIGTERM set a flag; the loop acts on it at the next step boundary.

No collective is interrupted: the handler only records the signal; at a step boundary all ranks agree
through one small all_reduce (mico_ds.distributed.any_rank), save, and exit with PREEMPTED_EXIT_CODE,
which launch/slurm_pretrain.sh turns into `scontrol requeue`.

Data-loader workers must survive the same signals: `scancel`, SLURM's preemption and the DeepSpeed
launcher send SIGTERM to every process of the job, and torch's worker handler dies on a SIGTERM that
does not come from its parent, which the trainer then reports as "DataLoader worker ... is killed by
signal: Terminated" in the middle of a step. :func:`shield_children` keeps the stop signals blocked
while the trainer may fork workers, so they stay pending in the workers for good (the workers still
exit when the trainer does: torch's worker watchdog). The trainer still gets them: through one of its
other threads (the mask is per thread) or when the block ends.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

PREEMPTED_EXIT_CODE = 99  # "checkpoint saved, requeue me"
STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


@contextlib.contextmanager
def shield_children() -> Iterator[None]:
    """Block the stop signals in this thread for the duration; processes forked meanwhile inherit the
    mask and never see them. A stop signal sent to the process meanwhile is taken by another thread or
    delivered when the block ends; the Python handler runs in the main thread either way."""
    old = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def process_age_s() -> float:
    """Seconds since this process started (Linux /proc), 0 where that cannot be read."""
    try:
        start_ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return max(0.0, uptime - start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return 0.0


class StopFlag:
    """Set by a signal or by the wall-clock budget.

    The budget (``train.max_minutes``) counts from the start of the process: building the model and
    loading the checkpoint spend the same allocation as the steps do.
    """

    def __init__(self, max_minutes: float = 0.0) -> None:
        self.reason: str | None = None
        self.deadline = None
        if max_minutes > 0:
            self.deadline = time.monotonic() + max_minutes * 60 - process_age_s()
        for sig in STOP_SIGNALS:
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
