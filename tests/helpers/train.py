"""Helpers for tests that run the real trainer under the `deepspeed` launcher on CPU ranks."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from mico_ds.distributed.launch import deepspeed_command, free_port

REPO = Path(__file__).resolve().parents[2]
__all__ = ["REPO", "data_overrides", "env", "free_port", "run_train", "train_cmd", "train_records"]


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
