"""Evaluate a MiCo checkpoint: retrieval (contrastive + matching rerank), captioning (beam search,
CIDEr-D / BLEU-4) and open-ended QA (exact match), the protocol of MiCo appendix B.3.

    # a training run's checkpoint, one process (the ZeRO partitions are consolidated on the CPU)
    python -m mico_ds.eval --checkpoint runs/demo --tasks retrieval,captioning,qa --out eval.json

    # the same under the deepspeed launcher: the engine loads its partitions as the trainer does
    # (as many ranks as the run had; another count consolidates and re-partitions)
    deepspeed --num_gpus 2 -m mico_ds.eval --checkpoint runs/demo --tag step00000300

    # an exported checkpoint: a consolidated fp32 state dict of the whole model + its run's config
    python -m mico_ds.eval --checkpoint export/model.safetensors --config runs/demo/config.yaml

--checkpoint accepts a run directory (its checkpoints/ and config.yaml), a checkpoints directory, one
checkpoint tag directory, or a .safetensors / .bin / .pt state dict. --data replaces the run's
data.val_shards (brace patterns relative to data.root, or absolute paths); any config key can be
overridden (--eval.num_beams=5, --eval.max_samples=1000, --data.root=...).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

import yaml

from mico_ds.config import (
    EVAL_TASKS,
    RunConfig,
    config_from_dict,
    parse_args_and_overrides,
    parse_override,
    to_dict,
)

log = logging.getLogger("mico_ds")
STATE_DICT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


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


# ----------------------------------------------------------------------------- locating things


def locate(checkpoint: str, tag: str | None, config: str | None) -> tuple[str, Path, str | None, Path]:
    """(kind, path, tag, config.yaml) where kind is "zero" (path = checkpoints dir) or "state_dict"."""
    from mico_ds.train import checkpoint as ckpt

    p = Path(checkpoint)
    if not p.exists():
        raise ValueError(f"--checkpoint {p} does not exist")
    if p.is_file():
        if not p.name.endswith(STATE_DICT_SUFFIXES):
            raise ValueError(f"--checkpoint {p}: a file must be a state dict {STATE_DICT_SUFFIXES}")
        cfg = Path(config) if config else _find_config(p.parent, p.parent.parent)
        return "state_dict", p, None, cfg
    if (p / "checkpoints").is_dir():  # a run directory
        run, ckdir = p, p / "checkpoints"
    elif ckpt.TAG_RE.match(p.name) and (p / "client").is_dir():  # one tag directory
        run, ckdir, tag = p.parent.parent, p.parent, tag or p.name
    else:  # a checkpoints directory
        run, ckdir = p.parent, p
    tag = ckpt.resolve_tag(ckdir, tag or "latest")
    cfg = Path(config) if config else None
    if cfg is None:
        meta_cfg = ckdir / tag / "client" / "meta.json"
        cfg = run / "config.yaml" if (run / "config.yaml").is_file() else meta_cfg
    return "zero", ckdir, tag, cfg


def _find_config(*dirs: Path) -> Path:
    for d in dirs:
        if (d / "config.yaml").is_file():
            return d / "config.yaml"
    raise ValueError(
        f"no config.yaml next to the checkpoint (looked in {[str(d) for d in dirs]}); pass --config"
    )


def load_run_config(path: Path, overrides: list[str]) -> RunConfig:
    """The run's resolved config (config.yaml, or a checkpoint's meta.json) with dotted overrides."""
    if not path.is_file():
        raise ValueError(f"config {path} not found; pass --config")
    raw = (
        json.loads(path.read_text())["config"] if path.suffix == ".json" else yaml.safe_load(path.read_text())
    )
    from mico_ds.config import _set_dotted

    for ov in overrides:
        k, v = parse_override(ov)
        _set_dotted(raw, k, v)
    try:
        return config_from_dict(raw)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None


def read_state_dict(path: Path) -> dict[str, Any]:
    """A consolidated state dict: what tools/zero_to_fp32.py writes (.safetensors / .bin, sharded or
    not), or a torch file (possibly under "module"/"state_dict")."""
    from mico_ds.export import load_state_dict

    sd = load_state_dict(path)
    for key in ("module", "state_dict", "model"):
        if isinstance(sd, dict) and isinstance(sd.get(key), dict):
            sd = sd[key]
    return sd


def load_weights(model: Any, sd: dict[str, Any], where: str) -> None:
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"{where} does not fit the model of the config: missing {missing[:8]} ({len(missing)}), "
            f"unexpected {unexpected[:8]} ({len(unexpected)})"
        )


# ----------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    args, overrides = parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    kind, path, tag, cfg_path = locate(args.checkpoint, args.tag, args.config)
    cfg = load_run_config(cfg_path, overrides)
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
    from mico_ds.data.tokenizer import Tokenizer
    from mico_ds.eval.runner import format_results, run_evaluation
    from mico_ds.models.mico import MiCoModel
    from mico_ds.train.data import tokenizer_path

    launched = any(k in os.environ for k in ("RANK", "LOCAL_RANK"))
    tokenizer = Tokenizer.from_path(tokenizer_path(cfg))
    if launched:
        from mico_ds.train import checkpoint as ckpt
        from mico_ds.train.engine import build_engine, init_distributed, use_bf16

        init_distributed(cfg)
        engine, _ = build_engine(cfg, lambda: MiCoModel(cfg, tokenizer.special))
        model, device, bf16 = engine.module, engine.device, use_bf16(cfg)
        same_world = kind == "zero" and ckpt.load_meta(path, tag)["world_size"] == mdist.get_world_size()
        if same_world:  # the trainer's way: each rank reads its own partitions
            loaded, _ = engine.load_checkpoint(
                str(path), tag=tag, load_optimizer_states=False, load_lr_scheduler_states=False
            )
            if loaded is None:
                raise ValueError(f"DeepSpeed could not load {path / tag}")
        else:
            import deepspeed

            sd = _consolidated(kind, path, tag) if mdist.is_main_process() else None
            with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=0):
                if mdist.is_main_process():
                    load_weights(model, sd, str(path))
    else:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        model = MiCoModel(cfg, tokenizer.special)
        load_weights(model, _consolidated(kind, path, tag), str(path))
        from mico_ds.train.engine import use_bf16

        bf16 = use_bf16(cfg)
        model.to(device=device, dtype=torch.bfloat16 if bf16 else torch.float32)
    res = run_evaluation(
        model, cfg, tokenizer, device, bf16, tasks, progress=not args.no_progress and mdist.is_main_process(),
        modalities=modalities,
    )  # fmt: skip
    if mdist.is_main_process():
        res = {
            "checkpoint": str(path / tag) if tag else str(path),
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
    mdist.destroy()  # before exit, not in Gloo's thread teardown (see mico_ds.train.__main__)
    return 0


def _consolidated(kind: str, path: Path, tag: str | None) -> dict[str, Any]:
    """fp32 weights of the whole model: an exported file, or a checkpoint of any ZeRO stage (or a
    universal one) consolidated the way tools/zero_to_fp32.py does it."""
    if kind == "state_dict":
        return read_state_dict(path)
    from mico_ds.train.convert import fp32_state_dict

    return {k: v.contiguous() for k, v in fp32_state_dict(path, tag).items()}


if __name__ == "__main__":
    sys.exit(main())
