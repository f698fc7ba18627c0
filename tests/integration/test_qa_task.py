"""The qa task through the real trainer: one short 2-rank ZeRO-3 run of the debug recipe trains on
question -> answer and ends with the QA accuracy next to the answer-without-looking baseline."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mico_ds.data.io import expand_urls
from mico_ds.eval.qa import answer_prior, exact_match, read_pairs, template_of
from tests.helpers.train import data_overrides, run_train, train_records

pytestmark = [pytest.mark.distributed, pytest.mark.slow]


def test_qa_run_reports_accuracy_and_the_baseline(tmp_path: Path) -> None:
    data, run = tmp_path / "data", tmp_path / "run"
    p = run_train(
        run, *data_overrides(data), "--task.name=qa", "--objectives.contrastive_weight=0",
        "--objectives.matching_weight=0", "--train.max_steps=3", "--train.save_every=0", "--eval.tasks=[qa]",
        "--eval.qa_samples=32", "--eval.qa_baseline_shards=omni/train-*.tar",
    )  # fmt: skip
    recs = train_records(run)
    assert all(r["contrastive_loss"] == 0 and r["matching_loss"] == 0 for r in recs)
    assert all(r["masked_tokens"] >= 2 * 4 * 2 for r in recs)  # answer + EOS of 4 samples on 2 ranks
    ev = json.loads((run / "summary.json").read_text())["eval"]
    val = read_pairs(expand_urls("omni/val-*.tar", str(data)))
    prior = answer_prior(read_pairs(expand_urls("omni/train-*.tar", str(data))))
    want = 100.0 * sum(exact_match(prior[template_of(q)], q["a"]) for q in val) / len(val)
    assert ev["qa/n"] == len(val) and ev["qa/baseline_accuracy"] == pytest.approx(want)
    assert 0.0 <= ev["qa/accuracy"] <= 100.0
    assert "answer without looking" in p.stdout
