"""``--init PATH``: a weights-only start from a pretrained run, on real 2-rank ZeRO-3 runs (gloo, CPU).

A finished run of the debug recipe is converted with the project's own tools (tools/zero_to_fp32.py:
a consolidated state dict and the exported branches; tools/to_universal.py: a universal checkpoint);
a new run started with ``--init`` from the run directory, the universal tag and the consolidated
file sees the same first-step loss (the same fp32 weights, a fresh optimizer and data order), lower
than the same first batch gives from random weights.

A retrieval fine-tune from that run (``task.name=retrieval``) keeps its best checkpoint by the val
R@1 (``checkpoint.keep_best``), evaluates the test split with those weights into ``summary.json``,
and, preempted with SIGUSR1 and resumed, reproduces the uninterrupted fine-tune's losses bitwise.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers.train import REPO, data_overrides, env, preempt_after_first_step, run_train, train_records

pytestmark = [pytest.mark.distributed, pytest.mark.slow]
STEPS = 2


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("debug_data")


def tool(name: str, *args: str) -> None:
    p = subprocess.run([sys.executable, str(REPO / "tools" / f"{name}.py"), *args], cwd=REPO, env=env(),
                       capture_output=True, text=True, timeout=600)  # fmt: skip
    assert p.returncode == 0, f"{name} exited {p.returncode}\n{p.stdout[-4000:]}\n{p.stderr[-4000:]}"


@pytest.fixture(scope="module")
def base(tmp_path_factory, data_root) -> Path:
    """A finished run (latest = step STEPS), its consolidated weights, exports and universal tag."""
    root = tmp_path_factory.mktemp("init")
    run = root / "pretrain"
    run_train(run, *data_overrides(data_root), f"--train.max_steps={STEPS}", "--train.save_every=100")
    tool("zero_to_fp32", str(run), str(root / "fp32"), "--export-branches", str(root / "export"), "--quiet")
    tool("to_universal", str(run))
    return run


def first_step(run: Path, data_root: Path, *args: str) -> dict:
    """Train one step with ``args``; its metrics record."""
    run_train(run, *data_overrides(data_root), "--train.max_steps=1", "--train.save_every=100",
              "--train.deterministic=true", *args)  # fmt: skip
    return train_records(run)[0]


def test_init_from_run_universal_or_consolidated_gives_one_first_loss(
    base: Path, data_root: Path, tmp_path: Path
):
    tag = (base / "checkpoints" / "latest").read_text().strip()
    sources = {
        "run dir (ZeRO-3, latest)": base,
        "universal tag": base / "checkpoints" / f"{tag}_universal",
        "consolidated file": base.parent / "fp32" / "model.safetensors",
    }
    losses = {}
    for i, (what, src) in enumerate(sources.items()):
        run = tmp_path / f"ft{i}"
        rec = first_step(run, data_root, "--init", str(src))
        losses[what] = rec["loss"]
        report = json.loads((run / "init.json").read_text())
        assert report["added"] == [] and report["unused"] == [], (what, report)
        assert len(report["loaded"]) > 50, (what, len(report["loaded"]))
        assert json.loads((run / "summary.json").read_text())["steps"] == 1  # a fresh step counter
    # the first batch from random weights: the debug recipe's golden step 1 (same seed, data and ranks)
    fresh = json.loads((REPO / "tests" / "assets" / "golden_losses_debug.json").read_text())["losses"]["1"][
        "loss"
    ]
    first = next(iter(losses.values()))
    for what, loss in losses.items():
        assert loss == pytest.approx(first, rel=1e-6), (what, losses)
    # the same first batch, after STEPS steps of training on it and its successors, scores lower
    assert first < fresh - 0.1, (losses, fresh)

    # --resume continues the run from its own checkpoint and does not read model.init again: a path
    # that no longer exists is not an error, and step 2 follows step 1
    run = tmp_path / "ft0"
    gone = str(tmp_path / "gone")
    run_train(run, *data_overrides(data_root), "--train.max_steps=2", "--train.save_every=100",
              "--train.deterministic=true", "--init", gone, "--resume", "latest")  # fmt: skip
    assert [r["step"] for r in train_records(run)] == [1, 2]


def test_init_from_exports_lists_what_the_model_adds(base: Path, data_root: Path, tmp_path: Path):
    run = tmp_path / "ft"
    first_step(run, data_root, "--init", str(base.parent / "export"))
    report = json.loads((run / "init.json").read_text())
    assert report["kind"] == "branches"
    assert [x.split(":")[0] for x in report["loaded"]] == ["encoder", "text"]
    # the context embeddings and the heads have no slot in timm's or Hugging Face's formats
    assert report["added"] and all(not n.startswith(("encoder.", "text.")) for n in report["added"])
    assert any(n.startswith("context.") for n in report["added"]), report["added"]


FT_STEPS = 4


def finetune_args(base: Path, data_root: Path) -> list[str]:
    return [
        *data_overrides(data_root), "--init", str(base), "--task.name=retrieval",
        "--objectives.generation_weight=0",
        f"--train.max_steps={FT_STEPS}", "--train.eval_every=1", "--train.save_every=100",
        "--train.deterministic=true", "--checkpoint.keep_best=true", "--checkpoint.keep_last=1",
        "--data.test_shards=omni/tune-*.tar", "--eval.rerank_k=0",
    ]  # fmt: skip


def test_finetune_keeps_best_tests_it_and_resumes_bitwise(base: Path, data_root: Path, tmp_path: Path):
    args = finetune_args(base, data_root)
    full = tmp_path / "full"
    run_train(full, *args)
    vals = [
        r
        for r in map(json.loads, (full / "metrics.jsonl").read_text().splitlines())
        if "retrieval/t2k_r1" in r
    ]
    assert [r["step"] for r in vals] == [1, 2, 3, 4]  # every step (the last one: the final evaluation)
    best = json.loads((full / "checkpoints" / "best.json").read_text())
    top = max(r["retrieval/t2k_r1"] for r in vals)
    assert best["metric"] == "retrieval/t2k_r1" and best["value"] == top
    assert best["step"] == next(r["step"] for r in vals if r["retrieval/t2k_r1"] == top)  # the first best
    # kept by retention (keep_last=1 keeps only the final step besides it)
    assert (full / "checkpoints" / best["tag"]).is_dir()
    test = json.loads((full / "summary.json").read_text())["test"]
    assert test["checkpoint"] == best["tag"] and test["step"] == best["step"]
    # the same figures as the evaluation CLI gives for that checkpoint on the test split
    out = tmp_path / "test.json"
    p = subprocess.run(
        [sys.executable, "-m", "mico_ds.eval", "--checkpoint", str(full), "--tag", best["tag"], "--data",
         "omni/tune-*.tar", "--tasks", "retrieval", "--no-progress", "--out", str(out)],
        cwd=REPO, env=env(), capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert p.returncode == 0, p.stderr[-4000:]
    cli = json.loads(out.read_text())
    for k in ("retrieval/t2k_r1", "retrieval/k2t_r1", "retrieval/t2k_r5", "retrieval/n"):
        assert test[k] == pytest.approx(cli[k]), (k, test[k], cli[k])

    # preempted by SIGUSR1 after its first step, then resumed: the same losses, bit for bit
    run = tmp_path / "preempted"
    rc, out_text = preempt_after_first_step(run, *args)
    assert rc == 99, out_text[-4000:]
    stopped_at = int((run / "checkpoints" / "latest").read_text().strip()[4:])
    assert 1 <= stopped_at < FT_STEPS, "the signal should stop the fine-tune before its end"
    run_train(run, *args, "--resume", "latest")
    want = {r["step"]: r for r in train_records(full)}
    got = {r["step"]: r for r in train_records(run)}
    assert sorted(got) == list(range(1, FT_STEPS + 1))
    for s in got:
        for k in ("loss", "contrastive_loss", "matching_loss"):
            assert got[s][k] == want[s][k], (s, k, got[s][k], want[s][k])
    assert json.loads((run / "checkpoints" / "best.json").read_text()) == {**best}
    figures = lambda d: {k: v for k, v in d.items() if not k.endswith("seconds")}  # noqa: E731
    assert figures(json.loads((run / "summary.json").read_text())["test"]) == figures(test)
