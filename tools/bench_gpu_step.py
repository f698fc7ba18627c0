#!/usr/bin/env python
"""Single-GPU training step of a MiCo slice: samples/s, achieved TFLOP/s and MFU, and peak memory
against the planner's prediction.

    python tools/bench_gpu_step.py                          # ViT-L/14 + 1.1B Llama (TinyLlama sizes), bf16
    python tools/bench_gpu_step.py --slice vitg-llama1b --batch 8
    python tools/bench_gpu_step.py --slice debug --steps 3  # anywhere (CPU, fp32): checks the script runs
    python tools/bench_gpu_step.py --json bench.json
    # ZeRO-3 bf16 under the DeepSpeed launcher (NCCL), the batch from the planner (as gpu_check runs it)
    python -m deepspeed.launcher.runner --num_gpus 1 tools/bench_gpu_step.py \
        --slice vitg-llama1b --zero 3 --batch plan

The step is the trainer's (``build_engine``: a DeepSpeed ZeRO-0 engine, ZeRO-3 with ``--zero 3``, bf16 on
GPUs, SDPA attention in both branches, activation checkpointing as in the recipe), on synthetic batches
shaped like the recipe's largest corpus (VAST-27M: 4 video frames, 1 audio clip, depth, normal, 64 text
tokens). ``--batch auto`` halves the batch from 64 until a step fits in memory; ``--batch plan`` takes
the largest of 64, 32, ... whose planner prediction is under 85% of the GPU's memory (no out-of-memory
retries). The model FLOPs per sample are
``mico_ds.train.metrics.train_flops_per_sample`` (matmuls, training = 3 x forward, recomputation not
counted), and

    TFLOP/s = samples/s x FLOPs per sample / 1e12
    MFU     = TFLOP/s / peak bf16 TFLOP/s,

reported against two peaks: the datasheet (A100 312, H100/H200 989 dense) and the rate of large bf16
GEMMs measured on this GPU (8192^3, 20 runs: what a matmul reaches here). On a CPU both are fp32 and
the figures only show that the script runs.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any

import torch

TINYLLAMA = [
    "model.text.hidden_size=2048", "model.text.num_layers=22", "model.text.num_heads=32",
    "model.text.num_kv_heads=4", "model.text.intermediate_size=5632",
    "model.text.max_position_embeddings=2048",
]  # fmt: skip
SLICES: dict[str, tuple[str, list[str]]] = {
    "vitl-llama1b": ("vitl_llama2_7b_32gpu", TINYLLAMA),
    "vitg-llama1b": ("vitg_llama2_7b_64gpu", TINYLLAMA),
    "vitb-llama1b": ("vitb_tinyllama_8gpu", []),
    "debug": ("debug", []),
}
DATASHEET_BF16_TFLOPS = {"A100": 312.0, "H100": 989.0, "H200": 989.0}
PLANNER_GPU = {"A100": "a100-80gb", "H100": "h100-80gb", "H200": "h200"}  # tools/plan.py --gpu


def matmul_tflops(device: torch.device, dtype: torch.dtype, n: int, iters: int) -> float:
    """Measured rate of n x n x n GEMMs (2 n^3 FLOPs each)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    sync(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        a @ b
    sync(device)
    return 2 * n**3 * iters / (time.perf_counter() - t0) / 1e12


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()  # host-device sync: the timing needs the GPU to be done


def synthetic_batch(
    cfg: Any, modalities: list[str], b: int, vocab: int, device: torch.device, bf16: bool
) -> dict:
    from mico_ds.data.schema import SAMPLE_SOURCE, TEXT_IDS, TEXT_MASK

    i, s = cfg.inputs, cfg.inputs.image_size
    shapes = {
        "image": (b, 3, s, s), "video": (b, i.num_frames, 3, s, s), "depth": (b, 1, s, s),
        "audio": (b, i.num_clips, 1, i.mel_bins, i.clip_frames), "normal": (b, 3, s, s),
    }  # fmt: skip
    dt = torch.bfloat16 if bf16 else torch.float32
    batch: dict[str, Any] = {m: torch.randn(shapes[m], device=device, dtype=dt) for m in modalities}
    L = cfg.data.text_max_len
    ids = torch.randint(4, vocab - 2, (b, L), device=device)
    ids[:, 0], ids[:, -1] = 1, 2  # BOS ... EOS, full length (the planner's upper bound)
    batch[TEXT_IDS], batch[TEXT_MASK] = ids, torch.ones_like(ids)
    batch[SAMPLE_SOURCE] = torch.zeros((b, len(modalities)), dtype=torch.long, device=device)
    return batch


def planner():
    from mico_ds import planner as mod

    return mod


def run(args: argparse.Namespace) -> dict[str, Any]:
    from mico_ds.config import load_config
    from mico_ds.data.schema import SpecialTokens
    from mico_ds.distributed import get_world_size
    from mico_ds.distributed.engine import build_engine, init_distributed
    from mico_ds.kernels.norms import apex_import_error, resolve_norm_impl
    from mico_ds.models.mico import MiCoModel
    from mico_ds.train.metrics import train_flops_per_sample

    recipe, slice_ov = SLICES[args.slice]
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    ds_config = "zero0_cpu.json" if args.zero == 0 else ("zero3_bf16_gpu.json" if cuda else "zero3_cpu.json")
    ov = [*slice_ov, "model.vision.pretrained=null", "model.text.pretrained=null",
          f"train.ds_config={ds_config}", f"train.precision={'bf16' if cuda else 'fp32'}",
          *args.override]  # fmt: skip
    cfg = load_config(recipe, ov)
    corpus = max(cfg.data.corpora, key=lambda c: (len(c.modalities), c.batch_size))
    mods = list(corpus.modalities)
    vocab = 32002
    special = SpecialTokens(vocab_size=vocab, pad_id=vocab - 2, bos_id=1, eos_id=2, mask_id=vocab - 1)
    init_distributed(cfg.train.dist_timeout_s)
    bf16 = cuda
    peak_name = torch.cuda.get_device_name() if cuda else "cpu"
    datasheet = next((v for k, v in DATASHEET_BF16_TFLOPS.items() if k in peak_name), None)
    measured_peak = matmul_tflops(device, torch.bfloat16 if cuda else torch.float32,
                                  8192 if cuda else 1024, 20 if cuda else 5)  # fmt: skip
    flops = train_flops_per_sample(cfg, mods, cfg.data.text_max_len, vocab)

    plan = planner()
    gpu = next((v for k, v in PLANNER_GPU.items() if k in peak_name), "a100-80gb")

    def predicted_peak(b: int) -> int:
        p = plan.make_plan(recipe, ov, 1, 1, gpu, 0.4, device="gpu" if cuda else "cpu", batch=b)
        return next(c.memory.peak for c in p.corpora if c.name == corpus.name)

    if args.batch == "plan":
        budget = 0.85 * (torch.cuda.get_device_properties(device).total_memory if cuda else 2**33)
        sizes = [next((b for b in (64, 32, 16, 8, 4, 2) if predicted_peak(b) <= budget), 1)]
        print(f"batch from the planner: {sizes[0]}", flush=True)  # before the step: an OOM log has it too
    else:
        sizes = [args.batch] if args.batch != "auto" else [64, 32, 16, 8, 4, 2, 1]
    last_error = None
    for b in map(int, sizes):
        for c in cfg.data.corpora:
            c.batch_size = b
        try:
            torch.manual_seed(0)
            engine, ds, _ = build_engine(cfg, lambda: MiCoModel.from_run_config(cfg, special))
            rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            times = []
            for step in range(args.warmup + args.steps):
                batch = synthetic_batch(cfg, mods, b, vocab, device, bf16)
                sync(device)
                t0 = time.perf_counter()
                losses, _ = engine(batch, step=step)
                engine.backward(losses["loss"])
                engine.step()
                sync(device)
                times.append(time.perf_counter() - t0)
            break
        except torch.cuda.OutOfMemoryError as e:  # --batch auto: try half
            last_error = e
            engine = None
            torch.cuda.empty_cache()
            continue
    else:
        raise SystemExit(f"no batch size in {sizes} fits: {last_error}")
    dt = sum(times[args.warmup :]) / args.steps
    sps = b / dt
    tflops = sps * flops / 1e12
    peak_mem = (
        torch.cuda.max_memory_allocated()
        if cuda
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    )
    pred = predicted_peak(b)
    return {
        "slice": args.slice, "recipe": recipe, "overrides": ov, "device": peak_name, "corpus": corpus.name,
        "modalities": mods, "batch": b, "precision": "bf16" if bf16 else "fp32", "zero_stage": args.zero,
        "ds_config": ds_config,
        "optimizer": type(getattr(engine.optimizer, "optimizer", engine.optimizer)).__name__,
        "norm_impl": resolve_norm_impl(cfg.model.norm_impl, cuda, apex_import_error()),
        "world_size": get_world_size(),
        "params": sum(getattr(q, "ds_numel", q.numel()) for q in engine.module.parameters()),
        "step_s": dt, "samples_per_s": sps, "flops_per_sample": flops, "tflops": tflops,
        "matmul_tflops_measured": measured_peak, "datasheet_tflops": datasheet,
        "mfu_vs_datasheet": tflops / datasheet if datasheet else None,
        "mfu_vs_measured_matmul": tflops / measured_peak,
        "peak_memory_bytes": peak_mem if cuda else peak_mem - rss0,
        "peak_memory_kind": "torch.cuda.max_memory_allocated" if cuda else "ru_maxrss growth over the steps",
        "planner_predicted_peak_bytes": pred,
    }  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--slice", choices=sorted(SLICES), default="vitl-llama1b")
    p.add_argument(
        "--batch",
        default="auto",
        help="per-GPU batch, auto (largest of 64, 32, ... that fits), or plan (largest the planner fits)",
    )
    p.add_argument("--zero", type=int, choices=[0, 3], default=0, help="ZeRO stage of the engine [0]")
    p.add_argument("--steps", type=int, default=10, help="timed steps [10]")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first [3]")
    p.add_argument("--json", help="also write the result to this file")
    p.add_argument("override", nargs="*", help="config overrides section.key=value")
    args = p.parse_args(argv)
    if not torch.cuda.is_available() and args.slice != "debug":
        print("bench_gpu_step.py: no GPU here; only --slice debug runs on a CPU", file=sys.stderr)
        return 2
    os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))
    r = run(args)
    from mico_ds import distributed as mdist

    mdist.destroy()
    gb = 2**30
    print(
        f"== {r['slice']} on {r['device']}: batch {r['batch']}, {r['precision']}, ZeRO-{r['zero_stage']} =="
    )
    print(
        f"parameters {r['params'] / 1e9:.3f}B, {r['flops_per_sample'] / 1e12:.2f} TFLOP per sample (training)"
    )
    print(f"step {r['step_s']:.3f} s, {r['samples_per_s']:.1f} samples/s, {r['tflops']:.1f} TFLOP/s")
    ds = f"{r['mfu_vs_datasheet']:.1%}" if r["mfu_vs_datasheet"] is not None else "n/a (unknown device)"
    print(f"MFU vs datasheet peak: {ds}; vs measured matmul {r['matmul_tflops_measured']:.1f} TFLOP/s: "
          f"{r['mfu_vs_measured_matmul']:.1%}")  # fmt: skip
    print(f"peak memory {r['peak_memory_bytes'] / gb:.2f} GiB ({r['peak_memory_kind']}); "
          f"planner predicted {r['planner_predicted_peak_bytes'] / gb:.2f} GiB")  # fmt: skip
    if args.json and int(os.environ.get("RANK", "0")) == 0:
        Path(args.json).write_text(json.dumps(r, indent=1))
    return 0


if __name__ == "__main__":
    from mico_ds.distributed.launch import exit_now

    exit_now(main())  # without the interpreter's teardown of live Gloo groups (distributed/launch.py)
