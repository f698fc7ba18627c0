"""The best checkpoint by the task's metric (``checkpoint.keep_best``) and the test split at the end.

At every evaluation the figure ``checkpoint.best_metric`` (default: the task's, e.g. ``retrieval/t2k_r1``)
on ``data.val_shards`` is compared with the best so far; a higher one saves a checkpoint at this step
(unless one was just saved) and names it in ``checkpoints/best.json``, which retention never removes
while it names it (a resume reads it again, so a preempted fine-tune keeps its best). When training
ends, ``data.test_shards`` is evaluated once, with the best checkpoint's weights loaded when that is
not the current step's, into ``summary.json``'s ``test`` (docs/finetuning.md, "Best checkpoint and test
split").
"""

from __future__ import annotations

import logging
import time
from typing import Any

from mico_ds import distributed as mdist
from mico_ds import tasks
from mico_ds.checkpoint.layout import read_best, tag_for, write_best

log = logging.getLogger("mico_ds")


def best_metric(cfg: Any) -> str:
    return cfg.checkpoint.best_metric or tasks.get(cfg.task.name).metric


def keep_if_best(trainer: Any, results: dict[str, Any]) -> None:
    """After an evaluation: save and name this step's checkpoint when its metric is the best so far."""
    cfg = trainer.cfg
    if not cfg.checkpoint.keep_best or not results:
        return
    metric = best_metric(cfg)
    value = results.get(metric)
    if value is None:
        raise ValueError(
            f"checkpoint.keep_best: the evaluation gave no {metric!r} (it gave {sorted(results)}); set "
            "checkpoint.best_metric to one of those or add its task to eval.tasks"
        )
    ckpt_dir = trainer.checkpoints.ckpt_dir
    best = read_best(ckpt_dir)
    # rank 0 decides: every rank then saves, or none does
    better = mdist.broadcast_object(best is None or float(value) > float(best["value"]))
    if not better:
        return
    tag = tag_for(trainer.step)
    if trainer.checkpoints.latest() != tag:
        trainer.save()
    if trainer.rank == 0:
        write_best(ckpt_dir, {"tag": tag, "step": trainer.step, "metric": metric, "value": float(value)})
        log.info("best %s = %.4f at step %d: checkpoint %s kept", metric, value, trainer.step, tag)
    mdist.barrier()


def evaluate_test(trainer: Any) -> dict[str, Any]:
    """The test split's figures (``data.test_shards``), from the best checkpoint under keep_best."""
    cfg = trainer.cfg
    if not cfg.data.test_shards or not cfg.eval.tasks:
        return {}
    from mico_ds.distributed.zero_checkpoint import load_engine_checkpoint
    from mico_ds.eval.runner import run_evaluation, scalars

    ckpt_dir = trainer.checkpoints.ckpt_dir
    best = read_best(ckpt_dir) if cfg.checkpoint.keep_best else None
    tag = best["tag"] if best else tag_for(trainer.step)
    if tag != tag_for(trainer.step):
        load_engine_checkpoint(trainer.engine, ckpt_dir, tag)  # the run is over: its state is on disk
    t0 = time.perf_counter()
    trainer.phase = "test evaluation"
    res = run_evaluation(
        trainer.engine.module,
        cfg,
        trainer.tokenizer,
        trainer.device,
        trainer.bf16,
        shards=cfg.data.test_shards,
    )
    trainer.phase = ""
    out = {**scalars(res), "checkpoint": tag, "step": best["step"] if best else trainer.step}
    trainer.writer.write(
        {"step": trainer.step, "event": "test", **{f"test/{k}": v for k, v in scalars(res).items()},
         "test/checkpoint_step": out["step"], "test/seconds": time.perf_counter() - t0}
    )  # fmt: skip
    return out
