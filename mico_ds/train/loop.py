"""The training loop: fetch, forward, backward, step; logging, evaluation and saving behind predicates."""

from __future__ import annotations

import json
import logging
import random
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from mico_ds import distributed as mdist
from mico_ds.config import RunConfig, config_from_dict, to_dict
from mico_ds.data.pipeline import to_device
from mico_ds.train import checkpoint as ckpt
from mico_ds.train import data as tdata
from mico_ds.train import health
from mico_ds.train.engine import build_engine, init_distributed, load_checkpoint, zero_stage
from mico_ds.train.metrics import KeyLog, MetricsWriter, Throughput, train_flops_per_sample
from mico_ds.train.signals import PREEMPTED_EXIT_CODE, StopFlag, shield_children

log = logging.getLogger("mico_ds")

# Changing these between a checkpoint and its resume breaks sample-exact continuation.
EXACTNESS_KEYS = (
    "train.seed",
    "optim.grad_accum",
    "data.corpora",
    "data.num_workers",
    "data.shuffle_buffer",
    "data.shards_per_chunk",
)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _get(d: dict, dotted: str) -> Any:
    for p in dotted.split("."):
        d = d[p]
    return d


class Trainer:
    """Owns the engine, the data streams, the run directory and the step counter."""

    def __init__(
        self, cfg: RunConfig, run_dir: Path, resume: str | None = None, allow_config_change: bool = False
    ) -> None:
        self.cfg = cfg
        init_distributed(cfg)
        self.rank, self.world = mdist.get_rank(), mdist.get_world_size()
        self.ranks = health.rank_table()
        self.watch = health.PeerWatch(self.ranks, self.rank).start()
        self.run_dir = Path(mdist.broadcast_object(str(run_dir)))
        self.ckpt_dir = self.run_dir / "checkpoints"
        if resume is None and ckpt.read_latest(self.ckpt_dir) is not None:
            raise ValueError(
                f"{self.run_dir} already holds checkpoints: pass --resume latest to continue it, "
                f"or choose a new --run-dir"
            )
        if cfg.train.deterministic:
            torch.use_deterministic_algorithms(True)
        seed_everything(cfg.train.seed)
        self.tokenizer = tdata.prepare_data(cfg)  # generates the demo corpus on rank 0 when asked
        from mico_ds.models.mico import MiCoModel

        self.engine, self.ds_config = build_engine(cfg, lambda: MiCoModel(cfg, self.tokenizer.special))
        self.bf16 = bool(self.ds_config["bf16"]["enabled"])
        self.device = self.engine.device
        self.step = 0
        self.history: list[dict[str, Any]] = []
        self.data = tdata.build_train_data(cfg, self.tokenizer)
        self.stop = StopFlag(cfg.train.max_minutes)
        self.writer = MetricsWriter(self.run_dir, enabled=self.rank == 0)
        if resume is not None:
            self.load(resume, allow_config_change)
            self.writer.rewind(self.step)  # a run killed after its checkpoint logged steps it now redoes
        elif self.rank == 0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
        mdist.barrier()
        self.keys = None
        if cfg.train.record_keys:
            self.keys = KeyLog(self.run_dir, self.rank, self.step if resume is not None else None)
        if self.rank == 0:
            log.info("ranks: %s", ", ".join(f"{p.rank}={p.host}:{p.pid}" for p in self.ranks))

    # ------------------------------------------------------------------ predicates
    def should_log(self) -> bool:
        return self.step % self.cfg.train.log_every == 0 or self.step == self.cfg.train.max_steps

    def should_save(self) -> bool:
        e = self.cfg.train.save_every
        return e > 0 and self.step % e == 0 and self.step < self.cfg.train.max_steps

    def should_eval(self) -> bool:
        e = self.cfg.train.eval_every
        return e > 0 and self.step % e == 0 and self.step < self.cfg.train.max_steps

    # ------------------------------------------------------------------ the step
    def train_step(self) -> tuple[dict[str, torch.Tensor], int]:
        """One optimizer step over ``optim.grad_accum`` micro-batches; returns detached terms."""
        sums: dict[str, torch.Tensor] = {}
        n = 0
        for micro in range(self.cfg.optim.grad_accum):
            # Data workers may be forked here: keep SIGTERM/SIGUSR1 from them, and their seed draw from
            # the trainer's RNG (a resume forks them at another step).
            with shield_children(), ckpt.rng_preserved():
                raw = next(self.data)
            if self.keys is not None:
                self.keys.write(self.step + 1, micro, raw)
            batch = to_device(raw, self.device, self.bf16)
            batch["step"] = self.step
            losses, report = self.engine(batch)
            self.engine.backward(losses["loss"])
            self.engine.step()
            for k, v in {**losses, **report}.items():
                sums[k] = sums.get(k, 0) + v.detach().float()
            n += len(batch["keys"])
        return {k: v / self.cfg.optim.grad_accum for k, v in sums.items()}, n

    def fit(self) -> int:
        """Train to ``train.max_steps``; returns the process exit code."""
        cfg = self.cfg
        tput = Throughput()
        flops_ps = None
        pbar = None
        if self.rank == 0 and cfg.train.progress:
            from tqdm import tqdm

            pbar = tqdm(
                total=cfg.train.max_steps,
                initial=self.step,
                desc="train",
                dynamic_ncols=True,
                file=sys.stdout,
            )
        while self.step < cfg.train.max_steps:
            terms, n = self.train_step()
            self.step += 1
            tput.add(n * self.world)
            if pbar is not None:
                pbar.update(1)
                pbar.set_postfix(loss=f"{terms['loss'].item():.3f}")
            if self.should_log():
                rec = {k: mdist.dist_mean(v).item() for k, v in sorted(terms.items())}
                rec.update(step=self.step, lr=self.engine.get_lr()[0], samples_per_s=tput.rate())
                rec.update({f"skipped/{k}": v for k, v in self.data.skip_counts().items()})
                if torch.cuda.is_available():
                    flops_ps = flops_ps or self.flops_per_sample()
                    rec["tflops_per_gpu"] = rec["samples_per_s"] / self.world * flops_ps / 1e12
                    rec["gpu_mem_gb"] = torch.cuda.max_memory_allocated() / 2**30
                self.history.append(rec)
                self.writer.write(rec)
            if self.should_eval():
                self.evaluate()
            if mdist.any_rank(self.stop.local()):
                # Every rank agreed at this step boundary: save and ask the launcher to requeue.
                reason = self.stop.reason or "another rank"
                path = self.save()
                self.watch.stop()  # the last collective: the ranks now exit, each at its own pace
                if self.rank == 0:
                    log.warning("stopping at step %d (%s); checkpoint %s", self.step, reason, path)
                    self.writer.write({"step": self.step, "event": "preempted", "reason": reason})
                return PREEMPTED_EXIT_CODE
            if self.should_save():
                self.save()
        if pbar is not None:
            pbar.close()
        path = self.save() if ckpt.read_latest(self.ckpt_dir) != ckpt.tag_for(self.step) else self.ckpt_dir
        final = self.evaluate()
        self.watch.stop()
        self.write_summary(final, path)
        return 0

    def flops_per_sample(self) -> float:
        mods = self.cfg.data.corpora[0].modalities
        return train_flops_per_sample(
            self.cfg, mods, self.cfg.data.text_max_len, self.tokenizer.special.vocab_size
        )

    # ------------------------------------------------------------------ eval / save / load
    def evaluate(self) -> dict[str, Any]:
        """Run ``eval.tasks`` on the held-out shards (every rank) and log the figures at this step."""
        if not self.cfg.eval.tasks or not self.cfg.data.val_shards:
            return {}
        from mico_ds.eval.runner import run_evaluation, scalars

        t0 = time.perf_counter()
        res = run_evaluation(self.engine.module, self.cfg, self.tokenizer, self.device, self.bf16)
        self.engine.train()
        rec = {"step": self.step, **scalars(res), "eval/seconds": time.perf_counter() - t0}
        self.writer.write(rec)
        self.history.append(rec)
        return res

    def save(self) -> Path:
        meta = {"config": to_dict(self.cfg), "history": self.history[-1000:]}
        client = {"data": self.data.state_dict()}
        return ckpt.save(
            self.engine,
            self.ckpt_dir,
            self.step,
            client,
            meta,
            self.cfg.checkpoint.keep_last,
            self.cfg.checkpoint.keep_every,
        )

    def load(self, resume: str, allow_config_change: bool) -> None:
        tag = ckpt.resolve_tag(self.ckpt_dir, resume)
        meta = ckpt.load_meta(self.ckpt_dir, tag)
        self.check_compatible(meta, allow_config_change)
        tag_dir = self.ckpt_dir / tag
        old_world = int(meta["world_size"])
        if old_world != self.world and ckpt.is_partitioned(tag_dir):
            raise ValueError(
                f"{tag_dir} holds ZeRO partitions of {old_world} ranks and cannot load on {self.world}: "
                f"convert it first with `python tools/to_universal.py {self.ckpt_dir} --tag {tag}`, then "
                f"resume with --resume {tag}_universal --allow-config-change"
            )
        path = load_checkpoint(self.engine, self.ckpt_dir, tag, universal=ckpt.is_universal(tag_dir))
        if path is None:
            raise ValueError(f"DeepSpeed could not load {tag_dir}")
        self.step = int(meta["step"])
        self.history = list(meta.get("history", []))
        client = ckpt.load_client(self.ckpt_dir, tag, self.rank) if old_world == self.world else None
        if client is not None:
            self.data.load_state_dict(client["data"])
            ckpt.set_rng_state(client["rng"])
        elif old_world == self.world:  # a checkpoint without this rank's client file
            self.data.fast_forward(self.step)
        else:
            # Another world size: no stream maps onto an old one. Every new stream starts the epoch
            # after the furthest any old stream reached (see docs/operations.md, "Change the GPU
            # count"); the corpus schedule continues at this step. RNG states stay as seeded.
            merged = ckpt.merge_data_states(ckpt.load_data_states(self.ckpt_dir, tag, old_world), self.rank)
            merged["step"] = self.step * self.cfg.optim.grad_accum  # schedule position in micro-batches
            self.data.load_state_dict(merged)
        if self.rank == 0:
            log.info("resumed from %s at step %d", tag_dir, self.step)

    def check_compatible(self, meta: dict[str, Any], allow: bool) -> None:
        old, new = meta["config"], to_dict(self.cfg)
        diffs = [k for k in EXACTNESS_KEYS if _get(old, k) != _get(new, k)]
        if meta["world_size"] != self.world:
            diffs.append(f"world_size ({meta['world_size']} -> {self.world})")
        if diffs and not allow:
            raise ValueError(
                f"resuming would break exact continuation: changed {diffs}. Pass "
                f"--allow-config-change to resume anyway (the data order then differs from the "
                f"uninterrupted run's; see docs/operations.md)"
            )
        if diffs and self.rank == 0:
            log.warning("resuming with changed %s: the data order is not the uninterrupted run's", diffs)
        config_from_dict(old)  # the old config must still parse (strict)

    def write_summary(self, final_eval: dict[str, float], ckpt_path: Path) -> None:
        if self.rank != 0:
            return
        train_recs = [r for r in self.history if "loss" in r]
        terms = sorted({k for r in train_recs for k in r if k == "loss" or k.endswith("_loss")})

        def avg(recs: list[dict[str, Any]], k: str) -> float:
            vals = [r[k] for r in recs if k in r]
            return float(np.mean(vals)) if vals else float("nan")

        head, tail = train_recs[:3], train_recs[-3:]
        summary = {
            "recipe": self.cfg.name,
            "steps": self.step,
            "world_size": self.world,
            "zero_stage": zero_stage(self.ds_config),
            "first": {k: avg(head, k) for k in terms},
            "last": {k: avg(tail, k) for k in terms},
            "samples_per_s": avg(train_recs[1:], "samples_per_s"),
            "eval": final_eval,
            "checkpoint": str(ckpt_path),
            "run_dir": str(self.run_dir),
        }
        (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
        print(format_summary(summary), flush=True)

    def report_failure(self, exc: BaseException) -> None:
        """Log which rank failed where and what it sees of its peers (a dead one is named)."""
        log.error("%s", health.failure_report(self.ranks, self.rank, self.step, exc))

    def close(self) -> None:
        self.watch.stop()
        self.writer.close()
        self.data.close()


def format_summary(s: dict[str, Any]) -> str:
    lines = [
        "",
        f"== mico_ds run summary: {s['recipe']} ({s['steps']} steps, {s['world_size']} ranks, "
        f"ZeRO-{s['zero_stage']}) ==",
        f"{'term':<20}{'first':>10}{'last':>10}",
    ]
    for k in s["first"]:
        lines.append(f"{k:<20}{s['first'][k]:>10.4f}{s['last'][k]:>10.4f}")
    lines.append(f"samples/s: {s['samples_per_s']:.1f}")
    ev = s["eval"]
    if ev:
        from mico_ds.eval.runner import format_results

        lines.append("held-out evaluation (MiCo appendix B.3 protocol):")
        lines.append(format_results(ev))
    lines.append(f"checkpoint: {s['checkpoint']}")
    lines.append(f"run dir: {s['run_dir']}  (metrics.jsonl, summary.json, tb/)")
    return "\n".join(lines)
