"""A rank that fails or freezes ends the whole job, fast, named, with nothing left running.

Real 2-rank CPU jobs (gloo, ZeRO-3) under the `deepspeed` launcher, on one "node" and on two (two
launchers through ``launch/hostfile.py node-run``, as launch/slurm_pretrain.sh starts them):

* a rank whose data worker raises (as a bug in the data path would: before fail-fast, the failed
  rank hung in its exit and the job waited for the collective timeout) ends every rank of both nodes
  within seconds, although the other rank waits for it inside a collective and
  ``train.dist_timeout_s`` is 600 s; every log names the first error and its rank
  (mico_ds/train/failfast.py);
* a rank stopped with SIGSTOP (alive, but it will never answer) ends the job within
  ``train.dist_timeout_s`` plus a bounded margin, on one node and on two, and the log names it;
* a shard with bad and unusual members (a NaN float WAV and a lone-surrogate caption, which crashed a
  data worker before; a PNG header claiming 60,000 x 60,000; a member over ``data.limits``; a 16-bit PNG
  and a CMYK JPEG) trains to the end, the bad ones counted by reason over both ranks.
"""

from __future__ import annotations

import io
import json
import os
import re
import signal
import struct
import tarfile
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from PIL import Image

from tests.helpers.train import data_overrides, train_cmd
from tests.integration.test_resilience import (  # noqa: F401 -- _no_leftover_jobs: its autouse fixture
    Job,
    _no_leftover_jobs,
    hostfile,
    logged_step,
    start_two_nodes,
    trainers,
    wait_for,
)

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

TIMEOUT_S = 15  # train.dist_timeout_s of the frozen-rank runs
# After a failure: the notice is polled once a second, the launchers poll their ranks once a second.
FAST_S = 30
# After a freeze: the timeout, then the DeepSpeed launcher's 30 s SIGTERM grace (a stopped process
# keeps SIGTERM pending) or node-run's 10 s grace, plus the load of 2 busy cores.
FROZEN_S = TIMEOUT_S + 75


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("rank_faults_data")


def args(data_root: Path, timeout_s: float) -> list[str]:
    return [*data_overrides(data_root), "--train.max_steps=1000", "--train.save_every=0",
            "--data.num_workers=2", f"--train.dist_timeout_s={timeout_s}", "--train.progress=false",
            "--train.log_every=1", "--eval.tasks=[]"]  # fmt: skip


def no_process_left(run: Path) -> None:
    left = hostfile.find_trainers(run_dir=str(run), wrappers=True)
    left += [d for p in left for d in hostfile.descendants(p)]
    assert not left, f"processes of {run} still running: {left}"


def freeze_rank_1(run: Path, jobs: list[Job]) -> tuple[int, float]:
    wait_for("step 2", logged_step(run, 2), jobs)
    pid = trainers(run)[1]
    os.kill(pid, signal.SIGSTOP)
    return pid, time.monotonic()


def test_a_failing_rank_ends_both_nodes_in_seconds(data_root: Path, tmp_path: Path):
    run = tmp_path / "run"
    jobs = start_two_nodes(run, tmp_path, "fails", *args(data_root, 600),
                           extra_env={"MICO_TEST_FAULT": "2:1:worker"})  # fmt: skip
    notice = run / "launch" / "failure.json"
    wait_for("rank 1's failure notice", notice.exists, jobs)
    t0 = time.monotonic()
    rcs = [j.wait(FAST_S + 30) for j in jobs]
    took = time.monotonic() - t0
    out0, out1 = (j.output() for j in jobs)
    assert all(rc != 0 for rc in rcs), (rcs, out0[-4000:])
    assert took < FAST_S, f"the job took {took:.0f} s to end after the failure:\n{out0[-4000:]}"
    # the worker's error surfaces on rank 1 with the worker's own line (health.error_line)
    first = re.compile(
        r"rank 1 \(pid \d+ on \S+\) failed in step \d+: RuntimeError: Caught RuntimeError in DataLoader "
        r"worker process \d\. \.\.\. RuntimeError: MICO_TEST_FAULT: a data worker of rank 1 raises"
    )
    assert first.search(out1), out1[-4000:]
    # rank 0 was waiting for rank 1 in a collective: it names the first error, not only its own symptom
    # (its watch ends it on the notice, or the collective fails first when rank 1's sockets close)
    assert re.search(r"(ending rank 0: |the first failure: )" + first.pattern, out0), out0[-4000:]
    no_process_left(run)


def test_a_stopped_rank_ends_the_job_and_is_named(data_root: Path, tmp_path: Path):
    run = tmp_path / "run"
    job = Job(train_cmd(run, *args(data_root, TIMEOUT_S)), tmp_path / "log")
    pid, t0 = freeze_rank_1(run, [job])
    rc = job.wait(FROZEN_S + 60)
    took = time.monotonic() - t0
    out = job.output()
    assert rc != 0, out[-4000:]
    assert took < FROZEN_S, f"{took:.0f} s:\n{out[-4000:]}"
    stopped = f"rank 1 (pid {pid} on {os.uname().nodename}) is stopped"
    assert stopped in out, out[-6000:]
    assert "rank 0 (pid" in out and "failed in step" in out and "Timed out" in out, out[-6000:]
    no_process_left(run)


def test_a_stopped_rank_on_another_node_ends_both_nodes(data_root: Path, tmp_path: Path):
    run = tmp_path / "run"
    jobs = start_two_nodes(run, tmp_path, "frozen", *args(data_root, TIMEOUT_S))
    pid, t0 = freeze_rank_1(run, jobs)  # node 1's only rank: nothing on node 1 can answer
    rcs = [j.wait(FROZEN_S + 60) for j in jobs]
    took = time.monotonic() - t0
    out0, out1 = (j.output() for j in jobs)
    assert all(rc != 0 for rc in rcs), (rcs, out0[-4000:])
    assert took < FROZEN_S, f"{took:.0f} s:\n{out0[-4000:]}\n{out1[-4000:]}"
    assert f"rank 1 (pid {pid} on " in out0 and "is stopped" in out0, out0[-6000:]
    # node 1's wrapper saw rank 0's failure notice and ended its frozen rank
    assert "a rank failed (rank 0 on " in out1 and "killed the trainers still running here" in out1, out1[
        -4000:
    ]
    assert str(pid) in out1.split("killed the trainers still running here")[1].splitlines()[0]
    no_process_left(run)


# ---------------------------------------------------------------------------------------------- bad data


def _png_claiming(width: int, height: int) -> bytes:
    """A real 8x8 PNG whose IHDR (CRC fixed) claims ``width`` x ``height``: a decompression bomb's header."""
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 10, 10)).save(buf, format="PNG")
    png = bytearray(buf.getvalue())
    png[16:24] = struct.pack(">II", width, height)  # IHDR data starts after signature(8)+len(4)+type(4)
    png[29:33] = struct.pack(">I", zlib.crc32(bytes(png[12:29])))
    return bytes(png)


def _encoded(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _nan_wav() -> bytes:
    wave = np.sin(np.linspace(0, 200, 16000)).astype(np.float32)
    wave[100:200] = np.nan  # a float WAV a broken encoder wrote: kaldi's filterbank raised on it
    buf = io.BytesIO()
    sf.write(buf, wave, 16000, format="WAV", subtype="FLOAT")
    return buf.getvalue()


def rewrite_with_bad_samples(shard: Path) -> dict[str, str]:
    """Replace members of six samples of ``shard`` in place; returns key -> what was done to it."""
    noisy = Image.fromarray(np.random.default_rng(0).integers(0, 255, (400, 400, 3), dtype=np.uint8))
    swaps = {  # sample index: (member extension to drop, new extension, new bytes, what)
        1: ("flac", "wav", _nan_wav(), "nan_wav"),
        2: ("jpg", "png", _png_claiming(60_000, 60_000), "bomb"),
        3: ("jpg", "jpg", _encoded(noisy, "JPEG", quality=100), "too_large"),
        4: ("jpg", "png", _encoded(Image.fromarray(np.full((40, 40), 30000, np.uint16)), "PNG"), "png16"),
        5: ("jpg", "jpg", _encoded(Image.new("CMYK", (40, 40), (0, 200, 200, 0)), "JPEG"), "cmyk"),
    }
    with tarfile.open(shard) as t:
        members = [(m, t.extractfile(m).read()) for m in t.getmembers()]
    keys = sorted({m.name.split(".", 1)[0] for m, _ in members})
    done = {keys[i]: what for i, (_, _, _, what) in swaps.items()}
    done[keys[6]] = "surrogate"
    tmp = shard.with_name(shard.name + ".tmp")
    with tarfile.open(tmp, "w") as out:
        for m, data in members:
            key, ext = m.name.split(".", 1)
            i = keys.index(key)
            if i in swaps and ext == swaps[i][0]:
                _, ext, data, _ = swaps[i]
            elif i == 6 and ext == "json":  # a lone surrogate: valid JSON, not encodable text
                meta = json.loads(data)
                meta["captions"] = {k: v + " \ud800" for k, v in meta["captions"].items()}
                data = json.dumps(meta).encode()
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size = len(data)
            out.addfile(info, io.BytesIO(data))
    os.replace(tmp, shard)
    return done


def test_bad_and_unusual_samples_are_counted_skips_not_a_stopped_run(tmp_path: Path):
    from mico_ds.demo import ensure_demo_corpus

    data = tmp_path / "data"
    # the debug recipe's corpus
    ensure_demo_corpus(data, num_train=64, num_val=32, num_tune=32, progress=False)
    done = rewrite_with_bad_samples(data / "omni" / "train-000000.tar")
    run = tmp_path / "run"
    args = [*data_overrides(data), "--train.max_steps=10", "--train.save_every=0", "--data.num_workers=2",
            "--train.progress=false", "--eval.tasks=[]", "--train.record_keys=true",
            "--data.limits.member_bytes=100000"]  # fmt: skip
    job = Job(train_cmd(run, *args), tmp_path / "log")
    rc = job.wait(300)
    out = job.output()
    assert rc == 0, out[-6000:]
    last = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()][-1]
    skipped = {k.split("/")[-1]: v for k, v in last.items() if k.startswith("skipped/omni/")}
    # 10 steps x 8 samples read the 64-sample shard about 1.5 times: every bad sample at least once
    assert skipped["seen"] >= 80, skipped
    # (every caption of the surrogate sample carries one: none is left, missing_caption)
    for reason in ("too_many_pixels", "too_large_member", "bad_audio", "missing_caption"):
        assert skipped.get(reason, 0) >= 1, (reason, skipped)
    used = {k for r in (0, 1) for line in (run / "keys" / f"rank{r}.jsonl").read_text().splitlines()
            for k in json.loads(line)["keys"]}  # fmt: skip
    for key, what in done.items():
        # the unusual but valid ones train, the bad ones never reach a batch
        assert (key in used) == (what in ("png16", "cmyk")), (key, what, skipped)
