"""The sections of what a run is evaluated on and keeps: checkpoints, evaluation, the task."""

from __future__ import annotations

import typing
from dataclasses import dataclass
from typing import Literal

from mico_ds.config.base import Section, _f, _section
from mico_ds.config.scst_section import ScstConfig
from mico_ds.config.task_sections import ClassificationConfig


@dataclass
class CheckpointConfig(Section):
    """Checkpoint retention, verification and the free-space check (docs/operations.md, "Checkpoint
    integrity and a full disk")."""

    keep_last: int = _f(3, "Keep the newest K checkpoints.")
    keep_every: int = _f(0, "Also keep every checkpoint whose step is a multiple of M (0: none).")
    verify: Literal["checksum", "size", "off"] = _f(
        "checksum",
        "What a resume checks of a checkpoint against its manifest (mico_manifest.json): every file's size "
        "and CRC-32 (read once, split over the ranks), sizes only, or nothing. `--resume latest` falls back "
        "to the newest intact checkpoint; a named damaged one is an error.",
    )
    check_free_space: bool = _f(
        True,
        "Before a save, stop the run (nothing written, `latest` kept) when the disk has less free space "
        "than the previous checkpoint took.",
    )
    keep_best: bool = _f(
        False,
        "At every evaluation (train.eval_every), save a checkpoint when the task's metric on data.val_shards "
        "is the best so far and keep it (tag named in checkpoints/best, never removed by keep_last); the "
        "test split (data.test_shards) is then evaluated with the best weights.",
    )
    best_metric: str | None = _f(
        None,
        "The figure checkpoint.keep_best maximizes, as logged (e.g. retrieval/t2k_r1); None: the task's "
        "(retrieval/t2k_r1, captioning/cider, qa/accuracy, classification/top1).",
    )


EvalTask = Literal["retrieval", "captioning", "qa", "grounding", "classification"]
EVAL_TASKS: tuple[str, ...] = typing.get_args(EvalTask)


@dataclass
class EvalConfig(Section):
    """Evaluation on data.val_shards: in training (every train.eval_every steps and at the end) and by
    ``python -m mico_ds.eval`` (MiCo appendix B.3 protocol)."""

    tasks: list[EvalTask] = _f(
        ["retrieval", "captioning", "qa"],
        f"Evaluation tasks, a subset of {list(EVAL_TASKS)} (grounding: does the LLM read the context?).",
    )
    max_samples: int = _f(256, "Held-out items evaluated for retrieval (all of their captions).")
    batch_size: int = _f(32, "Per-rank evaluation batch size (items, texts, or reranked pairs).")
    rerank_k: int = _f(50, "Retrieval: top-k candidates reranked by the matching head (paper: 50; 0: off).")
    rerank_weight: float | None = _f(
        None,
        "Retrieval: weight of the matching log-odds added to the contrastive logit in the rerank "
        "(fused score = scale * sim + w * match); None: chosen on eval.rerank_tune_shards, or 1.0 "
        "(with a warning) when those are not set.",
    )
    rerank_tune_shards: str | None = _f(
        None,
        "Retrieval: held-out shards (brace pattern relative to data.root, like data.val_shards) used only "
        "to choose eval.rerank_weight; must differ from data.val_shards.",
    )
    rerank_tune_samples: int = _f(128, "Retrieval: items of eval.rerank_tune_shards the weight is chosen on.")
    caption_samples: int = _f(64, "Captioning: held-out items captioned.")
    num_beams: int = _f(3, "Beam size for captioning and QA (paper: 3; 1 = greedy).")
    caption_max_tokens: int | None = _f(
        None, "Captioning: most generated tokens (EOS included); None: data.text_max_len - 1."
    )
    length_penalty: float = _f(1.0, "Beam score = sum log-prob / length**length_penalty.")
    qa_samples: int = _f(32, "QA: held-out items whose questions are answered (every question of each).")
    qa_max_tokens: int = _f(8, "QA: most generated answer tokens (EOS included).")
    qa_baseline_shards: str | None = _f(None, "QA: shards (like data.val_shards) whose json 'qa' pairs "
        "give the answer-without-looking baseline (most frequent answer per question type).")  # fmt: skip
    use_cache: bool = _f(True, "Decode with the KV cache (False: recompute the whole sequence each step).")

    def __post_init__(self) -> None:
        super().__post_init__()
        sizes = {
            "max_samples": self.max_samples,
            "batch_size": self.batch_size,
            "caption_samples": self.caption_samples,
            "num_beams": self.num_beams,
            "qa_samples": self.qa_samples,
            "qa_max_tokens": self.qa_max_tokens,
            "rerank_tune_samples": self.rerank_tune_samples,
        }
        if self.caption_max_tokens is not None:
            sizes["caption_max_tokens"] = self.caption_max_tokens
        small = {k: v for k, v in sizes.items() if v < 1}
        if small or self.rerank_k < 0:
            raise ValueError(
                f"eval sizes must be >= 1 (rerank_k >= 0): got {small or {'rerank_k': self.rerank_k}}"
            )
        if self.rerank_weight is not None and not self.rerank_weight >= 0:
            raise ValueError(f"eval.rerank_weight must be >= 0 (or null: tuned), got {self.rerank_weight}")


@dataclass
class TaskConfig(Section):
    """What the run trains (mico_ds/tasks/: one file per task)."""

    name: str = _f(
        "pretrain",
        "A file of mico_ds/tasks/: pretrain (MiCo's objectives on captions), retrieval, captioning, qa, "
        "classification.",
    )
    classification: ClassificationConfig = _section(
        ClassificationConfig, "task.name=classification: the head, the augmentation, the evaluation."
    )
    scst: ScstConfig = _section(
        ScstConfig, "task.name=captioning: self-critical sequence training (docs/captioning.md, SCST)."
    )

    def __post_init__(self) -> None:
        from mico_ds.tasks import names  # module names only: no task is imported here

        if self.name not in names():
            raise ValueError(f"task.name: unknown task {self.name!r}; known: {names()}")
        self.scst.check_task(self.name)
