"""Real 2-rank ZeRO-3 training under the `deepspeed` launcher (gloo, CPU): train, save, resume, continue.

Also exact resume: a run stopped by SIGUSR1 at whatever step it reaches and resumed with
``--resume latest`` reproduces the uninterrupted run's losses bitwise (fp32 on CPU).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest

from tests.helpers.train import REPO, data_overrides, preempt_after_first_step, run_train, train_records

pytestmark = [pytest.mark.distributed, pytest.mark.slow]
STEPS = 6
TERMS = ("loss", "contrastive_loss", "matching_loss", "generation_loss")
# The debug recipe's first losses (2 ranks, ZeRO-3, fp32, deterministic). Regenerate with
# MICO_UPDATE_GOLDEN=1 only for an intended behaviour change, and say why in the commit message.
GOLDEN = REPO / "tests" / "assets" / "golden_losses_debug.json"


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("debug_data")


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, data_root) -> Path:
    run = tmp_path_factory.mktemp("full") / "run"
    run_train(run, *data_overrides(data_root), f"--train.max_steps={STEPS}", "--train.save_every=3",
              "--train.deterministic=true")  # fmt: skip
    return run


def test_trains_saves_and_summarizes(full_run: Path):
    recs = train_records(full_run)
    assert [r["step"] for r in recs] == list(range(1, STEPS + 1))
    for r in recs:
        for k in ("loss", "contrastive_loss", "matching_loss", "generation_loss", "lr", "samples_per_s"):
            assert math.isfinite(r[k]), (k, r)
    ck = full_run / "checkpoints"
    assert (ck / "latest").read_text().strip() == f"step{STEPS:08d}"
    assert (ck / "step00000003").is_dir()
    for rank in (0, 1):
        assert (ck / f"step{STEPS:08d}" / "client" / f"rank{rank}.pt").exists()
    summary = json.loads((full_run / "summary.json").read_text())
    assert summary["steps"] == STEPS and summary["zero_stage"] == 3 and summary["world_size"] == 2
    assert "retrieval/t2k_r1" in summary["eval"]
    assert (full_run / "config.yaml").exists()


def test_golden_losses(full_run: Path):
    got = {str(r["step"]): {k: r[k] for k in TERMS} for r in train_records(full_run)}
    if os.environ.get("MICO_UPDATE_GOLDEN") == "1":
        GOLDEN.parent.mkdir(parents=True, exist_ok=True)
        doc = {"recipe": "debug", "world_size": 2, "zero_stage": 3, "steps": STEPS, "losses": got}
        GOLDEN.write_text(json.dumps(doc, indent=1) + "\n")
    want = json.loads(GOLDEN.read_text())["losses"]
    assert sorted(got, key=int) == sorted(want, key=int)
    for step, terms in want.items():
        for k, v in terms.items():
            # rel 1e-4: room for another CPU's GEMM kernels, far below what a behaviour change moves
            assert got[step][k] == pytest.approx(v, rel=1e-4), (step, k, got[step][k], v)


def test_resume_continues_past_the_end(full_run: Path, data_root: Path, tmp_path: Path):
    # continue the finished run for two more steps
    run_train(full_run, *data_overrides(data_root), f"--train.max_steps={STEPS + 2}", "--train.save_every=3",
              "--train.deterministic=true", "--resume", "latest")  # fmt: skip
    steps = [r["step"] for r in train_records(full_run)]
    assert steps == list(range(1, STEPS + 3))
    assert (full_run / "checkpoints" / "latest").read_text().strip() == f"step{STEPS + 2:08d}"


def test_refuses_to_overwrite_a_run(full_run: Path, data_root: Path):
    p = run_train(full_run, *data_overrides(data_root), check=False)
    assert p.returncode != 0
    assert "already holds checkpoints" in p.stdout + p.stderr


def test_preempted_run_resumes_bitwise(full_run: Path, data_root: Path, tmp_path: Path):
    run = tmp_path / "preempted"
    args = [*data_overrides(data_root), f"--train.max_steps={STEPS}", "--train.save_every=100",
            "--train.deterministic=true"]  # fmt: skip
    rc, out = preempt_after_first_step(run, *args)  # SIGUSR1 to the rank processes only
    assert rc == 99, out[-4000:]
    stopped_at = int((run / "checkpoints" / "latest").read_text().strip()[4:])
    assert 1 <= stopped_at < STEPS, "the signal should stop the run before its end"
    run_train(run, *args, "--resume", "latest")
    want = {r["step"]: r for r in train_records(full_run) if r["step"] <= STEPS}
    got = {r["step"]: r for r in train_records(run)}
    assert sorted(got) == list(range(1, STEPS + 1))
    for s in range(1, STEPS + 1):
        for k in ("loss", "contrastive_loss", "matching_loss", "generation_loss"):
            assert got[s][k] == want[s][k], (s, k, got[s][k], want[s][k])
