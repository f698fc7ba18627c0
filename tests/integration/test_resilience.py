"""Failures of a real run and what survives them: 2 CPU ranks (gloo, ZeRO-3) under the `deepspeed` launcher.

Every scenario is compared with one uninterrupted run (the ``reference`` fixture) of the same config:
per-step losses bitwise (fp32 on CPU), the sample keys each rank consumed at each step (recorded by
``train.record_keys``), and the final client state (data stream positions, RNG states).

* ``kill -9`` of every process of the job at an arbitrary step, then a resume that the wall-clock
  budget (``train.max_minutes``) stops again, then a resume to the end;
* a save killed half-written (rank 1 stalls inside DeepSpeed's save: ``MICO_TEST_STALL_SAVE``), then a
  resume stopped by SIGTERM sent to every process of the ranks, data workers included (as ``scancel``
  does), then a resume to the end;
* a resume with a changed seed and batch size is refused, naming both;
* two "nodes" on this machine (two launchers, ``--no_ssh --node_rank 0/1``, through ``node-run``):
  train, stop, resume;
* a rank killed with SIGKILL, mid-step on one node, and on the other of two nodes while rank 0 waits for
  it in a save (``MICO_TEST_STALL_SAVE=2:1:client``): the job ends non-zero, in bounded time, says
  which rank died, and the half-written checkpoint is not marked complete;
* NaN batches and a loss spike (``MICO_TEST_FAULT``, train/guard.py): a non-finite step is skipped
  without any update, two in a row and the spike roll back to the newest checkpoint and skip the data
  read since it, and a resume from that checkpoint skips the same window again.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from mico_ds import checkpoint as ckpt
from tests.helpers.train import REPO, data_overrides, env, free_port, train_cmd

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

_spec = importlib.util.spec_from_file_location("launch_hostfile", REPO / "launch" / "hostfile.py")
hostfile = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(hostfile)

STEPS = 8
TERMS = ("loss", "contrastive_loss", "matching_loss", "generation_loss")
START_S = 300  # generous: 2 cores shared with other test runs
RUN_S = 600
DROPPED = "record(s) of steps after checkpoint"  # what a resume logs when it forgets steps it redoes
_JOBS: list[Job] = []


def base_args(data_root: Path) -> list[str]:
    return [*data_overrides(data_root), f"--train.max_steps={STEPS}", "--train.save_every=2",
            "--data.num_workers=2", "--train.record_keys=true", "--train.deterministic=true",
            "--checkpoint.keep_last=1", "--checkpoint.keep_every=4", "--eval.tasks=[]",
            "--train.progress=false"]  # fmt: skip


# ---------------------------------------------------------------------------------------------- helpers


class Job:
    """A training job in its own session (so that a SIGKILL of the session kills all of it)."""

    def __init__(self, cmd: list[str], log: Path, extra_env: dict[str, str] | None = None) -> None:
        self.log = log
        self.out = open(log, "w")  # noqa: SIM115 -- a file, not a pipe: nobody reads while we wait
        self.proc = subprocess.Popen(
            cmd, cwd=REPO, env={**env(), **(extra_env or {})}, stdout=self.out, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
        _JOBS.append(self)

    def wait(self, timeout: float = RUN_S) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill_group()
            raise
        finally:
            self.out.close()

    def kill_group(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def kill_all(self) -> None:
        """SIGKILL every process of the job at once, as a node failure does."""
        self.kill_group()
        self.wait(60)


def wait_for(what: str, ok, jobs: list[Job], timeout: float = START_S):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = ok()
        if v:
            return v
        dead = [j for j in jobs if j.proc.poll() is not None]
        if dead:
            pytest.fail(
                f"job exited {dead[0].proc.returncode} while waiting for {what}:\n{dead[0].output()[-6000:]}"
            )
        time.sleep(0.05)
    pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}:\n{jobs[0].output()[-6000:]}")


def finished(job: Job, want: int, timeout: float = RUN_S) -> None:
    rc = job.wait(timeout)
    assert rc == want, f"exit code {rc}, wanted {want}:\n{job.output()[-8000:]}"


def records(run: Path) -> list[dict]:
    f = run / "metrics.jsonl"
    return [json.loads(line) for line in f.read_text().splitlines() if line.strip()] if f.exists() else []


def train_steps(run: Path) -> list[int]:
    return [r["step"] for r in records(run) if "loss" in r]


def logged_step(run: Path, at_least: int, job: Job | None = None):
    """The run logged ``at_least`` steps; with ``job``: after that job's trainers started (a resume
    first drops the records of steps after its checkpoint, then logs its rank table)."""
    return lambda: (
        (job is None or "mico_ds: ranks: " in job.output()) and max(train_steps(run), default=0) >= at_least
    )


def latest_step(run: Path) -> int | None:
    tag = ckpt.read_latest(run / "checkpoints")
    return int(tag[4:]) if tag else None


def trainers(run: Path) -> dict[int, int]:
    """rank -> pid of the training processes of ``run`` (not their data-loader workers)."""
    out = {}
    for pid in hostfile.find_trainers(run_dir=str(run)):
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        ranks = [int(e[5:]) for e in environ if e.startswith(b"RANK=")]
        if ranks:
            out[ranks[0]] = pid
    return out


def signal_ranks_and_workers(run: Path, sig: int) -> list[int]:
    """``sig`` to every rank of ``run`` and every data worker below it (what SLURM's scancel does)."""
    pids = list(trainers(run).values())
    pids += [d for p in pids for d in hostfile.descendants(p)]
    return hostfile.send(pids, sig)


def keys_by_step(run: Path, rank: int) -> dict[int, list]:
    out: dict[int, list] = {}
    for line in (run / "keys" / f"rank{rank}.jsonl").read_text().splitlines():
        r = json.loads(line)
        out.setdefault(r["step"], []).append((r["micro"], r["corpus"], r["keys"]))
    return out


def assert_same_state(a: object, b: object, where: str) -> None:
    if isinstance(a, dict):
        assert isinstance(b, dict) and sorted(a) == sorted(b), (where, a, b)
        for k in a:
            assert_same_state(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), (where, a, b)
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_state(x, y, f"{where}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    elif isinstance(a, np.ndarray):
        assert np.array_equal(a, b), where
    else:
        assert a == b, (where, a, b)


def assert_reproduces(run: Path, ref: Path) -> None:
    """``run`` logged every step once, with the reference's losses, samples and final client state."""
    assert train_steps(run) == list(range(1, STEPS + 1)), "each step logged exactly once"
    want = {r["step"]: r for r in records(ref) if "loss" in r}
    for r in (r for r in records(run) if "loss" in r):
        for k in TERMS:
            assert r[k] == want[r["step"]][k], (r["step"], k, r[k], want[r["step"]][k])
    for rank in (0, 1):
        got, exp = keys_by_step(run, rank), keys_by_step(ref, rank)
        assert sorted(got) == list(range(1, STEPS + 1)), f"rank {rank}: a step's samples recorded twice/never"
        assert got == exp, f"rank {rank} consumed other samples"
        tag = ckpt.tag_for(STEPS)
        a = ckpt.load_client(run / "checkpoints", tag, rank)
        b = ckpt.load_client(ref / "checkpoints", tag, rank)
        parts = ("step", "data", "rng")
        assert_same_state({k: a[k] for k in parts}, {k: b[k] for k in parts}, f"rank{rank}")


# ---------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(autouse=True)
def _no_leftover_jobs():
    """A failed test must not leave its job running (it would load the 2 cores for the next tests)."""
    yield
    while _JOBS:
        job = _JOBS.pop()
        if job.proc.poll() is None:
            job.kill_group()
            job.proc.wait(60)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("resilience_data")


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data_root) -> Path:
    run = tmp_path_factory.mktemp("reference") / "run"
    job = Job(train_cmd(run, *base_args(data_root)), run.parent / "log")
    finished(job, 0)
    return run


# ---------------------------------------------------------------------------------------------- tests


def test_reference_checkpoints_hold_the_client_state(reference: Path):
    ck = reference / "checkpoints"
    # retention in a real run: keep_last=1 and keep_every=4 leave 4 and 8 of the saves 2, 4, 6, 8
    assert ckpt.list_tags(ck) == [ckpt.tag_for(4), ckpt.tag_for(8)]
    assert ckpt.read_latest(ck) == ckpt.tag_for(8)
    meta = ckpt.load_meta(ck, ckpt.tag_for(8))
    assert meta["step"] == STEPS and meta["world_size"] == 2
    assert meta["config"] == yaml.safe_load((reference / "config.yaml").read_text()), "the resolved config"
    states = [ckpt.load_client(ck, ckpt.tag_for(8), r) for r in (0, 1)]
    for rank, st in enumerate(states):
        assert st["step"] == STEPS
        assert st["data"]["step"] == STEPS, "corpus-schedule position"
        stream = st["data"]["corpora"]["omni"]
        assert (stream["rank"], stream["world_size"], stream["workers"]) == (rank, 2, 2)
        assert len(stream["positions"]) == 2 and stream["stats"]["seen"] > 0, "each worker's stream position"
        assert set(st["rng"]) >= {"python", "numpy", "torch"}
    # the recorded samples: 4 per rank and step, no sample twice
    keys = [k for r in (0, 1) for s in keys_by_step(reference, r).values() for _, _, ks in s for k in ks]
    assert len(keys) == 2 * STEPS * 4 and len(set(keys)) == len(keys)


def test_kill_9_then_budget_stop_then_resume_is_exact(reference: Path, data_root: Path, tmp_path: Path):
    run, args = tmp_path / "run", base_args(data_root)
    job = Job(train_cmd(run, *args), tmp_path / "log1")
    wait_for("step 3", logged_step(run, 3), [job])
    job.kill_all()  # every process: launcher, ranks, data workers
    assert not trainers(run), "a rank survived the SIGKILL"
    killed_at, saved = max(train_steps(run)), latest_step(run)
    assert saved is not None and saved <= killed_at < STEPS, (saved, killed_at)

    # the budget is already spent when the first step ends (it counts from process start): one step, 99
    job = Job(train_cmd(run, *args, "--resume", "latest", "--train.max_minutes=0.01"), tmp_path / "log2")
    finished(job, 99)
    assert latest_step(run) == saved + 1
    assert records(run)[-1] == {"step": saved + 1, "event": "preempted", "reason": "max_minutes"}

    job = Job(train_cmd(run, *args, "--resume", "latest"), tmp_path / "log3")
    finished(job, 0)
    assert DROPPED not in job.output()  # the clean stop left nothing past its checkpoint
    assert_reproduces(run, reference)


def test_killed_save_keeps_previous_checkpoint_then_sigterm_then_resume(
    reference: Path, data_root: Path, tmp_path: Path
):
    run, args = tmp_path / "run", base_args(data_root)
    ck, tag = run / "checkpoints", ckpt.tag_for(4)
    job = Job(train_cmd(run, *args), tmp_path / "log1", {"MICO_TEST_STALL_SAVE": "4:1"})
    wait_for("rank 1 stalled in the save of step 4", lambda: (ck / f".stalled-{tag}-rank1").exists(), [job])
    files = sorted(p.name for p in (ck / tag).iterdir())
    assert "zero_pp_rank_0_mp_rank_00_optim_states.pt" in files, files  # rank 0 wrote its part
    assert "zero_pp_rank_1_mp_rank_00_optim_states.pt" not in files, files  # rank 1 did not finish
    job.kill_all()
    assert ckpt.read_latest(ck) == ckpt.tag_for(2), "latest moved although rank 1 never finished"
    with pytest.raises(ValueError, match="not a complete mico_ds checkpoint"):
        ckpt.load_meta(ck, tag)  # so `--resume step00000004` is refused

    # resume from step 2; stop it with SIGTERM to the ranks and their data workers, like scancel
    job = Job(train_cmd(run, *args, "--resume", "latest"), tmp_path / "log2")
    wait_for("a resumed step", logged_step(run, 3, job), [job])
    assert signal_ranks_and_workers(run, signal.SIGTERM)
    finished(job, 99)
    stopped = records(run)[-1]
    assert stopped["event"] == "preempted" and stopped["reason"] == "SIGTERM", stopped
    assert latest_step(run) == stopped["step"] >= 3
    assert DROPPED in job.output()  # steps 3-4 of the killed run were logged, then run again

    finished(Job(train_cmd(run, *args, "--resume", "latest"), tmp_path / "log3"), 0)
    assert ckpt.load_meta(ck, tag)["step"] == 4, "the step-4 save, redone, is complete"
    assert_reproduces(run, reference)


def test_resume_refuses_a_changed_seed_and_batch_size(reference: Path, data_root: Path, tmp_path: Path):
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    corpora = "[{name: omni, shards: omni/train-*.tar, modalities: [image, audio], batch_size: 2}]"
    job = Job(train_cmd(run, *base_args(data_root), "--resume", "latest", "--train.seed=1",
                        f"--data.corpora={corpora}"), tmp_path / "log")  # fmt: skip
    rc = job.wait()
    out = job.output()
    assert rc != 0, out[-4000:]
    assert "would break exact continuation" in out and "--allow-config-change" in out, out[-4000:]
    assert "train.seed" in out and "data.corpora" in out, out[-4000:]
    assert train_steps(run) == list(range(1, STEPS + 1)), "a refused resume wrote nothing"


# ---------------------------------------------------------------------------------------------- two nodes


def two_node_cmd(run: Path, hostfile_path: Path, port: int, *args: str) -> list[str]:
    """What launch/slurm_pretrain.sh runs on every node: node-run around a --no_ssh launcher."""
    return [
        sys.executable, "-u", str(REPO / "launch" / "hostfile.py"), "node-run", "--",
        sys.executable, "-u", "-m", "deepspeed.launcher.runner", "--hostfile", str(hostfile_path),
        "--no_ssh", "--node_rank", "{node_rank}", "--master_addr", "127.0.0.1", "--master_port", str(port),
        "--no_local_rank", "--module", "mico_ds.train", "--recipe", "debug", "--run-dir", str(run), *args,
    ]  # fmt: skip


def start_two_nodes(
    run: Path, tmp: Path, name: str, *args: str, extra_env: dict[str, str] | None = None
) -> list[Job]:
    hf = tmp / "hostfile"
    # two host names for this machine: DeepSpeed refuses a hostfile that names a host twice
    hf.write_text("127.0.0.1 slots=1\nlocalhost slots=1\n")
    port = free_port()
    cmd = two_node_cmd(run, hf, port, *args)
    return [Job(cmd, tmp / f"{name}.node{n}", {**(extra_env or {}), "NODE_RANK": str(n)}) for n in (0, 1)]


def test_two_nodes_train_stop_and_resume(reference: Path, data_root: Path, tmp_path: Path):
    run, args = tmp_path / "run", base_args(data_root)
    jobs = start_two_nodes(run, tmp_path, "first", *args)
    wait_for("step 2 on two nodes", logged_step(run, 2), jobs)
    assert sorted(trainers(run)) == [0, 1]
    # what the SLURM script does on a preemption: SIGUSR1 to the trainers and node-run wrappers of the run
    subprocess.run([sys.executable, str(REPO / "launch" / "hostfile.py"), "signal", "--run-dir", str(run)],
                   check=True, env=env())  # fmt: skip
    for j in jobs:
        finished(j, 99)
    saved = latest_step(run)
    assert saved is not None and saved < STEPS
    for n in (0, 1):
        out = (tmp_path / f"first.node{n}").read_text()
        assert f"node_rank={n}" in out and "nnodes=2" in out, out[-3000:]
    jobs = start_two_nodes(run, tmp_path, "second", *args, "--resume", "latest")
    for j in jobs:
        finished(j, 0)
    # the same world size on one node or two: the very same run
    assert_reproduces(run, reference)


# ---------------------------------------------------------------------------------------------- a rank dies

# The job must end this soon after the kill: launcher poll 1 s + its 30 s grace, a gloo error or timeout.
DIES_S = 150


def kill_rank_1(run: Path) -> int:
    pid = trainers(run)[1]
    os.kill(pid, signal.SIGKILL)
    return pid


def test_killed_rank_ends_the_job_and_is_named(data_root: Path, tmp_path: Path):
    run = tmp_path / "run"
    args = [*data_overrides(data_root), "--train.max_steps=1000", "--train.save_every=0",
            "--data.num_workers=2", "--train.dist_timeout_s=60", "--train.progress=false"]  # fmt: skip
    job = Job(train_cmd(run, *args), tmp_path / "log")
    wait_for("step 1", logged_step(run, 1), [job])
    pid = kill_rank_1(run)
    t0 = time.monotonic()
    rc = job.wait(DIES_S)
    out = job.output()
    assert rc != 0, out[-4000:]
    assert time.monotonic() - t0 < DIES_S
    assert f"rank 1 (pid {pid} on " in out and "died" in out, out[-6000:]


def test_rank_killed_in_a_save_on_another_node_ends_both_nodes(data_root: Path, tmp_path: Path):
    run = tmp_path / "run"
    ck, tag = run / "checkpoints", ckpt.tag_for(2)
    args = [*data_overrides(data_root), "--train.max_steps=1000", "--train.save_every=2",
            "--data.num_workers=2", "--train.dist_timeout_s=60", "--train.progress=false"]  # fmt: skip
    # rank 1 stops after its DeepSpeed files, before its client state; rank 0 waits for it in the save
    jobs = start_two_nodes(run, tmp_path, "dies", *args, extra_env={"MICO_TEST_STALL_SAVE": "2:1:client"})
    wait_for("rank 1 stalled in the save of step 2", lambda: (ck / f".stalled-{tag}-rank1").exists(), jobs)
    wait_for("rank 0's part of the save", lambda: (ck / tag / "client" / "rank0.pt").exists(), jobs)
    pid = kill_rank_1(run)  # node 1's only rank: its launcher ends; node 0 must end by itself
    t0 = time.monotonic()
    rcs = [j.wait(DIES_S) for j in jobs]
    out0 = jobs[0].output()
    assert all(rc != 0 for rc in rcs), (rcs, out0[-4000:])
    assert time.monotonic() - t0 < DIES_S
    assert f"rank 1 (pid {pid} on " in out0 and "died" in out0, out0[-6000:]
    assert "rank 0 (pid" in out0 and "failed in the save after step 2" in out0, out0[-6000:]
    # every DeepSpeed file is there, rank 1's client state is not: the checkpoint is not complete
    files = {p.name for p in (ck / tag).iterdir()} | {p.name for p in (ck / tag / "client").iterdir()}
    assert {f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in (0, 1)} <= files, files
    assert "rank0.pt" in files and "rank1.pt" not in files, files
    assert "meta.json" not in files and ckpt.read_latest(ck) is None, files


# ---------------------------------------------------------------------------------------------- bad steps

GUARDED = ["--train.max_bad_steps=2", "--train.spike_sigmas=3", "--train.spike_window=2"]
# Rank 1's batch of step 3 decodes to NaN: skipped. Rank 0's batches of steps 5 and 6 too: two in a row,
# so back to step 4, skipping their data. After that, step 6 reads the batch of step 8, whose loss rank 1
# sees 100x higher: a spike, back to step 4 again, skipping the 4 batches read since.
FAULTS = "3:1:nan,5:0:nan,6:0:nan,8:1:spike"


def keys_in_order(run: Path, rank: int) -> list[tuple[int, list]]:
    lines = (run / "keys" / f"rank{rank}.jsonl").read_text().splitlines()
    return [(r["step"], r["keys"]) for r in map(json.loads, lines)]


def engine_state(run: Path, step: int) -> dict:
    f = run / "checkpoints" / ckpt.tag_for(step) / "zero_pp_rank_0_mp_rank_00_model_states.pt"
    return torch.load(f, map_location="cpu", weights_only=False)  # our own test checkpoint


def nonfinite(obj: object, path: str = "") -> dict[str, list[int]]:
    """Where a checkpoint's float tensors hold NaN or inf (path -> flat indices)."""
    if isinstance(obj, torch.Tensor):
        if obj.is_floating_point() and not bool(torch.isfinite(obj).all()):
            return {path: (~torch.isfinite(obj.detach())).flatten().nonzero().flatten().tolist()}
        return {}
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, (list, tuple)) else []
    return {k: v for key, val in items for k, v in nonfinite(val, f"{path}/{key}").items()}


@pytest.fixture(scope="module")
def guarded(reference: Path, data_root: Path, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("guarded") / "run"
    job = Job(
        train_cmd(run, *base_args(data_root), *GUARDED), run.parent / "log", {"MICO_TEST_FAULT": FAULTS}
    )
    finished(job, 0)
    return run


def test_nonfinite_steps_are_skipped_without_an_update(guarded: Path, reference: Path):
    recs = records(guarded)
    skipped = [r for r in recs if r.get("event") == "skipped_step"]
    assert [r["step"] for r in skipped] == [3, 5, 6], skipped
    ref = {r: keys_by_step(reference, r) for r in (0, 1)}
    for r in skipped:  # every rank's keys of the batch that did it, for the data engineer
        assert r["keys"] == [[k for _, _, k in ref[rank][r["step"]]] for rank in (0, 1)], r["step"]
        assert all(math.isnan(v) for v in r["terms"].values()), r
    # DeepSpeed's own books at checkpoint 4: 4 steps, 1 of them skipped, the schedule advanced 3 times
    got, want = engine_state(guarded, 4), engine_state(reference, 4)
    assert (got["global_steps"], got["skipped_steps"]) == (4, 1), (got["global_steps"], got["skipped_steps"])
    assert (want["global_steps"], want["skipped_steps"]) == (4, 0)
    assert got["lr_scheduler"]["last_epoch"] == want["lr_scheduler"]["last_epoch"] - 1
    # nothing non-finite reached the weights or the optimizer: NaN only where the uninterrupted run has
    # it too (ZeRO-3 pads each partitioned parameter to the world size with uninitialized memory)
    for f in sorted((reference / "checkpoints" / ckpt.tag_for(STEPS)).glob("*.pt")):
        g = guarded / "checkpoints" / ckpt.tag_for(STEPS) / f.name
        want = nonfinite(torch.load(f, map_location="cpu", weights_only=False))
        assert nonfinite(torch.load(g, map_location="cpu", weights_only=False)) == want, g
    final = [r for r in recs if "loss" in r]
    assert [r["step"] for r in final] == list(range(1, STEPS + 1)), "each step logged once"
    assert all(math.isfinite(r["loss"]) for r in final if r["step"] != 3), final


def test_bad_runs_and_spikes_roll_back_and_skip_their_data(guarded: Path, reference: Path):
    events = [r for r in records(guarded) if r.get("event") == "rollback"]
    assert [(e["step"], e["from_step"], e["skipped_micro_batches"]) for e in events] == [(4, 6, 2), (4, 6, 4)]
    assert "2 skipped (non-finite) steps in a row" in events[0]["reason"]
    assert events[1]["reason"].startswith("loss spike: "), events[1]
    for rank in (0, 1):
        ref = {s: [k for _, _, k in v] for s, v in keys_by_step(reference, rank).items()}
        got = keys_in_order(guarded, rank)
        # the first pass: steps 1-6; the second pass (after the first rollback): steps 5-6 on the data of 7-8
        assert [s for s, _ in got] == [1, 2, 3, 4, 5, 6, 5, 6, 5, 6, 7, 8]
        assert [k for _, k in got[:6]] == [ref[s][0] for s in range(1, 7)]
        assert [k for _, k in got[6:8]] == [ref[7][0], ref[8][0]], f"rank {rank}: the window was not skipped"
    skips = json.loads((guarded / "data_skips.json").read_text())
    assert skips["4"]["micro_batches"] == 4 and skips["4"]["world_size"] == 2, skips


def test_a_resume_skips_the_rolled_back_window_again(guarded: Path, data_root: Path, tmp_path: Path):
    run = tmp_path / "run"
    shutil.copytree(guarded, run)
    shutil.rmtree(run / "checkpoints" / ckpt.tag_for(STEPS))
    ckpt.write_latest(run / "checkpoints", ckpt.tag_for(4))  # as if the run had died right after step 4
    finished(Job(train_cmd(run, *base_args(data_root), *GUARDED, "--resume", "latest"), tmp_path / "log"), 0)
    want = {r["step"]: r for r in records(guarded) if "loss" in r}
    for r in (r for r in records(run) if "loss" in r and r["step"] > 4):
        for k in TERMS:
            assert r[k] == want[r["step"]][k], (r["step"], k)
    for rank in (0, 1):
        assert keys_in_order(run, rank)[-4:] == keys_in_order(guarded, rank)[-4:]


def test_zero0_skips_a_nonfinite_step_too(data_root: Path, tmp_path: Path):
    """ZeRO-0 steps a plain torch optimizer, which has no overflow check: the trainer's own path."""
    run = tmp_path / "run"
    args = [*data_overrides(data_root), "--train.ds_config=zero0_cpu.json", "--train.max_steps=4",
            "--train.save_every=0", "--eval.tasks=[]", "--train.progress=false"]  # fmt: skip
    finished(Job(train_cmd(run, *args), tmp_path / "log", {"MICO_TEST_FAULT": "2:0:nan"}), 0)
    assert [r["step"] for r in records(run) if r.get("event") == "skipped_step"] == [2]
    assert all(math.isfinite(r["loss"]) for r in records(run) if "loss" in r and r["step"] != 2)
    state = torch.load(run / "checkpoints" / ckpt.tag_for(4) / "mp_rank_00_model_states.pt",
                       map_location="cpu", weights_only=False)  # fmt: skip
    assert (state["global_steps"], state["skipped_steps"]) == (4, 1)
    assert nonfinite(state["module"]) == {} and nonfinite(state["optimizer"]) == {}
