"""Convert a mico_ds ZeRO checkpoint into a DeepSpeed universal checkpoint, to resume on another GPU count.

    python tools/to_universal.py runs/NAME                      # the checkpoint `latest` names
    python tools/to_universal.py runs/NAME --tag step00040000   # -> checkpoints/step00040000_universal
    # then, on the new number of ranks (keep the global batch: scale optim.grad_accum):
    deepspeed --num_gpus 4 --module mico_ds.train --recipe NAME --run-dir runs/NAME \\
        --resume step00040000_universal --allow-config-change

A ZeRO-1/2/3 checkpoint stores each rank's partition of the fp32 weights and Adam moments, so it loads
only on the world size that wrote it. DeepSpeed's converter (deepspeed.checkpoint.ds_to_universal, run
here in-process) rewrites them per parameter (zero/<name>/fp32.pt, exp_avg.pt, exp_avg_sq.pt: full
tensors) plus the common optimizer state; DeepSpeed then re-partitions them for any world size when the
engine loads with "checkpoint": {"load_universal": true}. This tool also copies the mico_ds client state
(step, config, data-stream positions, metric history) and writes mico_universal.json, the marker from
which the trainer knows to load the tag as universal: no config change is needed.

The source checkpoint is first checked against its manifest (sizes and CRC-32 checksums recorded when
it was saved; --no-verify skips this); it is not modified. The output is written under a temporary
name and renamed when complete; it is not counted by checkpoint retention (delete it when the resumed
run has saved its own). ZeRO-0 checkpoints need no conversion (one file holds the whole model and
optimizer). See docs/operations.md, "Change the GPU count".
"""

from __future__ import annotations

import argparse
import sys
import time

from mico_ds.checkpoint import describe, locate, manifest
from mico_ds.cli.common import fail


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="to_universal.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("checkpoint", help="run dir, its checkpoints/ dir, or one checkpoint (tag) dir")
    p.add_argument("--tag", default="latest", help="checkpoint tag, e.g. step00040000 (%(default)s)")
    p.add_argument("--out-tag", help="name of the universal checkpoint (default: TAG_universal)")
    p.add_argument("--workers", type=int, default=1, help="DeepSpeed extract/merge processes (%(default)s)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out-tag")
    p.add_argument("--keep-temp", action="store_true", help="keep DeepSpeed's intermediate fragments (debug)")
    p.add_argument(
        "--no-verify", action="store_true",
        help="do not check the source's files against its manifest (sizes, CRC-32) first",
    )  # fmt: skip
    args = p.parse_args(argv)
    if args.workers < 1:
        p.error(f"--workers must be >= 1, got {args.workers}")

    from mico_ds.distributed.zero_checkpoint import to_universal

    try:
        loc = locate(args.checkpoint, args.tag)
        ckpt_dir, tag = loc.path, loc.tag
        if not args.no_verify:
            print(manifest.require_intact(ckpt_dir / tag), flush=True)
        info = describe(ckpt_dir / tag)
        print(
            f"checkpoint {ckpt_dir / tag}: ZeRO-{info['zero_stage']}, "
            f"written by {info['world_size']} rank(s)",
            flush=True,
        )
        t0 = time.perf_counter()
        out = to_universal(
            ckpt_dir,
            tag,
            args.out_tag,
            workers=args.workers,
            overwrite=args.overwrite,
            keep_temp=args.keep_temp,
            verify=False,  # checked above
        )
    except ValueError as e:
        return fail("to_universal.py", e)
    print(
        f"wrote {out} in {time.perf_counter() - t0:.1f} s\n"
        f"resume on any number of ranks with: --resume {out.name} --allow-config-change "
        f"(and the same --run-dir)",
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
