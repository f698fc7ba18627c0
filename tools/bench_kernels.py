#!/usr/bin/env python
"""Benchmark the fused kernels against their references (results go to docs/benchmarks/kernels.md).

    # tiled contrastive vs open_clip ClipLoss, peak memory + time of forward+backward, on CPU
    python tools/bench_kernels.py contrastive --device cpu --batches 4096 16384 32768 --dims 512 1024
    # the same on a GPU, with the Triton path as well
    python tools/bench_kernels.py contrastive --device cuda --batches 4096 16384 32768 --dims 512 1024
    # context embeddings: fused Triton vs eager vs torch.compile at ViT-g sizes (B=64, L=512, D=1408, bf16)
    python tools/bench_kernels.py context --device cuda
    # CPU, for information: eager reference vs torch.compile at a small size
    python tools/bench_kernels.py context --device cpu --size 8 256 384 --dtype float32

Contrastive: one process simulates the global batch N with world size 1 (local batch = N), the worst
case for ClipLoss (its b x N logits become N x N); with W ranks and local_loss=True each rank holds
N/W x N logits, and the tiled kernel N/W x tile. Each CPU case runs in its own subprocess with
MALLOC_MMAP_THRESHOLD_=65536, so glibc returns every freed tensor buffer to the OS and the resident
set tracks live tensors; the peak is the kernel's VmHWM (reset through /proc/self/clear_refs after the
inputs exist) minus the resident set at that moment. On CUDA: torch.cuda.max_memory_allocated minus
the allocation before the call. Time: wall clock of forward+backward (CPU: first run, then the
minimum over --repeats further runs; CUDA: CUDA events after warm-up).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

GIB = 2**30
LOGIT_SCALE = 1 / 0.07  # CLIP's initial temperature


# ------------------------------------------------------------------------------------------------
# Contrastive loss: one case (run in a subprocess on CPU)


def _contrastive_fn(impl: str, tile: int):
    if impl == "clip":
        from open_clip.loss import ClipLoss

        return ClipLoss(local_loss=True, gather_with_grad=True)  # world size 1: the plain N x N logits
    from mico_ds.kernels import contrastive_loss_tiled

    return lambda z, t, s: contrastive_loss_tiled(z, t, s, tile=tile, impl=impl)


def contrastive_case(impl: str, n: int, dim: int, tile: int, device: str, repeats: int) -> dict[str, Any]:
    """Peak extra memory and forward+backward time of one loss at global batch n (world size 1)."""
    torch.manual_seed(0)
    z = F.normalize(torch.randn(n, dim, device=device), dim=1).requires_grad_()
    t = F.normalize(torch.randn(n, dim, device=device), dim=1).requires_grad_()
    s = torch.tensor(LOGIT_SCALE, device=device, requires_grad=True)
    fn = _contrastive_fn(impl, tile)

    def step() -> float:
        z.grad = t.grad = s.grad = None
        loss = fn(z, t, s)
        loss.backward()
        return float(loss.detach())  # host sync

    out: dict[str, Any] = {"impl": impl, "n": n, "dim": dim, "tile": tile, "device": device}
    if device == "cpu":
        from mico_ds.memory import proc_status_bytes, reset_peak_rss

        gc.collect()
        reset_peak_rss()
        base = proc_status_bytes("VmRSS")
        t0 = time.perf_counter()
        out["loss"] = step()
        out["time_first_s"] = time.perf_counter() - t0
        out["peak_extra_bytes"] = proc_status_bytes("VmHWM") - base
        times = [out["time_first_s"]]
        for _ in range(repeats):
            t0 = time.perf_counter()
            step()
            times.append(time.perf_counter() - t0)
        out["time_s"] = min(times)
    else:
        for _ in range(2):
            step()  # warm-up: Triton compilation, cuBLAS handles, allocator
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        out["loss"] = step()
        out["peak_extra_bytes"] = torch.cuda.max_memory_allocated() - base
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        times = []
        for _ in range(max(repeats, 5)):
            start.record()
            step()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        out["time_s"] = min(times)
    return out


def _run_case_subprocess(args: list[str], timeout_s: float) -> dict[str, Any]:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    cmd = [sys.executable, str(Path(__file__).resolve()), "_case", *args]
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout_s:.0f} s"}
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return {"error": f"exit {proc.returncode}: {' | '.join(tail)}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _available_bytes() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def bench_contrastive(a: argparse.Namespace) -> list[dict[str, Any]]:
    impls = ["clip", "torch"] + (["triton"] if a.device == "cuda" else [])
    rows: list[dict[str, Any]] = []
    for dim in a.dims:
        last_peak: dict[str, tuple[int, int]] = {}  # impl -> (n, peak) of the last measured case
        for n in a.batches:
            for impl in impls:
                case = ["--impl", impl, "--n", str(n), "--dim", str(dim), "--tile", str(a.tile)]
                case += ["--device", a.device, "--repeats", str(a.repeats if n <= 4096 else 0)]
                if impl in last_peak and a.device == "cpu":
                    # The N^2 term dominates ClipLoss: do not start a case that cannot fit (the machine
                    # is shared; an OOM would hit other jobs too).
                    n0, p0 = last_peak[impl]
                    predicted = p0 * (n / n0) ** 2 if impl == "clip" else p0 * n / n0
                    if predicted > a.mem_fraction * _available_bytes():
                        rows.append(
                            {
                                "impl": impl,
                                "n": n,
                                "dim": dim,
                                "error": f"not run: predicted peak {predicted / GIB:.1f} GiB > "
                                f"{a.mem_fraction:.0%} of available {_available_bytes() / GIB:.1f} GiB",
                            }
                        )
                        print(rows[-1], flush=True)
                        continue
                if a.device == "cpu":
                    res = _run_case_subprocess(case, a.case_timeout)
                    res.update({"impl": impl, "n": n, "dim": dim})
                else:
                    res = contrastive_case(impl, n, dim, a.tile, a.device, a.repeats)
                if "peak_extra_bytes" in res:
                    last_peak[impl] = (n, res["peak_extra_bytes"])
                rows.append(res)
                print(json.dumps(res), flush=True)
    return rows


def contrastive_table(rows: list[dict[str, Any]]) -> str:
    by = {(r["impl"], r["n"], r["dim"]): r for r in rows}
    impls = sorted({r["impl"] for r in rows} - {"clip"})
    lines = [
        "| global batch N | dim | impl | peak extra memory | vs ClipLoss | fwd+bwd time | vs ClipLoss |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for n, dim in sorted({(r["n"], r["dim"]) for r in rows}, key=lambda x: (x[1], x[0])):
        clip = by.get(("clip", n, dim), {})
        for impl in ["clip", *impls]:
            r = by.get((impl, n, dim))
            if r is None:
                continue
            if "error" in r:
                lines.append(f"| {n} | {dim} | {_name(impl)} | {r['error']} | | | |")
                continue
            mem, tim = r["peak_extra_bytes"], r["time_s"]
            ref = impl != "clip" and "time_s" in clip
            rmem = f"{mem / clip['peak_extra_bytes']:.3f}x" if ref else ""
            rtim = f"{tim / clip['time_s']:.2f}x" if ref else ""
            name = _name(impl)
            lines.append(f"| {n} | {dim} | {name} | {_fmt_bytes(mem)} | {rmem} | {tim:.2f} s | {rtim} |")
    return "\n".join(lines)


def _name(impl: str) -> str:
    return {"clip": "open_clip ClipLoss", "torch": "tiled (PyTorch)", "triton": "tiled (Triton)"}[impl]


def _fmt_bytes(b: float) -> str:
    return f"{b / GIB:.2f} GiB" if b >= GIB else f"{b / 2**20:.0f} MiB"


# ------------------------------------------------------------------------------------------------
# Context embeddings


def context_bytes_per_pass(
    B: int, L: int, D: int, act_bytes: int, table_bytes: int, sam: bool
) -> dict[str, int]:
    """DRAM bytes moved per pass, counting activation-sized tensors only (tables are L2-resident).

    Fused: forward reads x, writes out; backward reads dout (dx is dout itself, not copied).
    Eager reference (see DESIGN §7 and docs/benchmarks/kernels.md for the op-by-op count).
    """
    act = B * L * D * act_bytes
    fused_fwd, fused_bwd = 2 * act, act
    eager_fwd = 2 * act  # x + (L, D) shared sum: read x, write out
    eager_bwd = act  # sum over B of dout for the shared (L, D) summand
    if sam:
        gathered = B * L * D * table_bytes
        eager_fwd += gathered  # e_sam[src_idx] materialized (B, L, D)
        if table_bytes != act_bytes:
            eager_fwd += gathered + act  # .to(x.dtype): read it, write the cast copy
        eager_fwd += 3 * act  # out + gathered: read both, write out
        eager_bwd += act  # index backward (scatter-add of dout rows into E_Sam)
    return {"fused_fwd": fused_fwd, "fused_bwd": fused_bwd, "eager_fwd": eager_fwd, "eager_bwd": eager_bwd}


def _context_inputs(B: int, L: int, D: int, dtype: torch.dtype, device: str, sam: bool):
    from mico_ds.kernels import context_embed  # noqa: F401  (import check)

    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(B, L, D, generator=g).to(device, dtype).requires_grad_()
    idx = [torch.randint(0, n, (L,), generator=g).to(device) for n in (64, 8, L)]
    idx[2] = torch.arange(L, device=device)
    tables = [torch.randn(n, D, generator=g).to(device, dtype).requires_grad_() for n in (64, 8, L, 8)]
    src = torch.randint(0, 8, (B, L), generator=g).to(device) if sam else None
    return x, idx, tables[:3], src, tables[3] if sam else None


def _time(fn, device: str, repeats: int) -> float:
    if device == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        times = []
        for _ in range(repeats):
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        return min(times)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def bench_context(a: argparse.Namespace) -> list[dict[str, Any]]:
    from mico_ds.kernels import context_embed, context_embed_reference

    B, L, D = a.size
    dtype = getattr(torch, a.dtype)
    from mico_ds.kernels import interpret_requested

    impls = {"eager": lambda *args: context_embed_reference(*args)}
    if getattr(a, "compile", True):
        impls["compile"] = torch.compile(context_embed_reference, dynamic=False)
    if a.device == "cuda" or interpret_requested():  # the interpreter: only that the path runs
        impls["fused"] = lambda *args: context_embed(*args, impl="triton")
    rows = []
    for sam in (False, True):
        x, idx, tables, src, e_sam = _context_inputs(B, L, D, dtype, a.device, sam)
        args = (x, *idx, *tables, src, e_sam)
        params = [p for p in (x, *tables, e_sam) if p is not None]
        dout = torch.randn_like(x)
        traffic = context_bytes_per_pass(B, L, D, x.element_size(), tables[0].element_size(), sam)
        for name, fn in impls.items():
            r = {"impl": name, "sam": sam, "B": B, "L": L, "D": D, "dtype": a.dtype, "device": a.device}
            r.update(_context_case(fn, args, params, dout, a.device, a.repeats))
            r.update({f"bytes_{k}": v for k, v in traffic.items()})
            rows.append(r)
            print(json.dumps(r), flush=True)
    return rows


def _context_case(fn, args: tuple, params: list[torch.Tensor], dout: torch.Tensor, device: str, repeats: int):
    def fwd() -> torch.Tensor:
        with torch.no_grad():
            return fn(*args)

    def fwd_bwd() -> None:
        for p in params:
            p.grad = None
        fn(*args).backward(dout)

    t0 = time.perf_counter()
    fwd_bwd()  # warm-up (compilation for torch.compile / Triton)
    fwd()
    if device == "cuda":
        torch.cuda.synchronize()
    return {
        "warmup_s": time.perf_counter() - t0,
        "fwd_s": _time(fwd, device, repeats),
        "fwd_bwd_s": _time(fwd_bwd, device, repeats),
    }


def context_table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| E_Sam | impl | forward | forward+backward | fwd GB/s (fused-traffic basis) |",
        "| --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        gbs = r["bytes_fused_fwd"] / r["fwd_s"] / 1e9
        lines.append(
            f"| {'yes' if r['sam'] else 'no'} | {r['impl']} | {r['fwd_s'] * 1e3:.2f} ms | "
            f"{r['fwd_bwd_s'] * 1e3:.2f} ms | {gbs:.1f} |"
        )
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------


def machine() -> str:
    model = platform.processor() or "?"
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        names = [line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")]
        model = names[0] if names else model
    except Exception:
        pass
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    load = os.getloadavg()
    return (
        f"CPU {model}, {os.cpu_count()} cores, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), "
        f"{gpu}, load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("contrastive", help="tiled contrastive loss vs open_clip ClipLoss")
    c.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    c.add_argument("--batches", type=int, nargs="+", default=[4096, 16384, 32768])
    c.add_argument("--dims", type=int, nargs="+", default=[512, 1024])
    c.add_argument("--tile", type=int, default=1024)
    c.add_argument("--repeats", type=int, default=2, help="timed runs after the first (N <= 4096 on CPU)")
    c.add_argument("--mem-fraction", type=float, default=0.7, help="skip a CPU case predicted above this")
    c.add_argument("--case-timeout", type=float, default=1800.0)
    c.add_argument("--json", type=Path, default=None)
    x = sub.add_parser("context", help="fused context embeddings vs eager vs torch.compile")
    x.add_argument("--device", default="cuda", choices=["cpu", "cuda"])
    x.add_argument("--size", type=int, nargs=3, default=[64, 512, 1408], metavar=("B", "L", "D"))
    x.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    x.add_argument("--repeats", type=int, default=20)
    x.add_argument("--json", type=Path, default=None)
    k = sub.add_parser("_case", help=argparse.SUPPRESS)  # one contrastive case, in a fresh process
    k.add_argument("--impl", required=True)
    k.add_argument("--n", type=int, required=True)
    k.add_argument("--dim", type=int, required=True)
    k.add_argument("--tile", type=int, required=True)
    k.add_argument("--device", default="cpu")
    k.add_argument("--repeats", type=int, default=0)
    a = p.parse_args()

    if a.cmd == "_case":
        print(json.dumps(contrastive_case(a.impl, a.n, a.dim, a.tile, a.device, a.repeats)))
        return
    if a.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no GPU available in this process")
    print(f"# {' '.join(sys.argv)}\n# {machine()}", flush=True)
    t0 = time.perf_counter()
    rows = bench_contrastive(a) if a.cmd == "contrastive" else bench_context(a)
    table = contrastive_table(rows) if a.cmd == "contrastive" else context_table(rows)
    print(f"\n{table}\n\n# {machine()}; total {time.perf_counter() - t0:.0f} s")
    if a.json is not None:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps({"command": sys.argv, "machine": machine(), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
