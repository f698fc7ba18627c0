"""The parts of the step guard and of fail-fast, one process: the rules, the files, the report lines."""

from __future__ import annotations

import json
import math
import os
import socket
import time
from pathlib import Path

import pytest
import torch

from mico_ds.train import failfast, guard, health


def losses(loss: float, **terms: float) -> dict[str, torch.Tensor]:
    return {"loss": torch.tensor(loss), **{k: torch.tensor(v) for k, v in terms.items()}}


def test_check_micro_flags_any_nonfinite_term():
    g = guard.StepGuard(max_bad_steps=2, spike_sigmas=0, spike_window=4)
    assert not g.check_micro(losses(2.0, contrastive_loss=1.0))
    assert g.check_micro(losses(2.0, contrastive_loss=math.inf))  # the sum may hide nothing: a term is enough
    assert g.check_micro(losses(math.nan))


def test_bad_steps_in_a_row_roll_back_and_a_good_one_resets_the_count():
    g = guard.StepGuard(max_bad_steps=2, spike_sigmas=0, spike_window=4)
    assert not g.after_step(1, applied=False).rollback
    assert not g.after_step(2, applied=True).rollback  # the run of bad steps is broken
    assert not g.after_step(3, applied=False).rollback
    v = g.after_step(4, applied=False)
    assert v.rollback and v.reason == "2 skipped (non-finite) steps in a row"
    assert g.counters() == {"guard/skipped_steps": 3, "guard/rollbacks": 0}
    g.rolled_back(2)
    assert g.in_a_row == 0 and g.counters()["guard/rollbacks"] == 1
    assert not guard.StepGuard(0, 0, 4).after_step(1, applied=False).rollback  # 0: never


def run_losses(g: guard.StepGuard, values: list[float]) -> list[guard.Verdict]:
    out = []
    for step, v in enumerate(values, 1):
        g.check_micro(losses(v))
        out.append(g.after_step(step, applied=True))
    return out


def test_spike_rule_waits_for_a_full_window_then_flags_k_sigma_rises():
    g = guard.StepGuard(max_bad_steps=3, spike_sigmas=3, spike_window=4)
    # armed once 4 steps are in; at step 6 the window is 2.1 1.9 2.1 1.9 (limit 2.0 + 3 x 0.1 = 2.3), at
    # step 7 it is 1.9 2.1 1.9 2.25 (limit 2.0375 + 3 x 0.1474 = 2.48)
    verdicts = run_losses(g, [10.0, 2.1, 1.9, 2.1, 1.9, 2.25, 2.5])
    assert [v.rollback for v in verdicts] == [False] * 6 + [True]
    assert verdicts[-1].reason.startswith("loss spike: 2.5000 > ")
    # a spike is not added to the window: the next normal step compares against the same statistics
    assert [v for _, v in g.window] == pytest.approx([1.9, 2.1, 1.9, 2.25])


def test_spike_rule_has_a_floor_on_a_flat_plateau_and_is_off_at_zero():
    g = guard.StepGuard(3, spike_sigmas=3, spike_window=3)
    # std 0 on a flat plateau: the deviation counts as 1% of the mean, so +2% is noise, +4% a spike
    assert [v.rollback for v in run_losses(g, [5.0, 5.0, 5.0, 5.1, 5.0])] == [False] * 5
    assert run_losses(g, [5.2])[0].rollback
    off = guard.StepGuard(3, spike_sigmas=0, spike_window=1)
    assert not any(v.rollback for v in run_losses(off, [1.0, 100.0, 1e6]))


def test_rollback_keeps_only_the_window_up_to_the_checkpoint():
    g = guard.StepGuard(3, spike_sigmas=3, spike_window=8)
    run_losses(g, [3.0, 2.9, 2.8, 2.7, 2.6])
    g.rolled_back(3)
    assert [s for s, _ in g.window] == [1, 2, 3]


def test_data_skips_record_read_and_refuse_another_world_size(tmp_path: Path, caplog):
    skips = guard.DataSkips(tmp_path)
    assert skips.after(4, world_size=1) == 0
    skips.record(4, 6, rolled_back_from=6, reason="r")
    skips.record(8, 2, rolled_back_from=9, reason="s")
    assert (skips.after(4, 1), skips.after(8, 1), skips.after(5, 1)) == (6, 2, 0)
    doc = json.loads((tmp_path / guard.SKIPS_FILE).read_text())
    assert doc["4"] == {"micro_batches": 6, "world_size": 1, "rolled_back_from": 6, "reason": "r"}
    assert skips.after(4, world_size=2) == 0 and "not applied" in caplog.text
    (tmp_path / guard.SKIPS_FILE).write_text("{not json")
    with pytest.raises(ValueError, match=guard.SKIPS_FILE):
        skips.after(4, 1)


def test_fault_hook_parses_steps_ranks_and_kinds(monkeypatch):
    monkeypatch.setenv("MICO_TEST_FAULT", "3:1:nan,3:1:spike,5:0:raise")
    assert guard.injected_faults(3, 1) == {"nan", "spike"}
    assert guard.injected_faults(3, 0) == set() and guard.injected_faults(5, 0) == {"raise"}
    batch = {"image": torch.ones(2, 3), "tokens": torch.ones(2, dtype=torch.long), "keys": ["a", "b"]}
    guard.poison_inputs(batch)
    assert torch.isnan(batch["image"]).all() and batch["tokens"].eq(1).all()


def test_the_first_failure_notice_wins_and_an_old_launch_is_history(tmp_path: Path):
    old = failfast.FailureNotice(tmp_path, "launch-1")
    assert old.post(1, 5, "RuntimeError: boom")
    new = failfast.FailureNotice(tmp_path, "launch-2")
    assert new.read() is None, "another launch's notice is not ours"
    new.clear_stale()
    assert not (tmp_path / failfast.FAILURE_FILE).exists()
    assert (tmp_path / "launch" / "failure.launch-1.json").exists(), "kept for the post-mortem"
    assert new.post(0, 7, "ValueError: first")
    assert not new.post(1, 7, "RuntimeError: Connection closed by peer")
    rec = new.read()
    assert (rec["rank"], rec["step"], rec["pid"]) == (0, 7, os.getpid())
    assert failfast.describe_notice(rec).endswith("failed in step 8: ValueError: first")


def test_launch_helper_reads_the_same_failure_file():
    from tests.integration.test_resilience import hostfile

    assert str(failfast.FAILURE_FILE) == hostfile.FAILURE_FILE


def test_heartbeats_name_a_silent_and_a_stuck_rank(tmp_path: Path):
    table = [health.RankInfo(r, f"node{r}", 100 + r, 1, f"host{r}") for r in range(4)]
    beats = failfast.Heartbeats(tmp_path, "L")
    beats.beat(1, 9, in_step_s=0.5)  # fine
    beats.beat(2, 9, in_step_s=failfast.STALE_S + 40)  # alive, but its step has not moved
    old = time.time() - failfast.STALE_S - 30
    (tmp_path / failfast.HEARTBEAT_DIR / "rank3").write_text(f"{old:.3f} 8 0.0 L\n")  # stopped
    got = beats.read(4)
    assert sorted(got) == [1, 2, 3] and got[1][1] == 9
    lines = health.silent_ranks(table, 0, got, known=set())
    assert len(lines) == 2, lines
    assert lines[0].startswith("  rank 2 (pid 102 on node2) is alive but has been in step 10 for ")
    assert (
        lines[1].startswith("  rank 3 (pid 103 on node3): no heartbeat for ")
        and "(last in step 9)" in lines[1]
    )
    assert health.silent_ranks(table, 0, got, known={2, 3}) == []
    assert failfast.Heartbeats(tmp_path, "other").read(4) == {}, "another launch's heartbeats"


def test_failure_report_posts_and_names_the_first_failure(tmp_path: Path):
    table = [health.this_rank(0), health.RankInfo(1, "node09", 1234, 1, "other-kernel")]
    notice = failfast.FailureNotice(tmp_path, "L")
    assert notice.post(1, 2, "OSError: tmp worker fail")
    exc = RuntimeError("Caught OSError in DataLoader worker process 0.\nOriginal Traceback ...\nOSError: bad")
    text = health.failure_report(table, 0, 2, exc, notice, failfast.Heartbeats(tmp_path, "L"))
    lines = text.splitlines()
    assert lines[0].endswith(
        "failed in step 3: RuntimeError: Caught OSError in DataLoader worker process 0. ... OSError: bad"
    )
    poster = f"pid {os.getpid()} on {socket.gethostname()}"  # this test posted rank 1's notice
    assert lines[1] == f"  the first failure: rank 1 ({poster}) failed in step 3: OSError: tmp worker fail"


def test_a_failure_between_steps_says_where(tmp_path: Path):
    table = [health.this_rank(0)]
    notice = failfast.FailureNotice(tmp_path, "L")
    text = health.failure_report(table, 0, 4, OSError("No space left"), notice, phase="save")
    want = "failed in the save after step 4: OSError: No space left"
    assert text.splitlines()[0].endswith(want) and failfast.describe_notice(notice.read()).endswith(want)
