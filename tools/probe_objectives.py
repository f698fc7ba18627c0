#!/usr/bin/env python
"""How the objectives interact: train the model in one process and watch the LLM learn to read the context.

    python tools/probe_objectives.py --objectives.contrastive_weight=0 --objectives.matching_weight=0
    python tools/probe_objectives.py                                      # the recipe's weights
    python tools/probe_objectives.py --objectives.contrastive_weight=1.0  # the paper's 1:1:1

One process, no DeepSpeed: the recipe's model, AdamW with its parameter groups, schedule and gradient
clipping, on its first corpus (default the demo's ``omni``). Every ``--every`` steps it prints the
training losses, the total gradient norm and the held-out grounding figures (mico_ds.eval.grounding:
generation loss with each item's own context vs another item's, and how often the matching head
prefers the own context). docs/benchmarks.md ("The demo") records what these runs showed.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from mico_ds.config import load_config
from mico_ds.data.read.mixture import build_train_loader
from mico_ds.data.tokenizer import Tokenizer
from mico_ds.eval.grounding import evaluate_grounding
from mico_ds.eval.runner import load_batches
from mico_ds.models.mico import MiCoModel
from mico_ds.optim import lr_lambda, param_groups
from mico_ds.train.data import prepare_data


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--recipe", default="demo")
    p.add_argument("--corpus", default=None, help="corpus to train on (default: the recipe's first)")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--every", type=int, default=25, help="steps between reports")
    p.add_argument("--eval-items", type=int, default=64, help="held-out items for the grounding figures")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--json", default=None, help="also write every report as JSON lines here")
    args, rest = p.parse_known_args(argv)
    bad = [a for a in rest if not a.startswith("--") or "=" not in a]
    if bad:
        p.error(f"unrecognized arguments {bad}; config overrides look like --section.key=value")
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = load_config(args.recipe, [*rest, f"train.max_steps={args.steps}", "data.num_workers=0"])
    name = args.corpus or cfg.data.corpora[0].name
    corpus = next((c for c in cfg.data.corpora if c.name == name), None)
    if corpus is None or corpus.joined_from:
        raise SystemExit(f"--corpus {name!r}: not a plain corpus of {[c.name for c in cfg.data.corpora]}")
    corpus.weight, corpus.steps = 1.0, None
    cfg.data.corpora = [corpus]
    tok: Tokenizer = prepare_data(cfg)
    torch.manual_seed(cfg.train.seed)
    model = MiCoModel.from_run_config(cfg, tok.special)
    groups = param_groups(model, cfg.optim)
    opt = torch.optim.AdamW(groups, lr=cfg.optim.lr, betas=tuple(cfg.optim.betas), eps=cfg.optim.eps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, [lr_lambda(cfg.optim, cfg.train.max_steps)] * len(groups))
    data = build_train_loader(cfg, rank=0, world_size=1)
    held_out = load_batches(cfg, "cpu", False, args.eval_items, corpus.modalities)
    out = open(args.json, "w") if args.json else None  # noqa: SIM115 - closed below
    clip = cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else float("inf")
    last: dict[str, float] = {}
    t0 = time.perf_counter()
    for step in range(args.steps + 1):
        if step % args.every == 0 or step == args.steps:
            model.eval()
            rec = {"step": step, **evaluate_grounding(model, held_out, cfg.objectives.mask_ratio)}
            model.train()
            rec.update({k: round(v, 4) for k, v in last.items()})
            rec["seconds"] = round(time.perf_counter() - t0, 1)
            print(json.dumps(rec), flush=True)
            if out:
                out.write(json.dumps(rec) + "\n")
        if step == args.steps:
            break
        losses, _ = model(next(data), step=step)
        opt.zero_grad(set_to_none=True)
        losses["loss"].backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        sched.step()
        last = {k: float(v.detach()) for k, v in losses.items()} | {"grad_norm": float(norm)}
    if out:
        out.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
