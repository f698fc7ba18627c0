"""Checkpoint faults of a real run: 2 CPU ranks (gloo, ZeRO-3) of the `debug` recipe under the
`deepspeed` launcher.

* A full disk during a save: the run dir is on a tmpfs this module mounts, sized so the step-2
  checkpoint fits and the step-4 one does not. The save fails on some rank with ENOSPC; every rank stops
  with one message naming the directory and the space needed, `latest` stays on step 2, the partial step-4
  directory is gone. A resume on the same disk is refused up front (free space < the previous
  checkpoint's size), nothing written; after a remount with more space the resume continues from step 2
  to the end.
* A damaged checkpoint (a flipped byte, a truncated file): ``--resume latest`` falls back to the
  newest intact checkpoint with a warning naming the file and finishes with the same losses;
  ``--resume TAG`` of the damaged one is an error naming the file; ``tools/zero_to_fp32.py`` and
  ``tools/to_universal.py`` refuse it (``--no-verify``: DeepSpeed reads the flipped byte unnoticed).

The damaged-checkpoint tests copy the finished full-disk run (or, where mount is not permitted, a run
of their own). About 90 s on 2 cores.
"""

from __future__ import annotations

import functools
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from mico_ds import checkpoint as ckpt
from mico_ds.checkpoint import manifest, saving
from tests.helpers.train import data_overrides, train_cmd
from tests.integration.test_convert import tool_main
from tests.integration.test_resilience import (  # noqa: F401 -- _no_leftover_jobs: an autouse fixture
    Job,
    _no_leftover_jobs,
    finished,
    records,
    train_steps,
)

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

STEPS = 4
# Measured: a debug-recipe checkpoint of 2 ranks takes 1.40 MB (1.43 MB in 4 KiB blocks); the run dir
# besides it ~0.1 MB. The disk holds one checkpoint and about half of a second one.
CKPT_BYTES = 1_404_000
DISK = "2240k"
BIGGER = "16m"
STOP_S = 60  # a failed save must end the job this soon after the error (not a collective's timeout)
OPTIM1 = "zero_pp_rank_1_mp_rank_00_optim_states.pt"
MODEL0 = "zero_pp_rank_0_mp_rank_00_model_states.pt"
TAG2, TAG4 = ckpt.tag_for(2), ckpt.tag_for(4)


def base_args(data_root: Path) -> list[str]:
    return [*data_overrides(data_root), f"--train.max_steps={STEPS}", "--train.save_every=2",
            "--checkpoint.keep_last=2", "--train.deterministic=true", "--eval.tasks=[]",
            "--train.progress=false", "--train.dist_timeout_s=120"]  # fmt: skip


@functools.cache
def mount_refused() -> str | None:
    """Why a tmpfs cannot be mounted here (None: it can)."""
    probe = Path(tempfile.mkdtemp(prefix="mico_mount_probe"))
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(probe)],
                       capture_output=True, text=True)  # fmt: skip
    if r.returncode == 0:
        subprocess.run(["umount", str(probe)], check=True)
    probe.rmdir()
    if r.returncode != 0:
        return f"cannot mount a tmpfs for the full-disk test (needs root / CAP_SYS_ADMIN): {r.stderr.strip()}"
    return None


def wait_timing(job: Job, text: str, timeout: float = 300) -> tuple[int, float | None]:
    """Wait for ``job``; returns its exit code and how long it ran on after ``text`` appeared in its log."""
    deadline, seen = time.monotonic() + timeout, None
    while job.proc.poll() is None and time.monotonic() < deadline:
        if seen is None and text in job.output():
            seen = time.monotonic()
        time.sleep(0.1)
    rc = job.wait(max(deadline - time.monotonic(), 1))
    if seen is None and text in job.output():
        seen = time.monotonic()
    return rc, None if seen is None else time.monotonic() - seen


def losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in records(run) if "loss" in r}


def flip_byte(f: Path) -> None:
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0x01  # the middle of an optimizer file: inside a tensor's bytes
    f.write_bytes(data)


class FullDisk:
    """The three jobs on the small disk and what each saw."""

    def __init__(self, mnt: Path, data_root: Path) -> None:
        self.run = mnt / "run"
        ck = self.run / "checkpoints"
        args = base_args(data_root)
        # 1. the step-4 save runs out of space (the up-front check off: a real ENOSPC)
        self.first = Job(
            train_cmd(self.run, *args, "--checkpoint.check_free_space=false"), mnt.parent / "log1"
        )
        self.first_rc, self.stop_s = wait_timing(self.first, "could not be saved")
        self.first_out = self.first.output()
        self.after_first = (ckpt.read_latest(ck), ckpt.list_tags(ck), sorted(p.name for p in ck.iterdir()))
        self.first_ckpt = saving.checkpoint_size(ck / TAG2)
        # 2. a resume on the same disk: refused before writing
        self.second = Job(train_cmd(self.run, *args, "--resume", "latest"), mnt.parent / "log2")
        self.second_rc = self.second.wait()
        self.second_out = self.second.output()
        self.after_second = (ckpt.read_latest(ck), ckpt.list_tags(ck))
        # 3. more space: the resume continues from step 2 to the end
        subprocess.run(["mount", "-o", f"remount,size={BIGGER}", str(mnt)], check=True)
        self.third = Job(train_cmd(self.run, *args, "--resume", "latest"), mnt.parent / "log3")
        self.third_rc = self.third.wait()
        self.third_out = self.third.output()


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("faults_data")


@pytest.fixture(scope="module")
def full_disk(tmp_path_factory, data_root) -> FullDisk:
    why = mount_refused()
    if why:
        pytest.skip(why)
    mnt = tmp_path_factory.mktemp("full_disk") / "disk"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={DISK}", "tmpfs", str(mnt)], check=True)
    try:
        yield FullDisk(mnt, data_root)
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, data_root, request) -> Path:
    """A finished run with intact checkpoints at steps 2 and 4 (latest), on an ordinary disk."""
    out = tmp_path_factory.mktemp("finished") / "run"
    if mount_refused() is None:
        fd = request.getfixturevalue("full_disk")
        assert fd.third_rc == 0, fd.third_out[-6000:]
        shutil.copytree(fd.run, out)
    else:
        finished(Job(train_cmd(out, *base_args(data_root)), out.parent / "log"), 0)
    assert ckpt.list_tags(out / "checkpoints") == [TAG2, TAG4]
    return out


# ---------------------------------------------------------------------------------------------- a full disk


def test_a_full_disk_stops_every_rank_with_the_space_needed_and_keeps_latest(full_disk: FullDisk) -> None:
    fd, out = full_disk, full_disk.first_out
    ck = fd.run / "checkpoints"
    assert abs(fd.first_ckpt - CKPT_BYTES) < 0.1 * CKPT_BYTES, f"re-measure CKPT_BYTES: {fd.first_ckpt}"
    assert fd.first_rc != 0, out[-6000:]
    assert fd.stop_s is not None and fd.stop_s < STOP_S, (fd.stop_s, out[-6000:])
    latest, tags, names = fd.after_first
    assert latest == TAG2 and tags == [TAG2], (latest, tags)
    assert TAG4 not in names and not any(n.startswith(".") and TAG4 in n for n in names), names
    # every rank stopped on the same error, in the save (not in a collective that timed out)
    head = (
        f"CheckpointSaveError: checkpoint {TAG4} could not be saved in {ck}: "
        "disk full: [Errno 28] No space left on device"
    )
    for rank in (0, 1):
        failed = rf"rank {rank} \(pid \d+ on [^)]+\) failed in the save after step \d+"
        assert re.search(rf"{failed}: {re.escape(head)}", out), out[-6000:]
    m = re.search(
        r"The checkpoint needs [\d.]+ \w+ \((\d+) bytes\), ([\d.]+ \w+|\d+ bytes) is free there", out
    )
    assert m, out[-6000:]
    need = int(m.group(1))
    assert abs(need - fd.first_ckpt) < 0.02 * fd.first_ckpt, (need, fd.first_ckpt)  # counted exactly
    assert f"`latest` still names {TAG2}" in out and "--resume latest" in out
    assert "Timeout" not in out and "Connection reset" not in out, out[-6000:]


def test_a_resume_on_the_full_disk_is_refused_before_writing(full_disk: FullDisk) -> None:
    fd, out = full_disk, full_disk.second_out
    assert fd.second_rc != 0, out[-6000:]
    want = f"checkpoint {TAG4} would not fit in {fd.run / 'checkpoints'}: disk full: it needs about"
    for rank in (0, 1):
        assert re.search(
            rf"rank {rank} \(pid \d+ on [^)]+\) failed in the save after step \d+: "
            rf"CheckpointSaveError: {want}",
            out,
        ), out[-6000:]
    assert f"({fd.first_ckpt} bytes, the size of {TAG2})" in out and "nothing was written" in out
    assert fd.after_second == (TAG2, [TAG2])


def test_with_more_space_the_run_resumes_from_the_previous_checkpoint(full_disk: FullDisk) -> None:
    fd, out = full_disk, full_disk.third_out
    assert fd.third_rc == 0, out[-6000:]
    assert f"resumed from {fd.run / 'checkpoints' / TAG2} at step 2 (verified 7 files" in out, out[-6000:]
    assert train_steps(fd.run) == list(range(1, STEPS + 1)), "each step logged once"
    ck = fd.run / "checkpoints"
    assert ckpt.read_latest(ck) == TAG4 and manifest.check(ck / TAG4)[1] == []


# ---------------------------------------------------------------------------------------------- damage


def test_a_damaged_latest_is_refused_by_the_tools_and_resume_falls_back(
    finished_run: Path, data_root: Path, tmp_path: Path, capsys
) -> None:
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    ck = run / "checkpoints"
    flip_byte(ck / TAG4 / OPTIM1)

    capsys.readouterr()
    assert tool_main("zero_to_fp32", str(run), str(tmp_path / "out"), "--quiet") == 2
    err = capsys.readouterr().err
    assert f"{ck / TAG4} is damaged: {OPTIM1}: checksum mismatch (CRC-32 " in err and "--no-verify" in err, (
        err
    )
    assert not (tmp_path / "out").exists()
    assert tool_main("to_universal", str(run)) == 2
    assert f"{OPTIM1}: checksum mismatch" in capsys.readouterr().err
    assert not list(ck.glob("*universal*"))
    # unverified, DeepSpeed reads the flipped bit without noticing
    assert tool_main("zero_to_fp32", str(run), str(tmp_path / "out"), "--quiet", "--no-verify") == 0

    job = Job(train_cmd(run, *base_args(data_root), "--resume", "latest"), tmp_path / "log")
    finished(job, 0)
    out = job.output()
    assert f"checkpoint {ck / TAG4} is damaged, not resuming from it: {OPTIM1}: checksum mismatch" in out, (
        out[-6000:]
    )
    assert f"resuming from {TAG2}, the newest intact checkpoint (`latest` names {TAG4})" in out
    assert f"resumed from {ck / TAG2} at step 2" in out and f"{ck / 'latest'} now names {TAG2}" in out
    assert losses(run) == losses(finished_run), "steps 3-4 again, with the same losses"
    assert ckpt.read_latest(ck) == TAG4 and manifest.check(ck / TAG4)[1] == [], "step 4 saved anew, intact"


def test_resuming_a_named_damaged_checkpoint_is_an_error_naming_the_file(
    finished_run: Path, data_root: Path, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    f = run / "checkpoints" / TAG4 / MODEL0
    f.write_bytes(f.read_bytes()[:-4096])  # a partial copy
    job = Job(train_cmd(run, *base_args(data_root), "--resume", TAG4), tmp_path / "log")
    rc = job.wait()
    out = job.output()
    assert rc != 0, out[-6000:]
    assert f"{run / 'checkpoints' / TAG4} is damaged: {MODEL0}: wrong size (" in out, out[-6000:]
    assert "--resume latest takes the newest intact one" in out
    assert train_steps(run) == list(range(1, STEPS + 1)), "nothing was trained or written"
