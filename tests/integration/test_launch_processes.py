"""launch/hostfile.py on real processes: ``catches()`` reads a live process's handlers, and
``find_trainers`` finds a trainer but not its data-loader workers (forked children, same command line).

The "trainer" is a small Python module run as ``python -m <module> --run-dir DIR`` (MICO_TRAIN_MODULE
names it, as the launch scripts allow) that starts with SIGUSR1 ignored, as node-run leaves it, installs
its handler when told to, and forks a "worker".
"""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("launch_hostfile", ROOT / "launch" / "hostfile.py")
hostfile = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(hostfile)

FAKE = """
import os, signal, sys, time
# Python installs this at start-up unless SIGINT came in ignored (a background job of a script): be explicit.
signal.signal(signal.SIGINT, signal.default_int_handler)
signal.signal(signal.SIGUSR1, signal.SIG_IGN)  # inherited from node-run until the trainer is ready
print("started", flush=True)
sys.stdin.readline()
signal.signal(signal.SIGUSR1, lambda s, f: None)
worker = os.fork()
if worker == 0:  # a data-loader worker: a forked child with the very same command line
    time.sleep(300)
    os._exit(0)
print(f"ready {worker}", flush=True)
sys.stdin.readline()
os.kill(worker, signal.SIGKILL)
os.waitpid(worker, 0)
"""


@pytest.fixture
def fake_trainer(tmp_path: Path, monkeypatch):
    (tmp_path / "fake_trainer_mod.py").write_text(FAKE)
    monkeypatch.setenv("MICO_TRAIN_MODULE", "fake_trainer_mod")
    run_dir = tmp_path / "run"
    p = subprocess.Popen(
        [sys.executable, "-m", "fake_trainer_mod", "--run-dir", "run"],
        cwd=tmp_path, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert p.stdout.readline().strip() == "started"
        yield p, run_dir
    finally:
        p.kill()
        p.wait(30)


def _go(p: subprocess.Popen) -> int:
    p.stdin.write("\n")
    p.stdin.flush()
    line = p.stdout.readline().split()
    assert line[0] == "ready", line
    return int(line[1])


def test_catches_reads_the_handler_of_a_live_process(fake_trainer):
    p, _ = fake_trainer
    assert not hostfile.catches(p.pid, signal.SIGUSR1), "SIG_IGN is not a handler"
    assert hostfile.catches(p.pid, signal.SIGINT), "a Python handler"
    assert not hostfile.catches(p.pid, signal.SIGUSR2)
    worker = _go(p)
    assert hostfile.catches(p.pid, signal.SIGUSR1), "handler installed"
    assert hostfile.catches(worker, signal.SIGUSR1), "a forked child inherits it"
    assert not hostfile.catches(999_999_999, signal.SIGUSR1), "no such process"


def test_find_trainers_leaves_out_data_workers(fake_trainer, tmp_path: Path):
    p, run_dir = fake_trainer
    worker = _go(p)
    assert hostfile._cmdline(worker) == hostfile._cmdline(p.pid), "the worker looks like a trainer"
    assert hostfile.is_trainer(hostfile._cmdline(worker))
    assert hostfile.find_trainers(root=os.getpid()) == [p.pid]
    assert hostfile.find_trainers(run_dir=str(run_dir)) == [p.pid]  # --run-dir relative to its cwd
    assert hostfile.find_trainers(run_dir=str(tmp_path / "other")) == []
