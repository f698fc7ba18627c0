#!/usr/bin/env python
"""Peak memory of tools/zero_to_fp32.py on a ZeRO-3 checkpoint of a chosen size (CPU, one rank, gloo).

    python tools/bench_convert.py --millions 150 --shard-size 100MB --work /tmp/bench_convert

Builds a stack of square Linear layers (under deepspeed.zero.Init at ZeRO-3), takes one AdamW step, saves
a DeepSpeed checkpoint, then runs the converter in a fresh process for each --shard-size and prints
its peak resident memory (anonymous and file-backed, sampled every 20 ms) next to the model size. The
converter's baseline (Python + torch + DeepSpeed imported, nothing read) is measured with a tiny model
first, so the table shows what the conversion itself adds.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def make_checkpoint(out: Path, millions: float, width: int, stage: int) -> int:
    import deepspeed
    import torch

    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(29700 + os.getpid() % 200))
    deepspeed.init_distributed(dist_backend="gloo")
    layers = max(1, round(millions * 1e6 / (width * width + width)))
    ds = {"train_micro_batch_size_per_gpu": 1, "train_batch_size": 1, "zero_optimization": {"stage": stage},
          "steps_per_print": 10**9}  # fmt: skip
    with deepspeed.zero.Init(config_dict_or_path=ds, enabled=stage == 3):
        model = torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(layers)])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=ds)
    engine.backward(engine(torch.randn(1, width)).square().mean())
    engine.step()
    engine.save_checkpoint(str(out), tag="step00000001")
    n = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
    torch.distributed.destroy_process_group()
    return n


def convert(ckpt: Path, out: Path, shard: str) -> dict[str, float]:
    shutil.rmtree(out, ignore_errors=True)
    cmd = [
        sys.executable,
        str(REPO / "tools" / "zero_to_fp32.py"),
        str(ckpt),
        str(out),
        "--max-shard-size",
        shard,
    ]
    p = subprocess.run([*cmd, "--quiet"], capture_output=True, text=True, check=True)
    m = re.search(r"resident ([\d.]+) MiB \(anonymous ([\d.]+) MiB, file-backed ([\d.]+) MiB", p.stdout)
    shutil.rmtree(out, ignore_errors=True)
    return {"rss": float(m.group(1)), "anon": float(m.group(2)), "file": float(m.group(3))}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--millions", type=float, default=150, help="parameters, millions (%(default)s)")
    ap.add_argument("--width", type=int, default=2048, help="Linear width (%(default)s)")
    ap.add_argument("--stage", type=int, choices=(1, 2, 3), default=3, help="ZeRO stage (%(default)s)")
    ap.add_argument("--shard-size", nargs="+", default=["100MB", "1GB"], help="(%(default)s)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/bench_convert"), help="scratch dir (%(default)s)")
    ap.add_argument("--child", choices=("make", "tiny"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        big = a.child == "make"
        make_checkpoint(a.work / a.child, a.millions if big else 0.001, a.width if big else 16, a.stage)
        return 0
    a.work.mkdir(parents=True, exist_ok=True)
    for child in ("tiny", "make"):  # each engine in its own process (one process group per process)
        if not (a.work / child / "latest").exists():
            subprocess.run([sys.executable, __file__, "--child", child, "--millions", str(a.millions),
                            "--width", str(a.width), "--work", str(a.work), "--stage", str(a.stage)],
                           check=True)  # fmt: skip
    base = convert(a.work / "tiny", a.work / "out", "none")
    mib = a.millions * 1e6 * 4 / 2**20
    print(f"ZeRO-{a.stage}: ~{a.millions:g}M fp32 parameters = {mib:.0f} MiB; converter baseline (tiny): "
          f"resident {base['rss']:.0f} MiB, anonymous {base['anon']:.0f} MiB")  # fmt: skip
    head = ["shard size", "peak resident", "peak anonymous", "anon - baseline", "file-backed"]
    print(" | ".join(head))
    for s in a.shard_size:
        r = convert(a.work / "make", a.work / "out", s)
        cells = [s, f"{r['rss']:.0f} MiB", f"{r['anon']:.0f} MiB", f"{r['anon'] - base['anon']:.0f} MiB",
                 f"{r['file']:.0f} MiB"]  # fmt: skip
        print(" | ".join(c.rjust(len(h)) for c, h in zip(cells, head)))
    return 0


if __name__ == "__main__":
    from mico_ds.distributed.launch import exit_now

    exit_now(main())  # without the interpreter's teardown of live Gloo groups (distributed/launch.py)
