"""Which rank died: every rank's host and pid, a watch on this host's peers, and a failure report.

A rank killed by SIGKILL (the OOM killer, a node failure, ``kill -9``) cannot say so itself. Its peers see
a collective fail ("Connection reset by peer") or hang until ``train.dist_timeout_s``; the DeepSpeed
launcher of its node then terminates the other ranks it started and logs the return code next to the
command of its *last* rank, not of the one that died. So every rank learns at start where all ranks run
(:func:`rank_table`, one small all_gather), and

* :class:`PeerWatch`, a daemon thread, looks at the ranks on its own host four times a second and logs
  ``rank 1 (pid N on HOST) died: killed by signal 9 (SIGKILL)`` as soon as one of them is gone;
* :func:`failure_report` is what a rank logs when training raises: its rank, step and error, and what
  it can see of its peers.

"Same host" means same kernel and same pid namespace (two DeepSpeed "nodes" on one machine see each
other; two containers do not), so a pid is only ever looked up where it means the same process.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from mico_ds import distributed as mdist
from mico_ds.train.failfast import (
    HEARTBEAT_S,
    STALE_S,
    FailureNotice,
    Heartbeats,
    describe_notice,
    where_text,
)

log = logging.getLogger("mico_ds")
NOTICE_POLL_S = 1.0


@dataclass(frozen=True)
class RankInfo:
    """Where one rank runs."""

    rank: int
    host: str
    pid: int
    start: int  # start time in clock ticks after boot: a reused pid is not the same process
    where: str  # boot id + pid namespace: ranks with the same one can read each other's /proc


def _stat_fields(pid: int) -> list[str] | None:
    """/proc/PID/stat from field 3 (state) on; the name (field 2) may hold spaces and parentheses."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def _where() -> str:
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        ns = os.readlink("/proc/self/ns/pid")
    except OSError:
        return f"host:{socket.gethostname()}"
    return f"{boot}:{ns}"


def this_rank(rank: int) -> RankInfo:
    f = _stat_fields(os.getpid())
    return RankInfo(rank, socket.gethostname(), os.getpid(), int(f[19]) if f else 0, _where())


def rank_table() -> list[RankInfo]:
    """Every rank's :class:`RankInfo`, in rank order (a collective: all ranks call it)."""
    return list(mdist.all_gather_object(this_rank(mdist.get_rank())))


def describe(p: RankInfo) -> str:
    return f"rank {p.rank} (pid {p.pid} on {p.host})"


def _wait_status(code: int) -> str:
    """A waitpid() status as words: 'killed by signal 9 (SIGKILL)' or 'exit code 1'."""
    if code & 0x7F:
        sig = code & 0x7F
        try:
            name = signal.Signals(sig).name
        except ValueError:
            name = "?"
        return f"killed by signal {sig} ({name})"
    return f"exit code {code >> 8 & 0xFF}"


def peer_status(p: RankInfo) -> str | None:
    """None while ``p`` runs here; otherwise how it ended ("died: killed by signal 9 (SIGKILL)") or
    "is stopped". The exit status is known only until the rank's launcher has collected it."""
    f = _stat_fields(p.pid)
    if f is None or (p.start and len(f) > 19 and int(f[19]) != p.start):
        return "died (its exit status went to its launcher)"
    state = f[0]
    if state in ("Z", "X"):
        return f"died: {_wait_status(int(f[-1]))}" if len(f) >= 50 else "died"
    if state in ("T", "t"):
        return "is stopped (SIGSTOP or a debugger): it will not answer collectives"
    return None


class PeerWatch:
    """Watches the other ranks while training runs, from a daemon thread.

    * A peer on this host that died or was stopped is logged once (seen so in two consecutive polls:
      at the end of a run the ranks exit at slightly different times, and the loop stops the watch
      right after its last collective).
    * With ``notice``: when another rank posts its failure (train/failfast.py), the first error is
      logged and ``on_peer_failure`` runs (the trainer ends this process: the job is lost anyway, and
      a collective waiting for the failed rank would otherwise wait until the timeout).
    * With ``beats``: this rank's heartbeat and step (``self.step``) are written every few seconds.
    """

    def __init__(
        self,
        table: list[RankInfo],
        rank: int,
        interval_s: float = 0.25,
        notice: FailureNotice | None = None,
        beats: Heartbeats | None = None,
        on_peer_failure: Callable[[dict], None] | None = None,
    ) -> None:
        me = table[rank]
        self.rank = rank
        self.peers = [p for p in table if p.rank != rank and p.where == me.where]
        self.interval_s = interval_s
        self.notice, self.beats, self.on_peer_failure = notice, beats, on_peer_failure
        self.step = 0
        self.reported: dict[int, str] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="mico-peer-watch", daemon=True)

    def start(self) -> PeerWatch:
        if self.peers or self.notice is not None or self.beats is not None:
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        seen: dict[int, str] = {}
        last_beat = last_notice = 0.0
        step_seen, step_since = self.step, time.monotonic()
        while not self._stop.wait(self.interval_s):
            now = time.monotonic()
            if self.step != step_seen:
                step_seen, step_since = self.step, now
            if self.beats is not None and now - last_beat >= HEARTBEAT_S:
                self.beats.beat(self.rank, self.step, now - step_since)
                last_beat = now
            if self.notice is not None and time.monotonic() - last_notice >= NOTICE_POLL_S:
                last_notice = time.monotonic()  # a stat on a shared filesystem: once a second
                rec = self.notice.read()
                if rec is not None and rec.get("rank") != self.rank and not self._stop.is_set():
                    log.error("ending rank %d: %s", self.rank, describe_notice(rec))
                    if self.on_peer_failure is not None:
                        self.on_peer_failure(rec)
                    return
            for p in self.peers:
                if self.reported.get(p.rank, "").startswith("died"):
                    continue
                st = peer_status(p)
                if st is None:
                    seen.pop(p.rank, None)
                elif p.rank in seen and not self._stop.is_set():
                    first = seen[p.rank]  # the first look may still have caught the exit status
                    st = first if first.startswith("died:") else st
                    if self.reported.get(p.rank) != st:
                        self.reported[p.rank] = st
                        log.error("%s %s", describe(p), st)
                else:
                    seen[p.rank] = st


def failure_report(
    table: list[RankInfo],
    rank: int,
    step: int,
    exc: BaseException,
    notice: FailureNotice | None = None,
    beats: Heartbeats | None = None,
    phase: str = "",
) -> str:
    """The lines a rank logs when training raised: who, where, what; the first failure of the job when
    another rank's came first; the peers it can check on this host; and, from the heartbeats, every
    rank on any host that has gone silent or lags behind (stopped or hung). ``phase``: "save" or
    "evaluation" when the rank failed between steps (after ``step``), "" inside step ``step + 1``."""
    me = table[rank] if 0 <= rank < len(table) else this_rank(rank)
    msg = error_line(exc)
    lines = [f"{describe(me)} failed {where_text(step, phase)}: {type(exc).__name__}: {msg}"]
    if notice is not None and not notice.post(rank, step, f"{type(exc).__name__}: {msg}", phase):
        first = notice.read()
        if first is not None and first.get("rank") != rank:
            lines.append(f"  the first failure: {describe_notice(first)}")
    local = [p for p in table if p.rank != rank and p.where == me.where]
    gone = [(p, st) for p in local if (st := peer_status(p)) is not None]
    lines += [f"  {describe(p)} {st}" for p, st in gone]
    if local and not gone:
        lines.append(f"  the {len(local)} other rank(s) on this host are running")
    if beats is not None:
        lines += silent_ranks(table, rank, beats.read(len(table)), {p.rank for p, _ in gone})
    remote = [p for p in table if p.where != me.where]
    if remote:
        hosts = sorted({p.host for p in remote})
        lines.append(
            f"  {len(remote)} rank(s) on {len(hosts)} other host(s) ({', '.join(hosts[:8])}"
            f"{', ...' if len(hosts) > 8 else ''}) cannot be checked from here: see their logs"
        )
    return "\n".join(lines)


def error_line(exc: BaseException) -> str:
    """The first line of an error; for one re-raised from a data worker, with the worker's own last
    line ("Caught OSError in DataLoader worker process 0. ... OSError: <what the decoder said>")."""
    text = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    if not text:
        return ""
    if len(text) > 1 and "Original Traceback" in str(exc):
        return f"{text[0]} ... {text[-1]}"
    return text[0]


def silent_ranks(
    table: list[RankInfo], rank: int, beats: dict[int, tuple[float, int, float]], known: set[int]
) -> list[str]:
    """Report lines for the ranks whose heartbeat is stale (stopped, or gone) or whose heartbeat is
    fresh but whose step has not moved for long (its training thread is stuck)."""
    out = []
    for p in table:
        if p.rank == rank or p.rank in known or p.rank not in beats:
            continue
        age, at, in_step = beats[p.rank]
        if age > STALE_S:
            out.append(
                f"  {describe(p)}: no heartbeat for {age:.0f} s (last in step {at + 1}): stopped, hung "
                f"or its host is gone"
            )
        elif in_step > STALE_S:
            out.append(
                f"  {describe(p)} is alive but has been in step {at + 1} for {in_step:.0f} s: stuck in "
                f"a system call, a read or a kernel?"
            )
    return out
