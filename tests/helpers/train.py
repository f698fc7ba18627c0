"""Helpers for tests that run the real trainer under the `deepspeed` launcher on CPU ranks."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

from mico_ds.distributed.launch import deepspeed_command, free_port

REPO = Path(__file__).resolve().parents[2]
__all__ = [
    "REPO", "data_overrides", "env", "free_port", "preempt_after_first_step", "run_train", "train_cmd",
    "train_records",
]  # fmt: skip


def data_overrides(root: Path) -> list[str]:
    return [f"--data.root={root}", f"--data.tokenizer={root}/tokenizer/tokenizer.model"]


def train_cmd(run_dir: Path, *args: str, recipe: str = "debug", nproc: int = 2) -> list[str]:
    return deepspeed_command(nproc, "mico_ds.train", ["--recipe", recipe, "--run-dir", str(run_dir), *args])


def env() -> dict[str, str]:
    e = dict(os.environ)
    e["PYTHONPATH"] = f"{REPO}{os.pathsep}{e.get('PYTHONPATH', '')}"
    e.setdefault("OMP_NUM_THREADS", "1")  # 2 ranks on 2 cores; fixed thread count keeps runs bitwise stable
    return e


def run_train(
    run_dir: Path, *args: str, timeout: float = 600, check: bool = True, **kw
) -> subprocess.CompletedProcess:
    p = subprocess.run(
        train_cmd(run_dir, *args, **kw), cwd=REPO, env=env(), capture_output=True, text=True, timeout=timeout
    )
    if check and p.returncode != 0:
        raise AssertionError(
            f"training exited {p.returncode}\n--- stdout\n{p.stdout[-6000:]}\n--- stderr\n{p.stderr[-6000:]}"
        )
    return p


def train_records(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if "loss" in r]


def preempt_after_first_step(run_dir: Path, *args: str, recipe: str = "debug") -> tuple[int, str]:
    """Start a 2-rank run, send SIGUSR1 to its rank processes once it has logged a step (as SLURM's
    --signal does to the job step's tasks), and wait: its exit code and output."""
    proc = subprocess.Popen(train_cmd(run_dir, *args, recipe=recipe), cwd=REPO, env=env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)  # fmt: skip
    metrics, deadline = run_dir / "metrics.jsonl", time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if metrics.exists() and any('"loss"' in line for line in metrics.read_text().splitlines()):
            break
        time.sleep(0.2)
    pattern = f"-u -m mico_ds.train --recipe {recipe} --run-dir {run_dir}"
    subprocess.run(["pkill", "-USR1", "-f", "--", pattern], check=False)
    out, _ = proc.communicate(timeout=300)
    return proc.returncode, out
