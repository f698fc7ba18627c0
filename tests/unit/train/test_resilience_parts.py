"""The pieces the failure tests rely on, on real processes and signals (no process group needed):
signal shielding of forked children, the wall-clock budget, RNG-neutral fetches, dead-peer detection,
and dropping log records past a checkpoint."""

from __future__ import annotations

import json
import logging
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from mico_ds.checkpoint import rng_preserved
from mico_ds.train import health
from mico_ds.train.metrics import drop_records_after
from mico_ds.train.signals import StopFlag, process_age_s, shield_children


@pytest.fixture
def restore_stop_handlers():
    saved = {s: signal.getsignal(s) for s in (signal.SIGUSR1, signal.SIGTERM)}
    yield
    for s, h in saved.items():
        signal.signal(s, h)


def _until(pred, timeout: float = 30.0):
    """Poll ``pred`` until it is truthy (the machine may be busy: no tight timing)."""
    deadline = time.monotonic() + timeout
    while not (v := pred()):
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)
    return v


def _alive(pid: int) -> bool:
    return os.waitpid(pid, os.WNOHANG) == (0, 0)


def _fork_sleeper() -> int:
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            time.sleep(60)
        finally:
            os._exit(0)
    return pid


def test_children_forked_in_the_shield_ignore_stop_signals(restore_stop_handlers):
    got: list[int] = []
    signal.signal(signal.SIGTERM, lambda s, f: got.append(s))
    with shield_children():
        shielded = _fork_sleeper()
        # Directed at this thread (a process-wide signal may go to another thread, which is fine too).
        signal.pthread_kill(threading.get_ident(), signal.SIGTERM)
        time.sleep(0.1)
        assert got == [], "blocked in the shield"
    assert got == [signal.SIGTERM], "delivered to the trainer as soon as the shield ends"
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    plain = _fork_sleeper()  # the default: SIGTERM kills
    try:
        for pid in (shielded, plain):
            os.kill(pid, signal.SIGTERM)
            os.kill(pid, signal.SIGUSR1)
        time.sleep(0.5)
        assert _alive(shielded), "a worker forked in the shield must survive SIGTERM and SIGUSR1"
        assert not _alive(plain)
    finally:
        for pid in (shielded, plain):
            try:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
            except (ProcessLookupError, ChildProcessError):
                pass


def test_budget_counts_from_process_start(restore_stop_handlers):
    age = process_age_s()
    assert age > 0.5, "pytest has been running for a while"
    assert StopFlag(max_minutes=(age - 0.5) / 60).local(), "the budget was spent before the trainer was built"
    late = StopFlag(max_minutes=(age + 30) / 60)
    assert not late.local() and late.reason is None
    assert not StopFlag(0).local()


def test_stop_signal_sets_the_flag(restore_stop_handlers):
    flag = StopFlag()
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(0.05)
    assert flag.local() and flag.reason == "SIGTERM"


def test_rng_preserved_leaves_the_global_rngs_as_they_were():
    torch.manual_seed(1), random.seed(1), np.random.seed(1)
    with rng_preserved():
        torch.empty((), dtype=torch.int64).random_()  # what a DataLoader does when it starts workers
        random.random(), np.random.rand()
    a = (torch.rand(3), random.random(), np.random.rand())
    torch.manual_seed(1), random.seed(1), np.random.seed(1)
    b = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(a[0], b[0]) and a[1:] == b[1:]


# ---------------------------------------------------------------------------------------------- peers


def _peer(proc: subprocess.Popen, rank: int) -> health.RankInfo:
    me = health.this_rank(0)
    f = health._stat_fields(proc.pid)
    return health.RankInfo(rank, me.host, proc.pid, int(f[19]), me.where)


def _sleeper() -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])


def test_peer_status_of_running_stopped_killed_and_reaped_processes():
    p = _sleeper()
    try:
        peer = _peer(p, 1)
        assert health.peer_status(peer) is None
        os.kill(p.pid, signal.SIGSTOP)
        assert _until(lambda: health.peer_status(peer)).startswith("is stopped")
        os.kill(p.pid, signal.SIGKILL)
        # a zombie until we collect it: the exit status is readable
        assert _until(lambda: (health.peer_status(peer) or "").startswith("died"))
        assert health.peer_status(peer) == "died: killed by signal 9 (SIGKILL)"
    finally:
        p.kill()
        p.wait()
    assert health.peer_status(peer).startswith("died (")
    q = subprocess.Popen([sys.executable, "-c", "import sys; sys.exit(3)"])
    peer = _peer(q, 2)
    assert _until(lambda: health.peer_status(peer)) == "died: exit code 3"
    q.wait()
    # a pid reused by another process is not the peer
    assert health.peer_status(health.RankInfo(3, peer.host, os.getpid(), 1, peer.where)).startswith("died")


def test_peer_watch_names_a_dead_peer_once(caplog):
    p, q = _sleeper(), _sleeper()
    table = [health.this_rank(0), _peer(p, 1), _peer(q, 2)]
    watch = health.PeerWatch(table, 0, interval_s=0.05).start()
    try:
        with caplog.at_level(logging.ERROR, logger="mico_ds"):
            time.sleep(0.3)
            assert not caplog.records, "no false alarm while the peers run"
            os.kill(p.pid, signal.SIGKILL)
            _until(lambda: caplog.records)
            time.sleep(0.2)  # and nothing more
        msgs = [r.getMessage() for r in caplog.records]
        assert msgs == [f"rank 1 (pid {p.pid} on {table[1].host}) died: killed by signal 9 (SIGKILL)"], msgs
        watch.stop()
        caplog.clear()
        os.kill(q.pid, signal.SIGKILL)
        time.sleep(0.3)
        assert not caplog.records, "a stopped watch is silent (the ranks exit one by one at the end)"
    finally:
        watch.stop()
        for x in (p, q):
            x.kill()
            x.wait()


def test_failure_report_names_the_failed_rank_and_the_dead_peer():
    p = _sleeper()
    me = health.this_rank(0)
    remote = health.RankInfo(2, "node09", 1234, 1, "other-kernel")
    table = [me, _peer(p, 1), remote]
    os.kill(p.pid, signal.SIGKILL)
    _until(lambda: health.peer_status(table[1]))
    text = health.failure_report(table, 0, 6, RuntimeError("Connection reset by peer\nmore"))
    p.wait()
    lines = text.splitlines()
    assert (
        lines[0]
        == f"rank 0 (pid {me.pid} on {me.host}) failed in step 7: RuntimeError: Connection reset by peer"
    )
    assert lines[1] == f"  rank 1 (pid {p.pid} on {me.host}) died: killed by signal 9 (SIGKILL)"
    assert "1 rank(s) on 1 other host(s) (node09) cannot be checked from here" in lines[2]


def test_drop_records_after(tmp_path: Path):
    f = tmp_path / "metrics.jsonl"
    recs = [{"step": s, "loss": 1.0} for s in (1, 2, 3, 4)] + [{"step": 2, "event": "x"}]
    f.write_text("".join(json.dumps(r) + "\n" for r in recs) + '{"step": 5, "lo')  # cut by the kill
    assert drop_records_after(f, 2) == 3
    assert [json.loads(line) for line in f.read_text().splitlines()] == [recs[0], recs[1], recs[4]]
    assert drop_records_after(f, 2) == 0
    assert drop_records_after(tmp_path / "missing.jsonl", 2) == 0
