"""Evaluate a MiCo checkpoint: retrieval (contrastive + matching rerank), captioning (beam search,
CIDEr-D / BLEU-4) and open-ended QA (exact match), the protocol of MiCo appendix B.3.

    # a training run's checkpoint, one process (the ZeRO partitions are consolidated on the CPU)
    python -m mico_ds.eval --checkpoint runs/demo --tasks retrieval,captioning,qa --out eval.json

    # the same under the deepspeed launcher: the engine loads its partitions as the trainer does
    # (as many ranks as the run had; another count consolidates and re-partitions)
    deepspeed --num_gpus 2 --module mico_ds.eval --checkpoint runs/demo --tag step00000300

    # an exported checkpoint: a consolidated fp32 state dict of the whole model + its run's config
    python -m mico_ds.eval --checkpoint export/model.safetensors --config runs/demo/config.yaml

--checkpoint accepts a run directory (its checkpoints/ and config.yaml), a checkpoints directory, one
checkpoint tag directory, a .safetensors / .bin / .pt state dict, or a directory of them as
tools/zero_to_fp32.py writes (mico_ds.checkpoint.locate finds what it is). --data replaces the run's
data.val_shards (brace patterns relative to data.root, or absolute paths); any config key can be
overridden (--eval.num_beams=5, --eval.max_samples=1000, --data.root=...).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

from mico_ds.checkpoint import Location, load_meta, locate, read_run_config
from mico_ds.config import EVAL_TASKS, parse_args_and_overrides, to_dict

log = logging.getLogger("mico_ds")


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(
        prog="python -m mico_ds.eval",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--checkpoint", required=True, help="run dir, checkpoints dir, tag dir, or a state-dict file"
    )
    p.add_argument("--tag", default=None, help="checkpoint tag (default: the one named by 'latest')")
    p.add_argument(
        "--config", default=None, help="config.yaml of the run (default: found next to the checkpoint)"
    )
    p.add_argument(
        "--data", default=None, help="held-out shards to evaluate (default: the run's data.val_shards)"
    )
    p.add_argument(
        "--modalities",
        default=None,
        help="comma-separated knowledge modalities (default: data.val_modalities)",
    )
    p.add_argument(
        "--tasks",
        default=None,
        help=f"comma-separated subset of {','.join(EVAL_TASKS)} (default: eval.tasks)",
    )
    p.add_argument("--out", default=None, help="write the results as JSON to this file (rank 0)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # set by deepspeed
    return parse_args_and_overrides(p, argv)


# ----------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    args, overrides = parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    loc = locate(args.checkpoint, args.tag, state_dicts=True)
    cfg = read_run_config(loc, args.config, overrides)
    cfg.train.progress = False
    tasks = args.tasks.split(",") if args.tasks else list(cfg.eval.tasks)
    bad = [t for t in tasks if t not in EVAL_TASKS]
    if bad:
        raise ValueError(f"--tasks: unknown {bad}; known: {list(EVAL_TASKS)}")
    modalities = args.modalities.split(",") if args.modalities else None
    if args.data:
        cfg.data.val_shards = args.data

    import torch

    from mico_ds import distributed as mdist
    from mico_ds.data.tokenizer import run_tokenizer
    from mico_ds.distributed.ds_config import use_bf16, zero_stage
    from mico_ds.distributed.engine import build_engine, init_distributed
    from mico_ds.distributed.launch import launched
    from mico_ds.distributed.zero_load import load_state_dict_into
    from mico_ds.eval.runner import format_results, run_evaluation
    from mico_ds.models.mico import MiCoModel

    tokenizer = run_tokenizer(cfg.data, cfg.demo)
    bf16 = use_bf16(cfg)
    if launched():
        init_distributed(cfg.train.dist_timeout_s)
        engine, ds, _ = build_engine(cfg, lambda: MiCoModel.from_run_config(cfg, tokenizer.special))
        model, device = engine.module, engine.device
        same_world = (
            loc.kind == "zero" and load_meta(loc.path, loc.tag)["world_size"] == mdist.get_world_size()
        )
        if same_world:  # the trainer's way: each rank reads its own partitions
            loaded, _ = engine.load_checkpoint(
                str(loc.path), tag=loc.tag, load_optimizer_states=False, load_lr_scheduler_states=False
            )
            if loaded is None:
                raise ValueError(f"DeepSpeed could not load {loc.tag_dir}")
        else:  # consolidated on rank 0 (every rank without ZeRO-3), re-partitioned by the gather
            zero3 = zero_stage(ds) == 3
            sd = consolidated(loc) if mdist.is_main_process() or not zero3 else None
            load_state_dict_into(model, sd, str(loc.tag_dir), zero3=zero3)
    else:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        model = MiCoModel.from_run_config(cfg, tokenizer.special)
        load_state_dict_into(model, consolidated(loc), str(loc.tag_dir), zero3=False)
        model.to(device=device, dtype=torch.bfloat16 if bf16 else torch.float32)
    res = run_evaluation(
        model, cfg, tokenizer, device, bf16, tasks, progress=not args.no_progress and mdist.is_main_process(),
        modalities=modalities,
    )  # fmt: skip
    if mdist.is_main_process():
        res = {
            "checkpoint": str(loc.tag_dir),
            "world_size": mdist.get_world_size(),
            "val_shards": cfg.data.val_shards,
            "eval": to_dict(cfg.eval),
            **res,
        }
        print(format_results(res), flush=True)
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(res, indent=1))
            print(f"results: {args.out}")
    mdist.barrier()
    mdist.destroy()
    return 0


def consolidated(loc: Location) -> dict[str, Any]:
    """fp32 weights of the whole model: an exported state dict, or a checkpoint of any ZeRO stage (or
    a universal one) consolidated the way tools/zero_to_fp32.py does it."""
    if loc.kind == "state_dict":
        from mico_ds.checkpoint.formats.reader import unwrap_state_dict
        from mico_ds.checkpoint.formats.safetensors import load_state_dict

        return unwrap_state_dict(load_state_dict(loc.path))  # a training script's wrapper dict, too
    from mico_ds.distributed.zero_checkpoint import fp32_state_dict

    return {k: v.contiguous() for k, v in fp32_state_dict(loc.path, loc.tag).items()}


if __name__ == "__main__":
    from mico_ds.distributed.launch import exit_now

    exit_now(main())  # without the interpreter's teardown (distributed/launch.py, exit_now)
