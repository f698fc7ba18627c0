"""A failing rank ends the job in seconds; a stopped one is named.

Gloo and NCCL only notice a lost peer when its sockets close, and a peer that is alive but cannot
answer (stopped, hung in a system call, a stuck kernel) is only noticed at ``train.dist_timeout_s``.
So the ranks also talk through the run directory, which every rank sees (the checkpoints need it):

* ``RUN_DIR/launch/failure.json``: the first rank whose training raises writes who, where and what
  (created exclusively: the first error wins). Every rank's watch thread (``health.PeerWatch``) polls
  it and ends its own process at once, logging the first error, so the job ends in about a second
  whether the other ranks are computing or waiting inside a collective. ``launch/hostfile.py
  node-run`` polls it too and kills what is left of its node after a grace period (a stopped rank
  cannot end itself).
* ``RUN_DIR/launch/heartbeat/rankR``: each rank's watch thread rewrites ``<unix time> <step>`` every
  few seconds; a failure report names every rank whose heartbeat is stale or whose step lags, on
  any host, so a stopped or hung rank is named by the ranks that time out waiting for it.

A failing rank leaves with ``os._exit`` after its report: an ordinary interpreter exit joins data
workers and threads and can hang, which keeps its sockets open and the others waiting.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import time
from pathlib import Path

log = logging.getLogger("mico_ds")

FAILURE_FILE = Path("launch") / "failure.json"  # launch/hostfile.py reads the same path
HEARTBEAT_DIR = Path("launch") / "heartbeat"
HEARTBEAT_S = 5.0
STALE_S = 3 * HEARTBEAT_S + 5.0  # a heartbeat older than this: the rank is stopped, hung or gone


class FailureNotice:
    """``RUN_DIR/launch/failure.json`` of one launch (``launch_id`` tells a stale file from ours)."""

    def __init__(self, run_dir: Path, launch_id: str) -> None:
        self.path = Path(run_dir) / FAILURE_FILE
        self.launch_id = launch_id

    def clear_stale(self) -> None:
        """Rank 0 at start: a notice of an earlier launch of this run is history."""
        rec = self.read(any_launch=True)
        if rec is not None and rec.get("launch") != self.launch_id:
            with contextlib.suppress(OSError):
                self.path.rename(self.path.with_name(f"failure.{rec.get('launch', 'old')}.json"))

    def post(self, rank: int, step: int, error: str, where: str = "") -> bool:
        """Record this rank's failure unless another rank's came first; True when this one is first.
        ``where``: what the rank was doing (see :func:`where_text`)."""
        rec = {
            "launch": self.launch_id, "rank": rank, "host": socket.gethostname(), "pid": os.getpid(),
            "step": step, "where": where, "error": error, "time": time.time(),
        }  # fmt: skip
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        except OSError as e:  # a read-only or full run directory must not hide the real error
            log.warning("could not write %s: %s", self.path, e)
            return False
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(rec))
        return True

    def read(self, any_launch: bool = False) -> dict | None:
        try:
            rec = json.loads(self.path.read_text())
        except (OSError, ValueError):  # absent, or being written
            return None
        return rec if any_launch or rec.get("launch") == self.launch_id else None


def where_text(step: int, phase: str = "") -> str:
    """'in step 5' while step 5 trains; 'in the save after step 4' (or evaluation) between steps."""
    return f"in the {phase} after step {step}" if phase else f"in step {step + 1}"


def describe_notice(rec: dict) -> str:
    where = where_text(rec["step"], rec.get("where", ""))
    return f"rank {rec['rank']} (pid {rec['pid']} on {rec['host']}) failed {where}: {rec['error']}"


class Heartbeats:
    """``RUN_DIR/launch/heartbeat/rankR``: ``<unix time> <step> <seconds in that step> <launch>``,
    rewritten by each rank's watch thread (which runs while the training thread is blocked)."""

    def __init__(self, run_dir: Path, launch_id: str) -> None:
        self.dir = Path(run_dir) / HEARTBEAT_DIR
        self.launch_id = launch_id

    def beat(self, rank: int, step: int, in_step_s: float) -> None:
        f = self.dir / f"rank{rank}"
        tmp = self.dir / f".rank{rank}.tmp"
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            tmp.write_text(f"{time.time():.3f} {step} {in_step_s:.1f} {self.launch_id}\n")
            os.replace(tmp, f)
        except OSError:
            pass  # best effort: a heartbeat must never stop training

    def read(self, world: int) -> dict[int, tuple[float, int, float]]:
        """rank -> (seconds since its last heartbeat, its step, seconds it had been in that step), for
        the ranks of this launch."""
        out, now = {}, time.time()
        for r in range(world):
            try:
                t, step, in_step, launch = (self.dir / f"rank{r}").read_text().split()
            except (OSError, ValueError):
                continue
            if launch == self.launch_id:
                out[r] = (now - float(t), int(step), float(in_step) + max(0.0, now - float(t)))
        return out
