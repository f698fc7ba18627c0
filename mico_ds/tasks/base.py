"""What a task is: a check of the run's config and, optionally, its own training samples.

A task leaves the trainer, the model and the evaluation as they are. It may

* refuse a config it cannot train (:meth:`Task.check`, called when the training loader is built);
* give the training streams a :class:`SampleTask`, which runs in the data workers: it picks what
  each decoded sample is trained on (or skips the sample with a named reason, counted like any
  other skip) and tokenizes the batch, possibly with ``gen_targets``, the positions the generation
  objective predicts (``mico_ds.data.schema.GEN_TARGETS``).

Without a :class:`SampleTask` (``pretrain``) the streams run exactly as they always have: no extra
random draws, the same batches.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol


class SampleTask(Protocol):
    """The worker side of a task (picklable: it travels to the data workers). ``needs_captions``
    False keeps samples without captions (the task reads its own labels from the json member)."""

    needs_captions: bool

    def prepare(
        self, item: dict[str, Any], sample: dict[str, Any], epoch: int, seed: int, tokenizer: Any
    ) -> None:
        """Add what the sample is trained on to the decoded ``sample`` (raw ``item`` at hand), or
        raise ``SkipSample(reason)``. ``epoch`` and ``seed`` (``train.seed``) seed its choices."""

    def tokenize(self, batch: dict[str, Any], samples: list[dict[str, Any]], tokenizer: Any) -> None:
        """Set ``text_ids`` / ``text_mask`` (and any task keys) of the collated ``batch``."""


@dataclass(frozen=True)
class Task:
    """A training task: its name, what it says it trains, the evaluation figure that ranks its
    checkpoints (``checkpoint.keep_best``; higher is better) and its hooks (module docstring)."""

    name: str
    summary: str
    metric: str = "retrieval/t2k_r1"

    def check(self, cfg: Any) -> None:
        """Raise a ValueError naming the keys when ``cfg`` (a RunConfig) does not fit this task."""

    def check_evaluated(self, cfg: Any) -> None:
        """Raise unless ``eval.tasks`` holds the evaluation that gives this task's metric."""
        task = self.metric.split("/")[0]
        if task not in cfg.eval.tasks:
            raise ValueError(
                f"task.name={self.name} is evaluated by {task}: add it to eval.tasks {cfg.eval.tasks}"
            )

    def sample_task(self, cfg: Any) -> SampleTask | None:
        """The training streams' :class:`SampleTask`; None: the captions as the corpora give them."""
        return None
