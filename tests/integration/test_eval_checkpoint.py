"""Evaluation inside a real 2-rank ZeRO-3 run and on its checkpoint: the figures logged by the trainer
at its end equal those of ``python -m mico_ds.eval`` on the checkpoint under the deepspeed launcher
(2 ranks, DeepSpeed loads the partitions) and in one process on an exported fp32 ``.safetensors`` +
config.yaml."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers.train import REPO, data_overrides, env, free_port, run_train

pytestmark = [pytest.mark.distributed, pytest.mark.slow]
STEPS = 3
EVAL = ["--eval.max_samples=16", "--eval.caption_samples=6", "--eval.qa_samples=4", "--eval.rerank_k=5",
        "--eval.batch_size=4", "--eval.caption_max_tokens=6", "--eval.qa_max_tokens=3"]  # fmt: skip
KEYS = ("retrieval/t2k_r1", "retrieval/k2t_r1", "retrieval/t2k_r1_rerank", "retrieval/k2t_r5_rerank",
        "retrieval/t2k_medr", "captioning/cider", "captioning/bleu4", "qa/accuracy", "qa/n")  # fmt: skip


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("eval_data")
    run_dir = tmp_path_factory.mktemp("eval_run") / "run"
    run_train(run_dir, *data_overrides(root), f"--train.max_steps={STEPS}", "--train.eval_every=2",
              "--train.save_every=100", "--eval.tasks=[retrieval,captioning,qa]", *EVAL)  # fmt: skip
    return run_dir


def _eval_cmd(*args: str, nproc: int = 0) -> list[str]:
    if nproc:
        return [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(nproc), "--master_port",
                str(free_port()), "--no_local_rank", "--module", "mico_ds.eval", *args]  # fmt: skip
    return [sys.executable, "-m", "mico_ds.eval", *args]


def _run_eval(*args: str, nproc: int = 0) -> dict:
    out = Path(args[args.index("--out") + 1])
    p = subprocess.run(_eval_cmd(*args, "--no-progress", nproc=nproc), cwd=REPO, env=env(),
                       capture_output=True, text=True, timeout=600)  # fmt: skip
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-4000:]
    assert "rerank top-5" in p.stdout and "R@1" in p.stdout  # the readable table
    return json.loads(out.read_text())


def test_trainer_logs_every_task(run: Path) -> None:
    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in recs if "retrieval/t2k_r1" in r]
    assert [r["step"] for r in evals] == [2, STEPS]  # every eval_every steps and at the end
    for r in evals:
        for k in KEYS:
            assert isinstance(r[k], float), k
        assert r["retrieval/n"] == 16 and r["captioning/n"] == 6 and r["qa/n"] >= 4 * 7
    summary = json.loads((run / "summary.json").read_text())
    assert {k: summary["eval"][k] for k in KEYS} == {k: evals[-1][k] for k in KEYS}
    assert summary["eval"]["captioning/examples"]


def test_checkpoint_evaluation_reproduces_the_trainer(run: Path, tmp_path: Path) -> None:
    logged = json.loads((run / "summary.json").read_text())["eval"]
    two = _run_eval("--checkpoint", str(run), "--out", str(tmp_path / "two.json"), *EVAL, nproc=2)
    assert two["world_size"] == 2
    for k in KEYS:
        assert two[k] == pytest.approx(logged[k], abs=1e-6), k

    # one process on an exported checkpoint: the ZeRO partitions consolidated by DeepSpeed (what a
    # one-process run on the checkpoint directory does in memory) saved as fp32 safetensors
    from safetensors.torch import save_file

    from mico_ds.checkpoint import Location
    from mico_ds.eval.__main__ import consolidated

    sd = consolidated(Location("zero", run / "checkpoints", f"step{STEPS:08d}"))
    save_file({k: v.contiguous() for k, v in sd.items()}, tmp_path / "model.safetensors")
    one = _run_eval("--checkpoint", str(tmp_path / "model.safetensors"), "--config", str(run / "config.yaml"),
                    "--out", str(tmp_path / "one.json"), *EVAL)  # fmt: skip
    assert one["world_size"] == 1

    from mico_ds.checkpoint import locate, run_config_file  # every way of naming the same checkpoint

    tag = f"step{STEPS:08d}"
    for where in (run, run / "checkpoints", run / "checkpoints" / tag):
        loc = locate(str(where), None, state_dicts=True)
        found = (loc.kind, loc.path, loc.tag, run_config_file(loc))
        assert found == ("zero", run / "checkpoints", tag, run / "config.yaml")
    for k in KEYS:
        assert one[k] == pytest.approx(logged[k], abs=1e-6), k
