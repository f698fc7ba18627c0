"""Exact data resume across processes: 2 ranks x {0, 1, 2} data-loader workers.

Each rank is a separate Python process (RANK / WORLD_SIZE in the environment, as under a launcher;
the loader needs no process group). A run that consumes k batches, saves the data state as JSON and
is restarted in fresh processes for m more batches must deliver exactly the batches (keys and tensor
checksums) of an uninterrupted run of k + m -- across epoch boundaries, through the corpus mixture
(omni + a joined corpus whose sources have fewer shards than ranks x workers).

Resampled streams (``data.corpora[].resampled``): a run killed with SIGKILL (every process of each
rank, data workers included) after it saved its data state at some step resumes, from the state of
the newest step both ranks saved, with exactly the batches of an uninterrupted run.

The child side runs as ``python tests/integration/test_loader_resume.py ARGS.json``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
K, M = 5, 9  # split point and tail; omni gets 10 of the 14 steps: >= 2 epochs of every stream


def child(args: dict) -> None:
    from mico_ds.config import load_config
    from mico_ds.data import schema
    from mico_ds.data.read.mixture import build_train_loader

    root = args["root"]
    cfg = load_config(
        "demo",
        [f"data.root={root}", f"data.tokenizer={root}/tokenizer/tokenizer.model", "data.shuffle_buffer=3",
         "data.shards_per_chunk=1", f"data.num_workers={args['num_workers']}", f"train.max_steps={K + M}"],
    )  # fmt: skip
    for c in cfg.data.corpora:
        c.batch_size = 2
    by_name = {c.name: c for c in cfg.data.corpora}
    by_name["omni"].steps, by_name["joined"].steps = 10, 4
    if args.get("resampled"):  # omni, and the joined corpus: all the copies of its sources
        by_name["omni"].resampled = by_name["joined"].resampled = True
    loader = build_train_loader(cfg)  # rank / world size from RANK / WORLD_SIZE
    if args.get("state_in"):
        loader.load_state_dict(json.loads(Path(args["state_in"]).read_text()))
    streams = [loader.loaders["omni"], *loader.loaders["joined"].sources]  # every CorpusLoader
    resampled = {ld.corpus.name: ld.plan.resampled for ld in streams}
    out, state_at_k = [], None
    rank, states = os.environ["RANK"], args.get("save_states")
    for step in range(args["steps"]):
        if step == K:
            state_at_k = loader.state_dict()  # taken mid-run, as the trainer does at a checkpoint
        b = next(loader)
        sums = {m: float(b[m].double().sum()) for m in schema.MODALITIES if m in b}
        out.append({"corpus": b[schema.CORPUS], "keys": b[schema.KEYS], "sums": sums,
                    "ids": int(b[schema.TEXT_IDS].sum())})  # fmt: skip
        if states:  # the data state after every step, written whole (a kill leaves no partial file)
            tmp = Path(states) / f".rank{rank}.tmp"
            tmp.write_text(json.dumps(loader.state_dict()))
            tmp.rename(Path(states) / f"rank{rank}-{args['start'] + step + 1}.json")
            if step + 1 >= K:
                time.sleep(0.5)  # paced from here on: the kill lands mid-run, never after the end
    state_end = loader.state_dict()
    loader.close()
    Path(args["out"]).write_text(
        json.dumps({"batches": out, "state_at_k": state_at_k, "state_end": state_end, "resampled": resampled})
    )


def run_ranks(tmp: Path, tag: str, root: Path, num_workers: int, steps: int, state_in: list[Path] | None,
              **extra: object):  # fmt: skip
    """Start both ranks (concurrently, each in its own session: a SIGKILL of its group takes its data
    workers too) and return their Popen handles and output paths."""
    procs = []
    for rank in range(2):
        out = tmp / f"{tag}{rank}.json"
        args = {"root": str(root), "num_workers": num_workers, "steps": steps, "out": str(out),
                "state_in": str(state_in[rank]) if state_in else None, "start": 0, **extra}  # fmt: skip
        (tmp / f"{tag}{rank}.args.json").write_text(json.dumps(args))
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": "2", "PYTHONPATH": str(REPO)}
        cmd = [sys.executable, __file__, str(tmp / f"{tag}{rank}.args.json")]
        popen = subprocess.Popen(
            cmd, env=env, cwd=REPO, stderr=subprocess.PIPE, text=True, start_new_session=True
        )
        procs.append((popen, out))
    return procs


def wait(procs) -> list[dict]:
    outs = []
    for p, path in procs:
        _, err = p.communicate(timeout=240)
        assert p.returncode == 0, f"rank process failed:\n{err[-3000:]}"
        outs.append(json.loads(path.read_text()))
    return outs


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from mico_ds.demo.corpus import make_demo_corpus

    out = tmp_path_factory.mktemp("demo")
    make_demo_corpus(
        out, num_train=16, num_val=4, samples_per_shard=4, image_size=32, num_frames=4, audio_seconds=1.0,
        num_single_pair=8, vocab_size=300, progress=False,
    )  # fmt: skip
    return out


@pytest.mark.distributed
# 2 workers is the case to guard (rotation of workers over logical streams); 0 and 1 are also covered
# in-process by tests/unit/data/test_pipeline.py, so their multi-process versions are marked slow.
@pytest.mark.parametrize(
    "num_workers", [2, pytest.param(0, marks=pytest.mark.slow), pytest.param(1, marks=pytest.mark.slow)]
)
def test_resume_in_fresh_processes_is_exact(demo: Path, tmp_path: Path, num_workers: int) -> None:
    # An uninterrupted run of K + M batches per rank, which also saves its data state after K ...
    full_out = wait(run_ranks(tmp_path, "full", demo, num_workers, K + M, None))
    states = []
    for rank in range(2):
        p = tmp_path / f"state{rank}.json"
        p.write_text(json.dumps(full_out[rank]["state_at_k"]))
        states.append(p)
    # ... and fresh processes that resume from that state for M batches.
    tail_out = wait(run_ranks(tmp_path, "tail", demo, num_workers, M, states))

    for rank in range(2):
        uninterrupted = full_out[rank]["batches"]
        resumed = tail_out[rank]["batches"]
        assert [b["keys"] for b in resumed] == [b["keys"] for b in uninterrupted[K:]]
        assert resumed == uninterrupted[K:]  # tensors (checksums) and token ids too
    # The schedule is the same on both ranks, with exact per-corpus step counts ...
    corpora = [[b["corpus"] for b in out["batches"]] for out in full_out]
    assert corpora[0] == corpora[1] and Counter(corpora[0]) == {"omni": 10, "joined": 4}
    # ... while the ranks read disjoint data, and omni's streams went through several epochs.
    for step, (b0, b1) in enumerate(zip(full_out[0]["batches"], full_out[1]["batches"])):
        assert not set(b0["keys"]) & set(b1["keys"]), f"step {step}: ranks share samples"
    omni_state = full_out[0]["state_at_k"]["corpora"]["omni"]
    assert max(p[0] for p in omni_state["positions"]) == 0  # resumed inside epoch 0 ...
    for out in full_out:  # ... and every stream of every rank went on past the end of epoch 0
        assert min(p[0] for p in out["state_end"]["corpora"]["omni"]["positions"]) >= 1


@pytest.mark.distributed
def test_resampled_streams_resume_exactly_after_kill_9(demo: Path, tmp_path: Path) -> None:
    # The uninterrupted run ...
    full_out = wait(run_ranks(tmp_path, "full", demo, 2, K + M, None, resampled=True))
    for out in full_out:
        assert out["resampled"] == {"omni": True, "image_text": True, "audio_text": True, "video_text": True}
    # ... and one killed with SIGKILL (each rank's whole process group) once both ranks saved step K.
    states = tmp_path / "states"
    states.mkdir()
    killed = run_ranks(tmp_path, "killed", demo, 2, 10**6, None, resampled=True, save_states=str(states))
    deadline = time.monotonic() + 200
    while not all((states / f"rank{r}-{K}.json").exists() for r in range(2)):
        assert all(p.poll() is None for p, _ in killed), "a rank of the run to kill ended by itself"
        assert time.monotonic() < deadline, "the run to kill did not reach step K"
        time.sleep(0.02)
    for p, _ in killed:
        os.killpg(p.pid, signal.SIGKILL)
    for p, _ in killed:
        p.communicate(timeout=60)
        assert p.returncode == -signal.SIGKILL
    saved = [max(int(f.stem.split("-")[1]) for f in states.glob(f"rank{r}-*.json")) for r in range(2)]
    step = min(saved)  # the newest step both ranks saved: where a checkpoint would resume
    assert K <= step < K + M, saved
    # Fresh processes resume from the states of that step and run to the end.
    state_in = [states / f"rank{r}-{step}.json" for r in range(2)]
    tail_out = wait(run_ranks(tmp_path, "tail", demo, 2, K + M - step, state_in, resampled=True))
    for rank in range(2):
        assert [b["keys"] for b in tail_out[rank]["batches"]] == [
            b["keys"] for b in full_out[rank]["batches"][step:]
        ]
        assert tail_out[rank]["batches"] == full_out[rank]["batches"][step:]  # tensors and token ids too
    # Drawn with replacement: across the ranks some omni sample comes more than once in the run.
    omni = [k for out in full_out for b in out["batches"] if b["corpus"] == "omni" for k in b["keys"]]
    assert len(omni) > len(set(omni))


if __name__ == "__main__":
    child(json.loads(Path(sys.argv[1]).read_text()))
