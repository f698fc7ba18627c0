#!/usr/bin/env python
"""Training throughput and per-rank memory on CPU for ZeRO stages 0, 2 and 3 (docs/benchmarks.md).

    python tools/bench_train.py                                   # debug recipe, 2 ranks, stages 0/2/3
    python tools/bench_train.py --recipe demo --steps 10 --json out.json
    python tools/bench_train.py --nproc 2 --stages 3 --markdown   # one stage, a Markdown table

Each case is a fresh 2-rank run of the real trainer (``mico_ds.train.loop.Trainer``: zero.Init at stage
3, the recipe's data mixture, AdamW) under the ``deepspeed`` launcher with gloo. Per rank it records:

- ``samples_per_s``: global samples/s over ``--steps`` optimizer steps after ``--warmup`` steps;
- ``peak_rss_delta_bytes``: the process's peak resident set (VmHWM, reset through /proc/self/clear_refs
  just before the engine is built) minus its resident set at that moment, i.e. what building and
  training the model added on top of Python, torch and DeepSpeed (data-loader workers are other
  processes and are not counted);
- ``param_bytes``: parameter storage held by the rank after a step: its ZeRO-3 partitions
  (``ds_tensor``) plus any full parameter still resident (persistent small parameters, below
  ``stage3_param_persistence_threshold``), or the full replica at stages 0 and 2; against
  ``param_bytes_total / world`` (the ideal 1/N share);
- ``optim_state_bytes``: AdamW moments held by the rank (fp32 exp_avg and exp_avg_sq: the full set at
  stage 0, this rank's partition at stages 2 and 3).

The stage-3 case runs twice: with the recipe's ds_config as it is and with
``stage3_param_persistence_threshold = 0`` (every parameter partitioned), to show what persistence costs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from mico_ds.distributed.ds_config import find_ds_config
from mico_ds.distributed.launch import free_port

STAGE_CONFIGS = {0: "zero0_cpu.json", 2: "zero2_cpu.json", 3: "zero3_cpu.json"}


# ----------------------------------------------------------------------------- inside a rank


def _tensor_bytes(t: Any) -> int:
    import torch

    return t.numel() * t.element_size() if isinstance(t, torch.Tensor) else 0


def _inner_optimizer(opt: Any) -> Any:
    """The torch optimizer at the bottom of DeepSpeed's wrappers (ZeRO optimizers hold it as .optimizer)."""
    import torch

    while not isinstance(opt, torch.optim.Optimizer) and hasattr(opt, "optimizer"):
        opt = opt.optimizer
    return opt


def memory_report(engine: Any) -> dict[str, int]:
    """Parameter, optimizer-state and total parameter bytes of this rank's engine."""
    params = list(engine.module.parameters())
    total = sum((p.ds_numel if hasattr(p, "ds_numel") else p.numel()) * p.element_size() for p in params)
    held = 0
    for p in params:
        if hasattr(p, "ds_tensor"):  # ZeRO-3: the partition, plus the full tensor if it stays resident
            held += _tensor_bytes(p.ds_tensor) + _tensor_bytes(p.data)
        else:
            held += _tensor_bytes(p.data)
    inner = _inner_optimizer(engine.optimizer)
    state = sum(_tensor_bytes(v) for s in inner.state.values() for v in s.values())
    return {"param_bytes": held, "param_bytes_total": total, "optim_state_bytes": state}


def worker(args: argparse.Namespace) -> int:
    """One rank of one case (started by the deepspeed launcher)."""
    import torch

    from mico_ds import distributed as mdist
    from mico_ds.config import load_config
    from mico_ds.memory import proc_status_bytes, reset_peak_rss
    from mico_ds.train.loop import Trainer

    cfg = load_config(args.recipe, args.override)
    cfg.train.progress = False
    # Reset the high-water mark here: what follows (data, engine, training) is what is measured.
    reset_peak_rss()
    base = proc_status_bytes("VmRSS")
    trainer = Trainer(cfg, Path(args.run_dir))
    try:
        for _ in range(args.warmup):
            trainer.train_step()
        mdist.barrier()
        t0, n = time.perf_counter(), 0
        for _ in range(args.steps):
            _, k, _ = trainer.train_step()
            n += k
        mdist.barrier()
        dt = time.perf_counter() - t0
        rec = {
            "rank": mdist.get_rank(),
            "world": mdist.get_world_size(),
            "samples_per_s": n * mdist.get_world_size() / dt,
            "seconds_per_step": dt / args.steps,
            "rss_before_bytes": base,
            "peak_rss_delta_bytes": proc_status_bytes("VmHWM") - base,
            "threads": torch.get_num_threads(),
            **memory_report(trainer.engine),
        }
        recs = mdist.all_gather_object(rec)
        if mdist.get_rank() == 0:
            Path(args.out).write_text(json.dumps(recs))
    finally:
        trainer.close()
    return 0


# ----------------------------------------------------------------------------- the driver


def run_case(args: argparse.Namespace, name: str, ds_config: str, tmp: Path) -> dict[str, Any]:
    out, run_dir = tmp / f"{name}.json", tmp / f"run-{name}"
    data = Path(args.data)
    overrides = [
        f"--data.root={data}",
        f"--data.tokenizer={data}/tokenizer/tokenizer.model",
        f"--train.ds_config={ds_config}",
        f"--train.max_steps={args.warmup + args.steps}",
        "--train.save_every=0",
        *args.override,
    ]
    cmd = [
        sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(args.nproc),
        "--master_port", str(free_port()), "--no_local_rank", str(Path(__file__).resolve()), "_worker",
        "--recipe", args.recipe, "--run-dir", str(run_dir), "--out", str(out),
        "--steps", str(args.steps), "--warmup", str(args.warmup),
        *[f"--override={o}" for o in overrides],
    ]  # fmt: skip
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0 or not out.exists():
        tail = (p.stderr or p.stdout)[-3000:]
        raise SystemExit(f"bench_train: case {name} failed (exit {p.returncode}):\n{tail}")
    ranks = json.loads(out.read_text())
    rate, took = ranks[0]["samples_per_s"], time.perf_counter() - t0
    print(f"  {name}: {rate:.1f} samples/s ({took:.0f} s)", file=sys.stderr)
    return {"case": name, "ds_config": ds_config, "ranks": ranks}


def markdown(res: dict[str, Any]) -> str:
    mib = 2**20
    lines = [
        f"recipe `{res['recipe']}`, {res['nproc']} CPU ranks (gloo), {res['steps']} timed steps after "
        f"{res['warmup']} warm-up steps; per-rank figures are rank 0 / rank 1",
        "",
        "| case | samples/s | s/step | peak RSS added per rank | params held per rank | ideal 1/N | "
        "held / ideal | AdamW state per rank |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for c in res["cases"]:
        r = c["ranks"]
        world = r[0]["world"]
        ideal = r[0]["param_bytes_total"] / world

        def per_rank(key: str, rows: list[dict[str, Any]] = r) -> str:
            return " / ".join(f"{x[key] / mib:.2f}" for x in rows) + " MiB"

        ratio = " / ".join(f"{x['param_bytes'] / ideal:.2f}" for x in r)
        lines.append(
            f"| {c['case']} | {r[0]['samples_per_s']:.1f} | {r[0]['seconds_per_step']:.3f} | "
            f"{per_rank('peak_rss_delta_bytes')} | {per_rank('param_bytes')} | {ideal / mib:.2f} MiB | "
            f"{ratio} | {per_rank('optim_state_bytes')} |"
        )
    return "\n".join(lines)


def report(
    script: str, argv: list[str], fields: dict[str, Any], args: argparse.Namespace, table: Any
) -> None:
    """The results of a benchmark run: its command and machine, then ``fields``; written to
    ``args.json`` when given, printed as ``table(res)`` with ``args.markdown``, else as JSON."""
    res = {
        "command": " ".join(["python", f"tools/{script}", *argv]),
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(),
            "load_1m": os.getloadavg()[0],
        },  # fmt: skip
        **fields,
    }
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1) + "\n")
    print(table(res) if args.markdown else json.dumps(res, indent=1))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_worker"]:
        w = argparse.ArgumentParser()
        for k in ("--recipe", "--run-dir", "--out"):
            w.add_argument(k, required=True)
        w.add_argument("--steps", type=int, required=True)
        w.add_argument("--warmup", type=int, required=True)
        w.add_argument("--override", action="append", default=[])
        return worker(w.parse_args(argv[1:]))
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--recipe", default="debug", help="recipe name or path (default: debug)")
    p.add_argument("--stages", type=int, nargs="+", default=[0, 2, 3], choices=sorted(STAGE_CONFIGS))
    p.add_argument("--nproc", type=int, default=2, help="CPU ranks (default 2)")
    p.add_argument("--steps", type=int, default=20, help="timed optimizer steps per case")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    p.add_argument("--data", default="/tmp/mico_bench_train", help="demo corpus location (generated once)")
    p.add_argument("--override", action="append", default=[], help="extra --section.key=value, repeatable")
    p.add_argument("--json", default=None, help="write the results to this file")
    p.add_argument("--markdown", action="store_true", help="print a Markdown table")
    args = p.parse_args(argv)
    args.override = [o if o.startswith("--") else f"--{o}" for o in args.override]
    with tempfile.TemporaryDirectory(prefix="mico_bench_train_") as d:
        tmp = Path(d)
        cases = []
        for stage in args.stages:
            cases.append(run_case(args, f"zero{stage}", STAGE_CONFIGS[stage], tmp))
            if stage == 3:
                ds = json.loads(find_ds_config(STAGE_CONFIGS[3]).read_text())
                ds["zero_optimization"]["stage3_param_persistence_threshold"] = 0
                path = tmp / "zero3_no_persistence.json"
                path.write_text(json.dumps(ds))
                cases.append(run_case(args, "zero3 (persistence 0)", str(path), tmp))
    fields = {"recipe": args.recipe, "nproc": args.nproc, "steps": args.steps, "warmup": args.warmup}
    report("bench_train.py", argv, {**fields, "cases": cases}, args, markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
