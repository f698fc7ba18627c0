#!/usr/bin/env python
"""GPU bring-up in one command: kernels, a ZeRO-3 bf16 step under the DeepSpeed launcher, MFU, memory
against the planner, and a GPU-vs-CPU loss check. Writes one JSON and prints a table.

    python tools/gpu_check.py --out docs/benchmarks/gpu_check_h100.json     # on one H100/H200, <= 8 min
    python tools/gpu_check.py --device cpu --quick --out /tmp/gpu_check.json # CI: same paths, tiny sizes

Sections (each one's failure is recorded and the next one still runs; the JSON is rewritten after
every section, so a run cut short keeps what it measured):

  kernels     every Triton kernel against an fp64 oracle (mico_ds/kernels/selfcheck.py), forward and
              backward, fp32 and bf16, at sizes off the block sizes and at ViT-g sizes (context
              B=64 L=512 D=1408; contrastive N up to 64K, E=1024), with the tolerances used; the fused
              norms (PyTorch's RMSNorm, apex's RMSNorm/LayerNorm where apex imports) against the
              modules they replace
  bench       tiled Triton contrastive vs open_clip ClipLoss(local_loss=True, gather_with_grad=True)
              at N=16K E=1024 (targets: <= 1/10 the memory, <= 1.2x the time) and the fused context
              embeddings vs eager vs torch.compile (target: >= 2x eager forward+backward), through
              tools/bench_kernels.py
  step        tools/bench_gpu_step.py under the DeepSpeed launcher: NCCL, ZeRO-3 bf16, activation
              checkpointing, SDPA, the largest slice of the 64-GPU recipe that fits (ViT-g/14 + a
              1.1B Llama), batch from the planner: samples/s, TFLOP/s, MFU against the datasheet and
              the measured GEMM rate, torch.cuda.max_memory_allocated against tools/plan.py
  losses      the same steps from the same weights and batches, GPU bf16 vs CPU fp32 (debug recipe,
              ZeRO-0, contrastive + generation: hard-negative draws come from the device's own
              generator, so matching would compare draws, not arithmetic); the first step (same
              weights) within --loss-rtol-first, later ones (weights moved apart) within --loss-rtol

Without a CUDA device it refuses (exit 2) unless given ``--device cpu --quick``: then the kernels run
in Triton's interpreter at tiny sizes, the step is the debug slice on gloo, and the loss check
compares CPU bf16 with CPU fp32 (the same engine code as the GPU's bf16 path). Exit 0 when every
section passes, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

TOOLS = Path(__file__).resolve().parent  # also sys.path[0] when run as a script: bench_* import from it
GIB = 2**30
TARGETS = {"contrastive_memory_ratio": 0.1, "contrastive_time_ratio": 1.2, "context_speedup_vs_eager": 2.0}


class Check:
    """The run's record: sections in order, written to --out after each one."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args, self.t0 = args, time.perf_counter()
        self.data: dict[str, Any] = {"command": sys.argv, "quick": args.quick, "device": args.device}
        self.data["sections"] = {}

    def left_s(self) -> float:
        return self.args.budget_s - (time.perf_counter() - self.t0)

    def run(self, name: str, fn) -> None:
        if name in self.args.skip:
            self.data["sections"][name] = {"ok": None, "skipped": "--skip"}
        elif self.left_s() <= 0:
            self.data["sections"][name] = {
                "ok": False,
                "skipped": f"time budget {self.args.budget_s} s spent",
            }
        else:
            t0 = time.perf_counter()
            try:
                result = fn(self)
            except Exception as e:  # a section that breaks is a finding, not the end of the check
                result = {"ok": False, "error": f"{type(e).__name__}: {e}"}
            result["seconds"] = round(time.perf_counter() - t0, 1)
            self.data["sections"][name] = result
        print(f"[{time.perf_counter() - self.t0:6.0f} s] {name}: {_verdict(self.data['sections'][name])}",
              flush=True)  # fmt: skip
        self.write()

    def write(self) -> None:
        self.data["total_s"] = round(time.perf_counter() - self.t0, 1)
        if self.args.out is None:
            return
        out = Path(self.args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(out.suffix + ".tmp")
        tmp.write_text(json.dumps(self.data, indent=1, default=str))
        tmp.replace(out)


def _verdict(r: dict[str, Any]) -> str:
    if r.get("skipped"):
        return f"skipped ({r['skipped']})"
    return ("ok" if r.get("ok") else "FAILED") + (f": {r['error']}" if r.get("error") else "")


# ------------------------------------------------------------------------------------------ sections


def env_section(c: Check) -> dict[str, Any]:
    import deepspeed
    import torch

    from mico_ds.kernels import triton_import_error
    from mico_ds.kernels.norms import APEX_ADAM_MODULES, apex_import_error, resolve_norm_impl
    from mico_ds.optim import resolve_optim_impl

    cuda = torch.cuda.is_available()
    r: dict[str, Any] = {
        "ok": True, "torch": torch.__version__, "deepspeed": deepspeed.__version__,
        "cuda": torch.version.cuda, "triton_error": triton_import_error(),
        "triton_interpret": os.environ.get("TRITON_INTERPRET", "0"),
        "apex_norms_error": apex_import_error(), "apex_adam_error": apex_import_error(APEX_ADAM_MODULES),
        "norm_impl_auto": resolve_norm_impl("auto", cuda, apex_import_error()),
        "optim_impl_auto": resolve_optim_impl("auto", cuda, apex_import_error(APEX_ADAM_MODULES), False),
    }  # fmt: skip
    if cuda:
        p = torch.cuda.get_device_properties(0)
        r.update(gpu=p.name, capability=f"{p.major}.{p.minor}", memory_bytes=p.total_memory)
        r["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
    from bench_kernels import machine

    r["machine"] = machine()
    return r


def kernels_section(c: Check) -> dict[str, Any]:
    from mico_ds.kernels.selfcheck import kernel_cases, run_case

    rows = []
    for name, kwargs in kernel_cases(c.args.quick):
        if c.left_s() <= 0:
            rows.append({"check": name, "ok": False, "error": "time budget spent"})
            break
        rows.append(run_case(name, kwargs, c.args.device))
    return {"ok": all(r["ok"] for r in rows), "cases": rows}


def bench_section(c: Check) -> dict[str, Any]:
    from bench_kernels import bench_context, contrastive_case

    dev, quick = c.args.device, c.args.quick
    n, dim = (256, 32) if quick else (16384, 1024)
    fused = "torch" if dev == "cpu" else "triton"  # CPU: the tiled PyTorch path stands in
    clip = contrastive_case("clip", n, dim, 1024, dev, 1 if quick else 5)
    ours = contrastive_case(fused, n, dim, 1024, dev, 1 if quick else 5)
    con = {
        "N": n, "E": dim, "impl": fused, "clip": clip, "tiled": ours,
        "memory_ratio": ours["peak_extra_bytes"] / max(1, clip["peak_extra_bytes"]),
        "time_ratio": ours["time_s"] / clip["time_s"],
        "loss_abs_diff": abs(ours["loss"] - clip["loss"]),
    }  # fmt: skip
    size = [2, 19, 45] if quick else [64, 512, 1408]
    ns = argparse.Namespace(size=size, dtype="float32" if quick else "bfloat16", device=dev,
                            repeats=2 if quick else 20, compile=not quick)  # fmt: skip
    ctx_rows = bench_context(ns)
    by = {(r["impl"], r["sam"]): r for r in ctx_rows}
    speedups = {
        f"sam={sam}": by[("eager", sam)]["fwd_bwd_s"] / by[("fused", sam)]["fwd_bwd_s"]
        for sam in (False, True)
        if ("fused", sam) in by
    }
    r = {"contrastive": con, "context": ctx_rows, "context_speedup_vs_eager": speedups, "targets": TARGETS}
    agree = con["loss_abs_diff"] <= 1e-3 * max(1.0, abs(clip["loss"]))
    if quick:  # tiny sizes on a CPU say nothing about the targets: only that every path ran and agrees
        r["ok"] = agree and len(speedups) == 2
        r["targets_judged"] = False
        return r
    r["targets_met"] = {
        "contrastive_memory": con["memory_ratio"] <= TARGETS["contrastive_memory_ratio"],
        "contrastive_time": con["time_ratio"] <= TARGETS["contrastive_time_ratio"],
        "context_speedup": all(v >= TARGETS["context_speedup_vs_eager"] for v in speedups.values()),
    }
    r["ok"] = agree and len(speedups) == 2 and all(r["targets_met"].values())
    return r


def _launcher(nproc: int, script: Path, args: list[str]) -> list[str]:
    from mico_ds.distributed.launch import free_port

    return [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(nproc),
            "--master_port", str(free_port()), "--no_local_rank", str(script), *args]  # fmt: skip


def _run(cmd: list[str], timeout_s: float, env: dict[str, str] | None = None) -> tuple[int, str]:
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=max(10.0, timeout_s), env=env)
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        return 124, out + f"\n[gpu_check] timed out after {timeout_s:.0f} s"
    return p.returncode, p.stdout + p.stderr


def step_section(c: Check) -> dict[str, Any]:
    a = c.args
    slice_ = "debug" if a.quick else a.slice
    steps = ["--steps", "2", "--warmup", "1"] if a.quick else ["--steps", "5", "--warmup", "2"]
    batch = "2" if a.quick else "plan"
    attempts = []
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(2):  # a planner that underestimates: one retry at half the batch
            out = Path(tmp) / "step.json"
            args = ["--slice", slice_, "--zero", "3", "--batch", batch, *steps, "--json", str(out)]
            cmd = _launcher(1, TOOLS / "bench_gpu_step.py", args)
            env = dict(os.environ)
            if a.device == "cpu":  # the CPU mode stays on the CPU on a machine with a GPU too
                env.update(CUDA_VISIBLE_DEVICES="", DS_ACCELERATOR="cpu")
            rc, log = _run(cmd, min(c.left_s(), a.step_timeout_s), env)
            attempts.append({"command": " ".join(cmd[1:]), "rc": rc, "log_tail": log[-3000:]})
            if rc == 0 and out.exists():
                r = json.loads(out.read_text())
                break
            r = None
            oom = "OutOfMemoryError" in log or "CUDA out of memory" in log
            if not oom or batch == "1":
                break
            prev = int(batch) if batch.isdigit() else _planned_batch(log)
            batch = str(max(1, (prev or 2) // 2))
    if r is None:
        return {
            "ok": False,
            "error": f"the step did not complete (rc {attempts[-1]['rc']})",
            "attempts": attempts,
        }
    pred, got = r["planner_predicted_peak_bytes"], r["peak_memory_bytes"]
    r.update(ok=True, attempts=attempts, memory_vs_planner=got / pred if pred else None)
    return r


def _planned_batch(log: str) -> int | None:
    """The batch bench_gpu_step.py's ``--batch plan`` chose (printed before the step runs)."""
    for line in log.splitlines():
        if line.startswith("batch from the planner: "):
            return int(line.rsplit(" ", 1)[1])
    return None


def losses_section(c: Check) -> dict[str, Any]:
    a = c.args
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        plan = [("cpu", "fp32"), ("cuda" if a.device == "cuda" else "cpu", "bf16")]
        for dev, prec in plan:
            out = Path(tmp) / f"{dev}_{prec}.json"
            env = dict(os.environ)
            if dev == "cpu":
                env.update(CUDA_VISIBLE_DEVICES="", DS_ACCELERATOR="cpu")
            cmd = [sys.executable, str(Path(__file__).resolve()), "_losses", "--device", dev,
                   "--precision", prec, "--steps", str(a.loss_steps), "--json", str(out)]  # fmt: skip
            rc, log = _run(cmd, min(c.left_s(), 300.0), env)
            if rc != 0 or not out.exists():
                return {"ok": False, "error": f"{dev} {prec} run failed (rc {rc})", "log_tail": log[-3000:]}
            runs[f"{dev}_{prec}"] = json.loads(out.read_text())
    ref, other = runs["cpu_fp32"], runs[[k for k in runs if k != "cpu_fp32"][0]]
    rows, ok = [], True
    for step, (lr, lo) in enumerate(zip(ref["losses"], other["losses"])):
        for key in lr:
            diff = abs(lo[key] - lr[key])
            rtol = a.loss_rtol_first if step == 0 else a.loss_rtol
            bound = a.loss_atol + rtol * abs(lr[key])
            ok &= diff <= bound
            rows.append({"step": step, "term": key, "fp32": lr[key], "other": lo[key], "abs_diff": diff,
                         "bound": bound})  # fmt: skip
    return {"ok": ok, "compared": list(runs), "rtol_first": a.loss_rtol_first, "rtol": a.loss_rtol,
            "atol": a.loss_atol, "rows": rows}  # fmt: skip


def losses_worker(a: argparse.Namespace) -> None:
    """One engine, a few steps on the debug recipe from seed-0 weights and seeded CPU batches."""
    import torch
    from bench_gpu_step import synthetic_batch

    from mico_ds import distributed as mdist
    from mico_ds.config import load_config
    from mico_ds.data.schema import SpecialTokens
    from mico_ds.distributed.engine import build_engine, init_distributed
    from mico_ds.models.mico import MiCoModel

    if a.device == "cuda" and not torch.cuda.is_available():
        sys.exit("_losses --device cuda: no GPU in this process")
    ov = ["train.ds_config=zero0_cpu.json", f"train.precision={a.precision}", "objectives.matching_weight=0",
          "optim.warmup_steps=1", "train.max_steps=100"]  # fmt: skip
    cfg = load_config("debug", ov)
    corpus = cfg.data.corpora[0]
    vocab = 128
    special = SpecialTokens(vocab_size=vocab, pad_id=0, bos_id=1, eos_id=2, mask_id=3)
    init_distributed(cfg.train.dist_timeout_s)
    torch.manual_seed(0)
    engine, _, _ = build_engine(cfg, lambda: MiCoModel.from_run_config(cfg, special))
    device = torch.device(a.device)
    bf16 = a.precision == "bf16"
    losses = []
    for step in range(a.steps):
        torch.manual_seed(1000 + step)  # the batch is drawn on the CPU: the same on every device
        batch = synthetic_batch(cfg, list(corpus.modalities), 8, vocab, torch.device("cpu"), bf16)
        batch = {k: v.to(device) for k, v in batch.items()}
        out, _ = engine(batch, step=step)
        engine.backward(out["loss"])
        engine.step()
        losses.append({k: float(v) for k, v in out.items() if k != "matching_loss"})
    Path(a.json).write_text(json.dumps({"device": a.device, "precision": a.precision, "losses": losses}))
    mdist.destroy()


# ------------------------------------------------------------------------------------------ report


def table(data: dict[str, Any]) -> str:
    s = data["sections"]
    lines = [f"gpu_check on {s.get('env', {}).get('gpu', 'cpu')} ({'quick' if data['quick'] else 'full'})"]
    for row in s.get("kernels", {}).get("cases", []):
        worst = max((o["worst_ratio"] for o in row.get("outputs", {}).values()), default=float("nan"))
        shape = "x".join(str(row[k]) for k in ("B", "L", "D", "N", "n", "E") if k in row)
        shape = f"{row['kind']}/{row['impl']} {shape}" if row["check"] == "norm" else shape
        dt = row.get("dtype") or f"{row.get('x_dtype')}/{row.get('table_dtype')}"
        sam = " +E_Sam" if row.get("e_sam") or row.get("with_sam") else ""
        err = f"  {row['error']}" if "error" in row else ""
        lines.append(f"  kernel {row['check']:14s} {shape:16s} {dt:18s}{sam:7s} worst/tol {worst:7.3f} "
                     f"{'ok' if row['ok'] else 'FAILED'}{err}")  # fmt: skip
    b = s.get("bench", {})
    if "contrastive" in b:
        con = b["contrastive"]
        lines.append(f"  contrastive N={con['N']} E={con['E']}: memory {con['memory_ratio']:.3f}x ClipLoss, "
                     f"time {con['time_ratio']:.2f}x")  # fmt: skip
        lines.append(f"  context embeddings fwd+bwd speed-up vs eager: {b['context_speedup_vs_eager']}")
    st = s.get("step", {})
    if "samples_per_s" in st:
        mfu = st["mfu_vs_datasheet"]
        lines.append(
            f"  step {st['slice']} batch {st['batch']} ZeRO-{st['zero_stage']} {st['precision']}: "
            f"{st['samples_per_s']:.1f} samples/s, {st['tflops']:.1f} TFLOP/s, MFU "
            f"{'n/a' if mfu is None else f'{mfu:.1%}'} (datasheet), {st['mfu_vs_measured_matmul']:.1%} "
            f"(measured GEMM); memory {st['peak_memory_bytes'] / GIB:.2f} GiB vs planner "
            f"{st['planner_predicted_peak_bytes'] / GIB:.2f} GiB"
        )
    lo = s.get("losses", {})
    if "rows" in lo:
        worst = max(r["abs_diff"] / r["bound"] for r in lo["rows"])
        lines.append(f"  losses {' vs '.join(lo['compared'])}: worst diff/bound {worst:.3f}")
    for name, r in s.items():
        lines.append(f"  section {name}: {_verdict(r)}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--quick", action="store_true", help="tiny sizes (required with --device cpu)")
    p.add_argument("--out", help="the JSON record (rewritten after every section)")
    p.add_argument(
        "--slice", default="vitg-llama1b", help="bench_gpu_step.py slice for the step [vitg-llama1b]"
    )
    p.add_argument(
        "--budget-s", type=float, default=480.0, help="sections not started by then are skipped [480]"
    )
    p.add_argument("--step-timeout-s", type=float, default=300.0, help="limit of one launched step run [300]")
    p.add_argument("--loss-steps", type=int, default=4, help="steps of the loss check [4]")
    # Step 0 runs the same weights: only bf16 arithmetic differs (CPU bf16 vs fp32: 0.5%). Later steps
    # follow trajectories that bf16 weights have already moved apart (CPU: up to 6.5% at step 1).
    p.add_argument("--loss-rtol-first", type=float, default=1e-2, help="relative tolerance at step 0 [0.01]")
    p.add_argument("--loss-rtol", type=float, default=0.1, help="relative tolerance at later steps [0.1]")
    p.add_argument(
        "--loss-atol", type=float, default=1e-2, help="absolute tolerance of the loss check [0.01]"
    )
    p.add_argument("--skip", nargs="*", default=[], choices=["kernels", "bench", "step", "losses"])
    sub = p.add_subparsers(dest="cmd")
    w = sub.add_parser("_losses", help=argparse.SUPPRESS)
    w.add_argument("--device", required=True)
    w.add_argument("--precision", required=True)
    w.add_argument("--steps", type=int, required=True)
    w.add_argument("--json", required=True)
    a = p.parse_args(argv)
    if a.cmd == "_losses":
        losses_worker(a)
        return 0
    if a.device == "cpu" and not a.quick:
        print("gpu_check.py: --device cpu runs only with --quick (tiny sizes); the full sizes need a GPU",
              file=sys.stderr)  # fmt: skip
        return 2
    if a.device == "cpu":
        os.environ["TRITON_INTERPRET"] = "1"  # before anything imports the Triton kernels
    import torch

    if a.device == "cuda" and not torch.cuda.is_available():
        print("gpu_check.py: no CUDA device here (torch.cuda.is_available() is False). It checks a GPU; "
              "on a CPU run `python tools/gpu_check.py --device cpu --quick` (the same code paths at tiny "
              "sizes).", file=sys.stderr)  # fmt: skip
        return 2
    c = Check(a)
    c.run("env", env_section)
    for name, fn in [("kernels", kernels_section), ("bench", bench_section), ("step", step_section),
                     ("losses", losses_section)]:  # fmt: skip
        c.run(name, fn)
    c.data["ok"] = all(r.get("ok") is not False for r in c.data["sections"].values())
    c.write()
    print("\n" + table(c.data), flush=True)
    print(f"\ntotal {c.data['total_s']:.0f} s; {'all sections passed' if c.data['ok'] else 'FAILURES above'}")
    return 0 if c.data["ok"] else 1


if __name__ == "__main__":
    from mico_ds.distributed.launch import exit_now

    exit_now(main())  # without the interpreter's teardown of live Gloo groups (distributed/launch.py)
