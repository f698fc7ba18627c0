"""``task.name: retrieval``: fine-tune cross-modal retrieval on a downstream dataset's item-caption pairs
(MiCo appendix B.3, the retrieval rows of Table 2-3): the contrastive objective (Eq. 4) and, when its
weight is set, matching with hard negatives (Eq. 5), as VAST fine-tunes retrieval.

The samples are the corpora's own: an item with several captions (COCO's five, MSR-VTT's twenty)
trains one of them per visit, drawn afresh each epoch (``mico_ds.data.read.decode.caption_fields``),
so the captions are all used over the epochs. Evaluation ranks the whole split with every caption
of every item (``mico_ds.eval.retrieval``). The generation objective is off: captioning is its own task.
"""

from __future__ import annotations

from typing import Any

from mico_ds.tasks.base import Task


class RetrievalTask(Task):
    def check(self, cfg: Any) -> None:
        o = cfg.objectives
        if not o.contrastive_weight > 0 or o.generation_weight:
            raise ValueError(
                "task.name=retrieval trains the contrastive objective (and matching, optionally): set "
                f"objectives.contrastive_weight > 0 (got {o.contrastive_weight:g}) and "
                f"objectives.generation_weight=0 (got {o.generation_weight:g})"
            )
        self.check_evaluated(cfg)


TASK = RetrievalTask(
    "retrieval",
    "retrieval fine-tune: contrastive (Eq. 4) + matching (Eq. 5) on the task's item-caption pairs",
    metric="retrieval/t2k_r1",
)
