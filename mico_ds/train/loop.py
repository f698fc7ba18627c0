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
from mico_ds.checkpoint import CHECKPOINTS, CheckpointManager, read_latest, rng_preserved, tag_for
from mico_ds.config import RunConfig, to_dict
from mico_ds.data.read.batch import to_device
from mico_ds.data.read.mixture import build_train_loader
from mico_ds.distributed.ds_config import zero_stage
from mico_ds.distributed.engine import build_engine, init_distributed
from mico_ds.train import data as tdata
from mico_ds.train import health
from mico_ds.train.metrics import KeyLog, MetricsWriter, Throughput, train_flops_per_sample
from mico_ds.train.signals import PREEMPTED_EXIT_CODE, StopFlag, shield_children

log = logging.getLogger("mico_ds")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class Trainer:
    """Owns the engine, the data streams, the run directory and the step counter."""

    def __init__(
        self, cfg: RunConfig, run_dir: Path, resume: str | None = None, allow_config_change: bool = False
    ) -> None:
        self.cfg = cfg
        init_distributed(cfg.train.dist_timeout_s)
        self.rank, self.world = mdist.get_rank(), mdist.get_world_size()
        cfg.data.resolve_batch_sizes(self.world, cfg.optim.grad_accum)
        self.ranks = health.rank_table()
        self.watch = health.PeerWatch(self.ranks, self.rank).start()
        self.run_dir = Path(mdist.broadcast_object(str(run_dir)))
        if resume is None and read_latest(self.run_dir / CHECKPOINTS) is not None:
            raise ValueError(
                f"{self.run_dir} already holds checkpoints: pass --resume latest to continue it, "
                f"or choose a new --run-dir"
            )
        if cfg.train.deterministic:
            torch.use_deterministic_algorithms(True)
        seed_everything(cfg.train.seed)
        self.tokenizer = tdata.prepare_data(cfg)  # generates the demo corpus on rank 0 when asked
        from mico_ds.models.mico import MiCoModel

        model_fn = lambda: MiCoModel.from_run_config(cfg, self.tokenizer.special)  # noqa: E731
        self.engine, self.ds_config = build_engine(cfg, model_fn)
        self.bf16 = bool(self.ds_config["bf16"]["enabled"])
        self.device = self.engine.device
        self.step = 0
        self.history: list[dict[str, Any]] = []
        self.data = build_train_loader(cfg)
        self.checkpoints = CheckpointManager(
            self.run_dir, self.engine, self.data, cfg.checkpoint.keep_last, cfg.checkpoint.keep_every
        )
        self.stop = StopFlag(cfg.train.max_minutes)
        self.writer = MetricsWriter(self.run_dir, enabled=self.rank == 0)
        if resume is not None:
            resumed = self.checkpoints.load(resume, to_dict(cfg), allow_config_change)
            self.step, self.history = resumed.step, resumed.history
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
            with shield_children(), rng_preserved():
                raw = next(self.data)
            if self.keys is not None:
                self.keys.write(self.step + 1, micro, raw)
            batch = to_device(raw, self.device, self.bf16)
            losses, report = self.engine(batch, step=self.step, micro=micro)
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
        done = self.checkpoints.latest() == tag_for(self.step)
        path = self.checkpoints.ckpt_dir if done else self.save()
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
        return self.checkpoints.save(
            self.step, {"config": to_dict(self.cfg), "history": self.history[-1000:]}
        )

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
