"""The planner against measurements: predicted vs measured per-rank peaks of real 2-rank CPU runs."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from mico_ds.distributed.launch import deepspeed_command
from mico_ds.planner.plan import make_plan, set_batch

VALIDATION_SIZE = [
    # debug geometry, widened so model states and activations stand well above allocator noise
    "inputs.image_size=64", "model.vision.width=256", "model.vision.depth=4", "model.vision.heads=4",
    "model.vision.mlp_dim=1024", "model.text.hidden_size=512", "model.text.num_layers=4",
    "model.text.num_heads=8", "model.text.intermediate_size=1408", "model.embed_dim=128",
    "train.precision=fp32",
]  # fmt: skip
VALIDATION_BATCH = 16


def measure_worker(args: argparse.Namespace, overrides: list[str]) -> None:
    """One rank of a validation run: RSS before the engine, after it, and the peak over a few steps."""
    import torch

    from mico_ds import distributed as mdist
    from mico_ds.config import load_config
    from mico_ds.data.read.batch import to_device
    from mico_ds.data.read.mixture import build_train_loader
    from mico_ds.distributed.engine import build_engine, init_distributed
    from mico_ds.memory import proc_status_bytes, reset_peak_rss
    from mico_ds.models.mico import MiCoModel
    from mico_ds.train.data import prepare_data

    cfg = load_config(args.recipe, overrides)
    set_batch(cfg, args.batch)
    init_distributed(cfg.train.dist_timeout_s)
    torch.set_num_threads(1)
    tok = prepare_data(cfg)
    loader = build_train_loader(cfg)
    batches = [next(loader) for _ in range(args.steps)]
    loader.close()
    reset_peak_rss()  # what follows (engine, steps) is what is measured
    rss0 = proc_status_bytes("VmRSS")
    engine, _, _ = build_engine(cfg, lambda: MiCoModel.from_run_config(cfg, tok.special))
    rss_engine = proc_status_bytes("VmRSS")
    times = []
    for i, batch in enumerate(batches):
        t0 = time.perf_counter()
        batch = to_device(batch, engine.device, False)
        losses, _ = engine(batch, step=i)
        engine.backward(losses["loss"])
        engine.step()
        times.append(time.perf_counter() - t0)
    rss_end = proc_status_bytes("VmRSS")
    peak = proc_status_bytes("VmHWM")
    out = {"rank": mdist.get_rank(), "baseline": rss0, "after_engine": rss_engine - rss0,
           "after_steps": rss_end - rss0, "peak": peak - rss0, "step_s": times}  # fmt: skip
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / f"rank{mdist.get_rank()}.json").write_text(json.dumps(out))
    mdist.destroy()


def validate(
    recipe: str, overrides: list[str], steps: int, stages: list[int], batch: int | None
) -> dict[str, Any]:
    """Predicted vs measured per-rank peak of 2-rank CPU runs (fp32) for each ZeRO stage."""
    results: dict[str, Any] = {
        "recipe": recipe,
        "overrides": overrides,
        "batch": batch,
        "ranks": 2,
        "stages": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        base = [f"data.root={data}", f"data.tokenizer={data}/tokenizer/tokenizer.model", *overrides]
        for stage in stages:
            ov = [*base, f"train.ds_config=zero{stage}_cpu.json"]
            out = Path(tmp) / f"z{stage}"
            env = dict(os.environ, OMP_NUM_THREADS="1", MALLOC_MMAP_THRESHOLD_="65536", MALLOC_ARENA_MAX="2")
            args = [recipe, "--measure-worker", "--out", str(out), "--steps", str(steps),
                    *(["--batch", str(batch)] if batch else []), *[f"--{o}" for o in ov]]  # fmt: skip
            cmd = deepspeed_command(2, "mico_ds.planner", args)
            p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
            if p.returncode != 0:
                raise RuntimeError(
                    f"validation run ZeRO-{stage} failed:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
                )
            ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
            plan = make_plan(recipe, ov, 1, 2, None, 0.4, device="cpu", batch=batch)
            mem = plan.corpora[0].memory
            transient = ("activations", "input", "contrastive", "matching")
            states = sum(v for k, v in mem.parts.items() if not k.startswith(transient))
            results["stages"][str(stage)] = {
                "predicted_peak": mem.peak, "predicted_states_and_buffers": states,
                "measured_peak": max(r["peak"] for r in ranks),
                "measured_after_steps": max(r["after_steps"] for r in ranks),
                "step_s": [sum(r["step_s"][1:]) / max(1, len(r["step_s"]) - 1) for r in ranks],
                "parts": mem.parts, "params": plan.params,
            }  # fmt: skip
    return results


def format_validation(v: dict[str, Any]) -> str:
    L = [f"== planner validation: {v['recipe']} on 2 CPU ranks (fp32), {v['overrides']} =="]
    L.append(
        f"{'ZeRO':<6}{'pred. peak':>12}{'meas. peak':>12}{'ratio':>7}{'pred. states':>14}{'meas. after':>13}"
    )
    for st, r in v["stages"].items():
        mb = {k: v / 2**20 for k, v in r.items() if isinstance(v, (int, float))}
        L.append(
            f"{st:<6}{mb['predicted_peak']:>10.0f}MB{mb['measured_peak']:>10.0f}MB"
            f"{r['measured_peak'] / r['predicted_peak']:>7.2f}"
            f"{mb['predicted_states_and_buffers']:>12.0f}MB{mb['measured_after_steps']:>11.0f}MB"
        )
    return "\n".join(L)
