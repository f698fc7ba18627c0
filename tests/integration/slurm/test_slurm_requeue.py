"""launch/slurm_pretrain.sh on a real single-node SLURM: train, preempt, requeue, resume, finish.

    python -m pytest tests/integration/slurm -q        # about 2-4 minutes on 2 cores

The job trains the ``debug`` recipe with 2 CPU ranks (CPU_RANKS_PER_NODE=2). Once a checkpoint exists
the test sends SIGUSR1 to the batch script as SLURM's ``--signal=B:USR1@...`` would before a time
limit (``scancel --signal=USR1 --batch``). The script must pass it on, the ranks save and exit 99, the
script requeues the job, the job starts again with ``--resume latest`` and ends at exactly
``train.max_steps`` with every step logged once.

SLURM holds a requeued job for about two minutes (its BeginTime); the test releases it with
``scontrol update JobId=J StartTime=now`` to stay fast, as an operator may.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path

import pytest

from tests.integration.slurm.harness import SlurmCluster

ROOT = Path(__file__).resolve().parents[3]
SCRIPT = ROOT / "launch" / "slurm_pretrain.sh"
MAX_STEPS = 12
SAVE_EVERY = 2


def job_info(cluster: SlurmCluster, job: str) -> dict[str, str]:
    """``scontrol show job -o`` as a dict (JobState, Restarts, ExitCode, ...)."""
    out = cluster.run("scontrol", "show", "job", "-o", job, check=False).stdout
    return dict(kv.split("=", 1) for kv in out.split() if "=" in kv)


def wait_for(what: str, ok, timeout: float, cluster: SlurmCluster, log: Path, poll: float = 1.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        v = ok()
        if v:
            return v
        time.sleep(poll)
    tail = log.read_text(errors="replace")[-6000:] if log.exists() else "(no job log)"
    pytest.fail(
        f"timed out after {timeout:.0f}s waiting for {what}\n--- job log\n{tail}\n{cluster.logs(1500)}"
    )


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.mark.slow
def test_preempt_requeue_resume(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    run_dir, data, log = tmp_path / "run", tmp_path / "data", tmp_path / "job.log"
    env = dict(slurm_cluster.env(), CPU_RANKS_PER_NODE="2", OMP_NUM_THREADS="1")
    t0 = time.time()
    sub = subprocess.run(
        [
            "sbatch",
            "--parsable",
            "-N",
            "1",
            f"--cpus-per-task={slurm_cluster.cpus}",
            "-J",
            "mico-requeue-test",
            "-o",
            str(log),
            str(SCRIPT),
            "--recipe",
            "debug",
            "--run-dir",
            str(run_dir),
            f"--train.max_steps={MAX_STEPS}",
            f"--train.save_every={SAVE_EVERY}",
            "--train.progress=false",
            f"--data.root={data}",
            f"--data.tokenizer={data}/tokenizer/tokenizer.model",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    job = sub.stdout.strip().split(";")[0]

    def why(job: str) -> str:  # everything there is to read when the job ends the wrong way
        info = " ".join(f"{k}={v}" for k, v in job_info(slurm_cluster, job).items())
        return f"{info}\n--- job log\n{log.read_text(errors='replace')[-6000:]}\n{slurm_cluster.logs(3000)}"

    try:
        latest = run_dir / "checkpoints" / "latest"

        def checkpointed() -> bool:
            state = job_info(slurm_cluster, job).get("JobState")
            if state not in ("RUNNING", "PENDING", "CONFIGURING"):
                pytest.fail(f"job {job} is {state} before any checkpoint:\n{why(job)}")
            return latest.exists()

        wait_for("the first checkpoint", checkpointed, 180, slurm_cluster, log)
        t_ckpt = time.time()
        # What SLURM does before the time limit with --signal=B:USR1@SECS: signal the batch shell only.
        slurm_cluster.run("scancel", "--signal=USR1", "--batch", job)

        wait_for(
            "the requeue", lambda: "requeue: scontrol requeue" in log.read_text(), 120, slurm_cluster, log
        )

        def restarted() -> bool:
            info = job_info(slurm_cluster, job)
            # Released early only once the first run's slurmstepd is gone (SLURM's own hold gives it
            # two minutes; a start while it still cleans up can fail the launch on a busy machine).
            if info.get("JobState") == "PENDING" and not slurm_cluster.job_steps():
                slurm_cluster.run("scontrol", "update", f"JobId={job}", "StartTime=now", check=False)
            return int(info.get("Restarts", "0")) >= 1 and info.get("JobState") != "PENDING"

        wait_for("the requeued job to start", restarted, 120, slurm_cluster, log, poll=2)

        def finished() -> dict | None:
            info = job_info(slurm_cluster, job)
            state = info.get("JobState")
            if state in ("FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"):
                pytest.fail(f"job {job} ended {state}:\n{why(job)}")
            return info if state == "COMPLETED" else None

        info = wait_for("the job to complete", finished, 240, slurm_cluster, log, poll=2)
    finally:
        slurm_cluster.run("scancel", job, check=False)
    text = log.read_text(errors="replace")
    print(f"job {job}: checkpoint after {t_ckpt - t0:.0f}s, completed after {time.time() - t0:.0f}s")

    # SLURM's own record: requeued once by the script, then a clean exit.
    assert int(info["Restarts"]) == 1, info
    assert info["ExitCode"] == "0:0", info
    assert "received SIGUSR1" in text
    assert f"requeue: scontrol requeue {job}" in text
    assert "training finished (exit code 0)" in text
    resumed = re.findall(r"resuming from \S+/checkpoints/step(\d{8})", text)
    assert len(resumed) == 1, f"expected one resume, log says {resumed}"
    resumed_step = int(resumed[0])

    records = read_jsonl(run_dir / "metrics.jsonl")
    preempted = [r for r in records if r.get("event") == "preempted"]
    assert len(preempted) == 1, preempted
    # The stop saved a checkpoint at the step it happened, and the restart resumed from exactly there.
    assert preempted[0]["step"] == resumed_step
    assert 0 < resumed_step < MAX_STEPS, f"preempted at {resumed_step}: no work left to resume"
    steps = [r["step"] for r in records if "loss" in r]
    assert steps == list(range(1, MAX_STEPS + 1)), f"train steps logged: {steps}"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == MAX_STEPS
