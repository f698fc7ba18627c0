"""``task.name: captioning``: fine-tune caption generation on a downstream dataset (MiCo appendix B.3,
the captioning rows): the generation objective (Eq. 6) alone, on one of the item's captions per visit
(drawn afresh each epoch); evaluated by beam search against every reference of an item
(``mico_ds.eval.captioning``: CIDEr-D, BLEU-4).
"""

from __future__ import annotations

from typing import Any

from mico_ds.tasks.base import Task


class CaptioningTask(Task):
    def check(self, cfg: Any) -> None:
        o = cfg.objectives
        if o.contrastive_weight or o.matching_weight or not o.generation_weight > 0:
            raise ValueError(
                "task.name=captioning trains the generation objective only: set "
                f"objectives.contrastive_weight=0 and objectives.matching_weight=0 (got "
                f"{o.contrastive_weight:g}, {o.matching_weight:g}) and objectives.generation_weight > 0 "
                f"(got {o.generation_weight:g})"
            )
        if "captioning" not in cfg.eval.tasks:
            raise ValueError(
                f"task.name=captioning is evaluated by captioning: add it to eval.tasks {cfg.eval.tasks}"
            )


TASK = CaptioningTask(
    "captioning",
    "captioning fine-tune: the generation objective (Eq. 6); beam search at evaluation",
    metric="captioning/cider",
)
