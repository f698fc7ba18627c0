"""``task.name: captioning``: fine-tune caption generation on a downstream dataset (MiCo appendix B.3,
the captioning rows; docs/captioning.md): the generation objective (Eq. 6) alone, on one of the item's
captions per visit (drawn afresh each epoch); evaluated by beam search against every reference of an
item (``mico_ds.eval.captioning``: CIDEr-D, BLEU-4).

``task.scst.enabled`` adds the second stage of B.3's "MSCOCO(SCST)": self-critical sequence training
(``mico_ds.objectives.scst``), which rewards sampled captions by their CIDEr-D against all of the
item's references. The training batches then carry those references (``references``: the texts the
evaluation scores against, ``eval_extras``' ``eval_texts``) through :class:`CaptionSamples`; without
SCST the streams run as the pretraining ones do (no SampleTask).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from mico_ds.data import schema
from mico_ds.data.io import expand_urls, iter_tar
from mico_ds.data.read.batch import eval_extras, tokenize_into
from mico_ds.data.read.decode import caption_fields
from mico_ds.data.read.skips import SkipSample
from mico_ds.objectives.scst import REFERENCES
from mico_ds.tasks.base import Task


def item_references(item: dict[str, Any], fields: dict[str, str]) -> list[str]:
    """Every reference caption of a raw item whose decoded caption fields are ``fields``: the texts
    the captioning evaluation scores against (``eval_texts``; all captions of a list field)."""
    return eval_extras(item, fields)[schema.EVAL_TEXTS]


def train_references(cfg: Any) -> Iterator[list[str]]:
    """The references of every item of the run's training corpora (a RunConfig), read from the json
    members of their shards in one pass (``task.scst.df=train``). Unreadable shards and items without a
    caption are passed over: the document frequencies count what training can use."""
    for c in [c for c in cfg.data.corpora if c.weight > 0 or c.steps]:
        for url in expand_urls(c.shards, cfg.data.root):
            for item in iter_tar(url, max_member_bytes=cfg.data.limits.json_bytes):
                if "__error__" in item or schema.JSON_EXT not in item:
                    continue
                try:
                    fields = caption_fields(item, None, cfg.data.limits, c.caption_fields)
                except SkipSample:
                    continue
                if fields:
                    yield item_references(item, fields)


@dataclass
class CaptionSamples:
    """The worker side of the captioning task with SCST (:class:`~mico_ds.tasks.base.SampleTask`): the
    sample's text as the corpora give it, plus every reference caption of its item."""

    max_len: int
    needs_captions: bool = True

    def prepare(
        self, item: dict[str, Any], sample: dict[str, Any], epoch: int, seed: int, tokenizer: Any
    ) -> None:
        sample[REFERENCES] = item_references(item, sample["fields"])

    def tokenize(self, batch: dict[str, Any], samples: list[dict[str, Any]], tokenizer: Any) -> None:
        tokenize_into(batch, batch[schema.CAPTIONS], tokenizer, self.max_len)  # as without a task
        batch[REFERENCES] = [s[REFERENCES] for s in samples]


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
        self.check_evaluated(cfg)
        joined = [c.name for c in cfg.data.corpora if c.joined_from and (c.weight > 0 or c.steps)]
        if cfg.task.scst.enabled and joined:
            raise ValueError(
                "task.scst rewards a caption against its own item's references: turn the joined corpora "
                f"{joined} off"
            )

    def sample_task(self, cfg: Any) -> CaptionSamples | None:
        return CaptionSamples(max_len=cfg.data.text_max_len) if cfg.task.scst.enabled else None


TASK = CaptioningTask(
    "captioning",
    "captioning fine-tune: the generation objective (Eq. 6), optionally SCST (task.scst); beam search",
    metric="captioning/cider",
)
