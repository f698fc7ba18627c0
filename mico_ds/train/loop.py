"""The training loop: fetch, forward, backward, step; logging, evaluation and saving behind predicates."""

from __future__ import annotations

import json
import logging
import math
import os
import random
import sys
import time
from dataclasses import asdict
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
from mico_ds.distributed.launch import exit_now
from mico_ds.train import best, failfast, guard, health
from mico_ds.train import data as tdata
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
        self.run_dir = Path(mdist.broadcast_object(str(run_dir)))
        launch_id = mdist.broadcast_object(f"{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}")
        self.notice = failfast.FailureNotice(self.run_dir, launch_id)
        self.beats = failfast.Heartbeats(self.run_dir, launch_id)
        if self.rank == 0:
            self.notice.clear_stale()
        self.watch = health.PeerWatch(
            self.ranks, self.rank, notice=self.notice, beats=self.beats,
            on_peer_failure=lambda rec: exit_now(1),
        ).start()  # fmt: skip
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
        # a weights-only start; a resume takes the weights from its own checkpoint instead
        init = cfg.model.init if resume is None else None
        self.engine, self.ds_config, self.init_report = build_engine(cfg, model_fn, init)
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
        self.zero_stage = zero_stage(self.ds_config)
        t = cfg.train
        self.guard = guard.StepGuard(t.max_bad_steps, t.spike_sigmas, t.spike_window)
        self.skips = guard.DataSkips(self.run_dir)
        self.step_keys: list[list[str]] = []
        self.phase = ""  # "save" / "evaluation" between steps, for the failure report
        if resume is not None:
            resumed = self.checkpoints.load(resume, to_dict(cfg), allow_config_change)
            self.step, self.history = resumed.step, resumed.history
            self.writer.rewind(self.step)  # a run killed after its checkpoint logged steps it now redoes
            self.skip_data(self.skips.after(self.step, self.world))
        elif self.rank == 0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
            if self.init_report is not None:
                (self.run_dir / "init.json").write_text(json.dumps(asdict(self.init_report), indent=1))
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
    def train_step(self) -> tuple[dict[str, torch.Tensor], int, bool]:
        """One optimizer step over ``optim.grad_accum`` micro-batches.

        Returns the detached terms, the samples this rank used, and whether the optimizer updated the
        weights (False: a loss term or the gradient was not finite on some rank; see train/guard.py).
        """
        sums: dict[str, torch.Tensor] = {}
        n = 0
        bad = False
        if "raise" in guard.injected_faults(self.step + 1, self.rank):
            raise RuntimeError(f"MICO_TEST_FAULT: rank {self.rank} raises in step {self.step + 1}")
        for micro in range(self.cfg.optim.grad_accum):
            # Faults in the data belong to a batch, not a step: a rollback skips them.
            faults = guard.injected_faults(self.data.step // self.cfg.optim.grad_accum + 1, self.rank)
            # Data workers may be forked here: keep SIGTERM/SIGUSR1 from them, and their seed draw from
            # the trainer's RNG (a resume forks them at another step).
            with shield_children(), rng_preserved():
                raw = next(self.data)
            if self.keys is not None:
                self.keys.write(self.step + 1, micro, raw)
            self.step_keys.append(list(raw["keys"]))
            batch = to_device(raw, self.device, self.bf16)
            if "nan" in faults:
                guard.poison_inputs(batch)
            losses, report = self.engine(batch, step=self.step, micro=micro)
            if "spike" in faults:
                losses = {**losses, "loss": losses["loss"] * 100.0}
            loss = losses["loss"]
            # A NaN backward makes every gradient of the step NaN: the optimizer then skips the step.
            # (x * 1.0 is x exactly; a device-side choice, so nothing waits for the device here.)
            poison = torch.where(self.guard.check_micro(losses), math.nan, 1.0).to(loss.dtype)
            self.engine.backward(loss * poison)
            if self.zero_stage == 0 and self.engine.is_gradient_accumulation_boundary():
                bad = self.guard.step_was_bad() or not self._grads_finite()
                if bad:
                    self._step_without_update()
                else:
                    self.engine.step()
            else:
                self.engine.step()
            for k, v in {**losses, **report}.items():
                sums[k] = sums.get(k, 0) + v.detach().float()
            n += len(batch["keys"])
        applied = self.engine.was_step_applied() and not bad and not self.guard.step_was_bad()
        return {k: v / self.cfg.optim.grad_accum for k, v in sums.items()}, n, applied

    def _grads_finite(self) -> bool:
        """ZeRO-0: the gradients are whole and already averaged over ranks here (every rank agrees)."""
        grads = [p.grad for p in self.engine.module.parameters() if p.grad is not None]
        return all(bool(torch.isfinite(g).all()) for g in grads)

    def _step_without_update(self) -> None:
        """ZeRO-0 with a plain torch optimizer, which would apply a NaN step: let the engine take the
        step as DeepSpeed's own optimizers take an overflowed one (counted in ``skipped_steps``, no
        schedule step), with zeroed gradients and the optimizer's update left out."""
        opt = self.engine.optimizer
        opt.zero_grad(set_to_none=False)
        step, had = opt.step, hasattr(opt, "overflow")
        opt.step, opt.overflow = (lambda *a, **k: None), True
        try:
            self.engine.step()
        finally:
            opt.step = step
            if had:
                opt.overflow = False
            else:
                del opt.overflow

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
            self.step_keys = []
            terms, n, applied = self.train_step()
            self.step += 1
            self.watch.step = self.step
            verdict = self.guard.after_step(self.step, applied)
            if not applied:
                self.log_skipped_step(terms)
            if verdict.rollback:
                self.rollback(verdict.reason)
                if pbar is not None:
                    pbar.n = self.step
                    pbar.refresh()
                continue
            tput.add(n * self.world)
            if pbar is not None:
                pbar.update(1)
                pbar.set_postfix(loss=f"{terms['loss'].item():.3f}")
            if self.should_log():
                rec = {k: mdist.dist_mean(v).item() for k, v in sorted(terms.items())}
                rec.update(step=self.step, lr=self.engine.get_lr()[0], samples_per_s=tput.rate())
                rec.update(self.skip_counts())
                rec.update(self.guard.counters())
                if torch.cuda.is_available():
                    flops_ps = flops_ps or self.flops_per_sample()
                    rec["tflops_per_gpu"] = rec["samples_per_s"] / self.world * flops_ps / 1e12
                    rec["gpu_mem_gb"] = torch.cuda.max_memory_allocated() / 2**30
                self.history.append(rec)
                self.writer.write(rec)
            if self.should_eval():
                best.keep_if_best(self, self.evaluate())
            if mdist.any_rank(self.stop.local(), device=self.device):
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
        best.keep_if_best(self, final)
        test = best.evaluate_test(self)
        self.watch.stop()
        self.write_summary(final, path, test)
        return 0

    def skip_counts(self) -> dict[str, int]:
        """Samples seen and skipped per corpus and reason, summed over every rank (a collective)."""
        total: dict[str, int] = {}
        for counts in mdist.all_gather_object(self.data.skip_counts()):
            for k, v in counts.items():
                total[f"skipped/{k}"] = total.get(f"skipped/{k}", 0) + v
        return dict(sorted(total.items()))

    # ------------------------------------------------------------------ faults (train/guard.py)
    def log_skipped_step(self, terms: dict[str, torch.Tensor]) -> None:
        """A step without an update: its loss terms and every rank's sample keys go to metrics.jsonl."""
        keys = mdist.all_gather_object(self.step_keys)
        vals = {k: float(mdist.dist_mean(v)) for k, v in sorted(terms.items()) if k.endswith("loss")}
        if self.rank == 0:
            log.warning(
                "step %d skipped: not finite on some rank (%s); %d in a row, %d in all",
                self.step, ", ".join(f"{k}={v:.4g}" for k, v in vals.items()),
                self.guard.in_a_row, self.guard.skipped,
            )  # fmt: skip
            rec = {"step": self.step, "event": "skipped_step", "terms": vals, "keys": keys}
            self.writer.write({**rec, **self.guard.counters()})

    def rollback(self, reason: str) -> None:
        """Reload the newest checkpoint and skip the data consumed since it (recorded for resumes)."""
        bad_step, latest = self.step, self.checkpoints.latest()
        if latest is None:
            raise RuntimeError(f"step {bad_step}: {reason}, and there is no checkpoint to roll back to")
        if self.guard.rollbacks >= self.cfg.train.max_rollbacks:
            raise RuntimeError(
                f"step {bad_step}: {reason}, after {self.guard.rollbacks} rollback(s) already "
                f"(train.max_rollbacks={self.cfg.train.max_rollbacks}): stopping"
            )
        consumed = self.data.step
        resumed = self.checkpoints.load("latest", to_dict(self.cfg), False)
        window = consumed - self.data.step
        self.skips.record(resumed.step, window, rolled_back_from=bad_step, reason=reason)
        self.skip_data(window)
        self.step, self.history = resumed.step, resumed.history
        self.guard.rolled_back(self.step)
        self.writer.rewind(self.step, keep_events=True)
        if self.rank == 0:
            log.warning(
                "rolled back from step %d to checkpoint step %d (%s); skipping the %d micro-batch(es) "
                "per rank read since it", bad_step, self.step, reason, window,
            )  # fmt: skip
            self.writer.write({
                "step": self.step, "event": "rollback", "from_step": bad_step, "reason": reason,
                "skipped_micro_batches": window, **self.guard.counters(),
            })  # fmt: skip

    def skip_data(self, micro_batches: int) -> None:
        """Read and drop ``micro_batches`` batches: after a rollback, the window that caused it."""
        if micro_batches and self.rank == 0:
            log.info("data: skipping %d micro-batch(es) per rank (%s)", micro_batches, self.skips.path)
        for _ in range(micro_batches):
            with shield_children(), rng_preserved():
                next(self.data)

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
        self.phase = "evaluation"
        res = run_evaluation(self.engine.module, self.cfg, self.tokenizer, self.device, self.bf16)
        self.phase = ""
        self.engine.train()
        rec = {"step": self.step, **scalars(res), "eval/seconds": time.perf_counter() - t0}
        self.writer.write(rec)
        self.history.append(rec)
        return res

    def save(self) -> Path:
        self.phase = "save"
        meta = {"config": to_dict(self.cfg), "history": self.history[-1000:]}
        path = self.checkpoints.save(self.step, meta)
        self.phase = ""
        return path

    def write_summary(self, final_eval: dict[str, float], ckpt_path: Path, test: dict[str, Any]) -> None:
        if self.rank != 0:
            return
        train_recs = [r for r in self.history if "loss" in r]
        terms = sorted({k for r in train_recs for k in r if k == "loss" or k.endswith("_loss")})

        def avg(recs: list[dict[str, Any]], k: str) -> float:
            vals = [r[k] for r in recs if k in r and math.isfinite(r[k])]  # a skipped step logs NaN
            return float(np.mean(vals)) if vals else float("nan")

        head, tail = train_recs[:3], train_recs[-3:]
        summary = {
            "recipe": self.cfg.name,
            "steps": self.step,
            "world_size": self.world,
            "zero_stage": self.zero_stage,
            "first": {k: avg(head, k) for k in terms},
            "last": {k: avg(tail, k) for k in terms},
            "samples_per_s": avg(train_recs[1:], "samples_per_s"),
            "eval": final_eval,
            "test": test,
            "checkpoint": str(ckpt_path),
            "run_dir": str(self.run_dir),
        }
        (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
        print(format_summary(summary), flush=True)

    def report_failure(self, exc: BaseException) -> None:
        """Log which rank failed where and what it sees of its peers (a dead or silent one is named),
        and post the failure for the other ranks (train/failfast.py)."""
        report = health.failure_report(
            self.ranks, self.rank, self.step, exc, self.notice, self.beats, self.phase
        )
        log.error("%s", report)

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
    test = s.get("test")
    if test:
        from mico_ds.eval.runner import format_results

        lines.append(f"test split (data.test_shards), checkpoint {test['checkpoint']} (step {test['step']}):")
        lines.append(format_results(test))
    lines.append(f"checkpoint: {s['checkpoint']}")
    lines.append(f"run dir: {s['run_dir']}  (metrics.jsonl, summary.json, tb/)")
    return "\n".join(lines)
