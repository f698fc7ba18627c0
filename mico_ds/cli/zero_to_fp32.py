"""Consolidate a mico_ds DeepSpeed checkpoint (ZeRO-0/1/2/3 or universal) into plain fp32 weights.

    # consolidated MiCoModel state dict: OUT/model.safetensors, or model-0000i-of-0000n.safetensors +
    # model.safetensors.index.json above --max-shard-size
    python tools/zero_to_fp32.py runs/NAME OUT                      # the checkpoint `latest` names
    python tools/zero_to_fp32.py runs/NAME/checkpoints OUT --tag step00040000 --max-shard-size 2GB
    python tools/zero_to_fp32.py runs/NAME OUT --format bin         # pytorch_model*.bin (torch.save)
    # the two branches, loadable without mico_ds:
    python tools/zero_to_fp32.py runs/NAME --export-branches EXPORT
    #   EXPORT/vision: timm.create_model("local-dir:EXPORT/vision", pretrained=True)
    #   EXPORT/text:   transformers.LlamaForCausalLM.from_pretrained("EXPORT/text"),
    #                  transformers.AutoTokenizer.from_pretrained("EXPORT/text")

The first argument is a run directory, its checkpoints/ directory or one checkpoint directory. Before
anything is read, the checkpoint's files are checked against its manifest (mico_manifest.json: sizes
and CRC-32 checksums recorded when it was saved); a truncated or bit-flipped file is an error naming it.
--no-verify skips the check (a checkpoint without a manifest is read unverified, with a note). The
weights are DeepSpeed's own reconstruction (``deepspeed.utils.zero_to_fp32``, the code of the
zero_to_fp32.py DeepSpeed copies next to every checkpoint): the fp32 master weights, not the bf16
copies. Memory: under ZeRO-3 each parameter is gathered from the memory-mapped partitions when its
output shard is written, and one shard is held at a time (peak ~ one shard + the largest parameter,
plus page cache); under ZeRO-1/2 DeepSpeed joins the partitions of each parameter group first, so the
whole fp32 model is in memory. The peak is printed at the end.

The vision export is a timm VisionTransformer (RGB patch embedding, CLS, position table, blocks, norm;
no head) with a timm config.json; the depth / normal / audio tokenizers go to
omni_tokenizers.safetensors next to it. The text export is the Llama branch as a Hugging Face
directory with the run's tokenizer (<pad> and <mask> added). See docs/operations.md, "Convert".
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from mico_ds.checkpoint import describe, locate, manifest, read_run_config
from mico_ds.checkpoint.formats import export_branches
from mico_ds.checkpoint.formats.safetensors import save_state_dict
from mico_ds.cli.common import fail, parse_size
from mico_ds.memory import PeakMemory


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="zero_to_fp32.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("checkpoint", help="run dir, its checkpoints/ dir, or one checkpoint (tag) dir")
    p.add_argument("output_dir", nargs="?", help="directory for the consolidated MiCoModel state dict")
    p.add_argument("--tag", default="latest", help="checkpoint tag, e.g. step00040000 (%(default)s)")
    p.add_argument(
        "--format", choices=("safetensors", "bin"), default="safetensors",
        help="safetensors files, or torch.save pickles (%(default)s)",
    )  # fmt: skip
    p.add_argument(
        "--max-shard-size", default="5GB",
        help="largest file; above it the weights are sharded with an index (%(default)s; 'none': one file)",
    )  # fmt: skip
    p.add_argument(
        "--export-branches", metavar="DIR",
        help="also write DIR/vision (timm) and DIR/text (Hugging Face Llama + tokenizer)",
    )  # fmt: skip
    p.add_argument(
        "--tokenizer",
        help="tokenizer.model or tokenizer dir for the text export (default: the run's data.tokenizer)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace weight files already in output_dir")
    p.add_argument(
        "--no-verify", action="store_true",
        help="do not check the files against the checkpoint's manifest (sizes, CRC-32) first",
    )  # fmt: skip
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    args = p.parse_intermixed_args(argv)  # `RUN --tag T OUT` as well as `RUN OUT --tag T`
    if args.output_dir is None and args.export_branches is None:
        p.error("give output_dir, --export-branches DIR, or both")
    try:
        max_shard = None if args.max_shard_size.lower() == "none" else parse_size(args.max_shard_size)
    except ValueError as e:
        p.error(f"--max-shard-size: {e}")

    from mico_ds.distributed.zero_checkpoint import fp32_state_dict

    try:
        loc = locate(args.checkpoint, args.tag)
    except ValueError as e:
        return fail("zero_to_fp32.py", e)
    ckpt_dir, tag = loc.path, loc.tag
    out = Path(args.output_dir) if args.output_dir else None
    if out is not None and not args.overwrite:
        old = [f.name for pat in ("model*.safetensors*", "pytorch_model*.bin*") for f in out.glob(pat)]
        if old:
            return fail("zero_to_fp32.py", f"{out} already holds {sorted(old)[:4]}; pass --overwrite")
    if not args.no_verify:
        try:
            print(manifest.require_intact(ckpt_dir / tag), flush=True)
        except ValueError as e:
            return fail("zero_to_fp32.py", e)
    info = describe(ckpt_dir / tag)
    print(
        f"checkpoint {ckpt_dir / tag}: ZeRO-{info['zero_stage']}"
        f"{' (universal)' if info['universal'] else ''}, written by {info['world_size']} rank(s)",
        flush=True,
    )
    t0 = time.perf_counter()
    with PeakMemory() as mem:
        tensors = fp32_state_dict(ckpt_dir, tag)
        total = sum(t.shape.numel() for t in tensors.values())
        print(f"{len(tensors)} tensors, {total:,} elements ({_mib(4 * total)} in fp32)", flush=True)
        bar = None
        if not args.quiet:
            from tqdm import tqdm

            bar = tqdm(desc="writing shards", unit="file", file=sys.stdout)

        def progress(i: int, n: int, name: str) -> None:
            if bar is not None:
                bar.total = n
                bar.set_postfix_str(name)
                bar.update(1)

        if out is not None:
            if args.overwrite:
                for pat in ("model*.safetensors*", "pytorch_model*.bin*"):
                    for f in out.glob(pat):
                        f.unlink()
            files = save_state_dict(
                tensors, out, max_shard_size=max_shard, safe=args.format == "safetensors", progress=progress
            )
            (out / "mico_ds_checkpoint.json").write_text(
                json.dumps({"checkpoint": str(ckpt_dir / tag), **info}, indent=1) + "\n"
            )
            if bar is not None:
                bar.close()
            print(f"wrote {len(files)} file(s) to {out}: {', '.join(f.name for f in files[:4])}"
                  f"{' ...' if len(files) > 4 else ''}", flush=True)  # fmt: skip
        if args.export_branches:
            from mico_ds.data.tokenizer import Tokenizer

            cfg = read_run_config(loc)
            tok_path = Path(args.tokenizer or cfg.data.tokenizer or "")
            if not tok_path.exists():
                return fail(
                    "zero_to_fp32.py",
                    f"tokenizer {str(tok_path)!r} (the run's data.tokenizer) not found; "
                    "pass --tokenizer PATH",
                )
            dirs = export_branches(
                tensors, cfg, args.export_branches, Tokenizer.from_path(tok_path), max_shard
            )
            print(f"exported vision -> {dirs['vision']} (timm), text -> {dirs['text']} (Hugging Face)")
    peak = mem.peak
    print(
        f"done in {time.perf_counter() - t0:.1f} s; peak memory: resident {_mib(peak['VmRSS'])} "
        f"(anonymous {_mib(peak['RssAnon'])}, file-backed {_mib(peak['RssFile'])}; "
        f"VmHWM {_mib(peak['VmHWM'])})",
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
