"""A corpus ingestion killed with SIGKILL mid-shard continues where it stopped when rerun with the same
arguments, and writes the bytes an uninterrupted run writes (shards, sizes.json, reports), with another
number of workers; its worker processes do not outlive it; changed arguments are refused, --overwrite
starts over, too many skips fail the run with the shards kept."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mico_ds.data import schema
from mico_ds.data.write.ingest import KILL_HOOK, STATE_FILE, IngestError, TooManySkipped, ingest
from tests.unit.data.test_ingest_formats import write_webvid

REPO = Path(__file__).resolve().parents[3]
RECORDS, MISSING = 14, 1  # write_webvid leaves record 1 without its video


def outputs(out: Path) -> dict[str, bytes]:
    names = [p.name for p in out.glob("*.tar")] + [schema.SIZES_FILE, "skipped.txt", "notes.txt"]
    return {n: (out / n).read_bytes() for n in sorted(names)}


def survivors(marker: str) -> list[int]:
    """Processes whose environment carries ``marker`` (the killed run's workers, if they live on)."""
    found = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit() and int(p.name) != os.getpid():
            try:
                if marker.encode() in (p / "environ").read_bytes():
                    found.append(int(p.name))
            except OSError:
                continue
    return found


def test_killed_run_continues_to_the_same_bytes(tmp_path: Path) -> None:
    csv_path, data = write_webvid(tmp_path, RECORDS)
    common = dict(media_root=data, samples_per_shard=2, progress=False)
    one_go = ingest("webvid", [csv_path], tmp_path / "a", workers=1, **common)
    assert (one_go["num_samples"], one_go["skipped"], len(one_go["sizes"])) == (RECORDS - MISSING, MISSING, 7)

    out = tmp_path / "b"
    cmd = [sys.executable, "tools/make_shards.py", "--format", "webvid", "--annotations", str(csv_path),
           "--media-root", str(data), "--out", str(out), "--samples-per-shard", "2",
           "--workers", "2"]  # fmt: skip
    marker = f"MICO_TEST_MARK={tmp_path}"
    env = {**os.environ, KILL_HOOK: "7", "MICO_TEST_MARK": str(tmp_path)}
    killed = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert killed.returncode == -9, killed.stderr  # SIGKILL as the 7th sample went into shard 3
    state = json.loads((out / STATE_FILE).read_text())
    assert (state["consumed"], list(state["shards"]), state["complete"]) == (
        7, ["webvid-000000.tar", "webvid-000001.tar", "webvid-000002.tar"], False)  # fmt: skip
    assert [p.name.startswith(".webvid-000003.tar.tmp") for p in out.glob(".webvid-*")] == [True]
    assert not (out / schema.SIZES_FILE).exists()
    deadline = time.monotonic() + 5
    while survivors(marker) and time.monotonic() < deadline:  # the workers notice and exit
        time.sleep(0.1)
    assert survivors(marker) == []

    resumed = subprocess.run([*cmd, "--workers", "3"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert resumed.returncode == 0, resumed.stderr
    assert "continuing after 7 records (3 complete shards)" in resumed.stderr
    assert f"13 samples in 7 shard(s) under {out} (1 skipped: missing_file 1" in resumed.stdout
    assert outputs(out) == outputs(tmp_path / "a")  # byte for byte
    assert not list(out.glob(".webvid-*"))
    assert json.loads((out / STATE_FILE).read_text())["complete"] is True

    again = ingest("webvid", [csv_path], out, workers=1, **common)
    assert again["complete_before"] and again["num_samples"] == 13
    with pytest.raises(IngestError, match=r"samples_per_shard: was 2, now 3.*--overwrite"):
        ingest("webvid", [csv_path], out, media_root=data, samples_per_shard=3, progress=False, workers=1)
    fresh = ingest("webvid", [csv_path], out, media_root=data, samples_per_shard=3, progress=False, workers=1,
                   overwrite=True)  # fmt: skip
    assert sorted(fresh["sizes"].values()) == [1, 3, 3, 3, 3]
    assert sorted(p.name for p in out.glob("*.tar")) == [f"webvid-{i:06d}.tar" for i in range(5)]


def test_too_many_skips_fail_after_the_run(tmp_path: Path) -> None:
    csv_path, data = write_webvid(tmp_path, 4)
    out = tmp_path / "out"
    want = (
        r"1 of 4 records skipped \(25\.0%; \{'missing_file': 1\}\), more than --max-skip 0\.2.*3 samples kept"
    )
    with pytest.raises(TooManySkipped, match=want):
        ingest("webvid", [csv_path], out, media_root=data, max_skip="0.2", progress=False, workers=1)
    assert json.loads((out / schema.SIZES_FILE).read_text()) == {"webvid-000000.tar": 3}
    assert (
        ingest("webvid", [csv_path], out, media_root=data, max_skip="1", progress=False)["num_samples"] == 3
    )
    other = tmp_path / "other"
    other.mkdir()
    (other / "webvid-000000.tar").write_bytes(b"")  # e.g. from --manifest
    with pytest.raises(IngestError, match=r"holds 1 shard\(s\) named webvid-\*\.tar .* no ingest\.json"):
        ingest("webvid", [csv_path], other, media_root=data, progress=False)
