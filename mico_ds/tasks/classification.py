"""``task.name: classification``: single-modality perception (MiCo Table 10: image, video or audio
classification), fine-tuned as a linear head on the pooled feature z, the context output the
contrastive branch projects (``mico_ds.models.task_heads.ClassificationHead``).

Shards come from ``tools/make_shards.py --format imagefolder`` or ``--format labels-csv``: each
sample's json carries ``label`` (the class name) and ``label_index`` (its position in the
``classes.json`` written next to the shards); this task trains on ``label_index``. Multi-label rows of
a CSV (json ``labels`` / ``label_indices``) train their first label. Samples need no caption; one
without an integer ``label_index`` is skipped as ``no_label``, one outside ``[0,
task.classification.num_classes)`` as ``label_out_of_range``.

The loss, mixup / CutMix, flips and SpecAugment live in ``mico_ds.objectives.classification``; the
evaluation (top-1 / top-5 on ``data.val_shards``) in ``mico_ds.eval.classification``. Only the head
and the encoder side train: every other objective's weight must be 0, and the text branch never runs.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mico_ds import distributed as mdist
from mico_ds.data import schema
from mico_ds.data.io import expand_urls
from mico_ds.data.read.batch import tokenize_into
from mico_ds.data.read.skips import SkipSample
from mico_ds.objectives.classification import LABELS
from mico_ds.tasks.base import Task

NO_LABEL = "no_label"
LABEL_OUT_OF_RANGE = "label_out_of_range"
CLASS_INDEX = "class_index"  # the decoded sample's class, collated into batch[LABELS]
CLASSES_FILE = "classes.json"  # what make_shards writes next to the shards (data/write/formats/_labels.py)
OBJECTIVE_WEIGHTS = ("contrastive_weight", "matching_weight", "generation_weight")
log = logging.getLogger("mico_ds")


def label_of(meta: Any) -> int | None:
    """A parsed json's ``label_index`` (an int, not a bool); None when there is none."""
    y = meta.get("label_index") if isinstance(meta, dict) else None
    return y if isinstance(y, int) and not isinstance(y, bool) else None


def read_label(item: dict[str, Any]) -> int | None:
    """:func:`label_of` a raw sample's json member (None without one, or when it does not parse)."""
    raw = item.get(schema.JSON_EXT)
    if raw is None:
        return None
    try:
        return label_of(json.loads(raw))
    except ValueError:
        return None


@dataclass
class ClassificationSamples:
    """The worker side of the classification task (:class:`~mico_ds.tasks.base.SampleTask`)."""

    num_classes: int
    max_len: int
    needs_captions: bool = False  # imagefolder / labels-csv samples carry labels, no captions

    def prepare(
        self, item: dict[str, Any], sample: dict[str, Any], epoch: int, seed: int, tokenizer: Any
    ) -> None:
        y = read_label(item)
        if y is None:
            raise SkipSample(
                NO_LABEL, "no integer json 'label_index' (make_shards --format imagefolder | labels-csv)"
            )
        if not 0 <= y < self.num_classes:
            raise SkipSample(
                LABEL_OUT_OF_RANGE,
                f"label_index {y} not in [0, {self.num_classes}) (task.classification.num_classes)",
            )
        sample[CLASS_INDEX] = y

    def tokenize(self, batch: dict[str, Any], samples: list[dict[str, Any]], tokenizer: Any) -> None:
        # The (empty) captions keep the batch per the data contract; the classification forward never
        # reads text.
        tokenize_into(batch, batch[schema.CAPTIONS], tokenizer, self.max_len)
        batch[LABELS] = torch.tensor([s[CLASS_INDEX] for s in samples], dtype=torch.int64)


def class_list(shards: str, root: str | None) -> tuple[Path, list[Any]] | None:
    """The ``classes.json`` next to the first shard of a local shard spec, and its list; None when the
    shards are remote or have none."""
    try:
        urls = expand_urls(shards, root)
    except ValueError:  # no shards there: the loader says so in its own words
        return None
    if not urls or urls[0].startswith(("pipe:", "http://", "https://")):
        return None
    path = Path(urls[0]).parent / CLASSES_FILE
    if not path.is_file():
        return None
    names = json.loads(path.read_text(encoding="utf-8"))
    return (path, names) if isinstance(names, list) else None


class ClassificationTask(Task):
    def check(self, cfg: Any) -> None:
        o, c = cfg.objectives, cfg.task.classification
        on = {f"objectives.{k}": getattr(o, k) for k in OBJECTIVE_WEIGHTS if getattr(o, k)}
        if on:
            raise ValueError(
                "task.name=classification trains the linear head on the pooled feature alone: set "
                + ", ".join(f"{k}=0 (got {v:g})" for k, v in on.items())
            )
        if c.num_classes < 2:
            raise ValueError(
                f"task.name=classification needs task.classification.num_classes >= 2 (got {c.num_classes}): "
                f"the length of the shards' {CLASSES_FILE}"
            )
        self.check_evaluated(cfg)
        active = [k for k in cfg.data.corpora if k.weight > 0 or k.steps]
        joined = [k.name for k in active if k.joined_from]
        if joined:
            raise ValueError(
                "task.name=classification reads each sample's own json label: turn the joined corpora "
                f"{joined} off"
            )
        if cfg.optim.text_lr_scale and mdist.is_main_process():
            log.warning(
                "task.name=classification never runs the text branch: optim.text_lr_scale=0 freezes it "
                "(no gradients or optimizer states for it), got %g", cfg.optim.text_lr_scale
            )  # fmt: skip
        inp = cfg.inputs
        if any("audio" in k.modalities for k in active) and (
            c.spec_freq_mask > inp.mel_bins or c.spec_time_mask > inp.clip_frames
        ):
            raise ValueError(
                f"task.classification.spec_freq_mask={c.spec_freq_mask} / spec_time_mask={c.spec_time_mask} "
                f"must fit the audio clips: inputs.mel_bins={inp.mel_bins}, "
                f"inputs.clip_frames={inp.clip_frames}"
            )
        splits = [(f"data.corpora[{k.name}]", k.shards) for k in active]
        splits += [("data.val_shards", cfg.data.val_shards)] if cfg.data.val_shards else []
        for where, shards in splits:
            found = class_list(shards, cfg.data.root)
            if found is not None and len(found[1]) != c.num_classes:
                raise ValueError(
                    f"task.classification.num_classes={c.num_classes} but {found[0]} ({where}) lists "
                    f"{len(found[1])} classes"
                )

    def sample_task(self, cfg: Any) -> ClassificationSamples:
        return ClassificationSamples(
            num_classes=cfg.task.classification.num_classes, max_len=cfg.data.text_max_len
        )


TASK = ClassificationTask(
    "classification",
    "classification fine-tune: a linear head on the pooled feature; mixup / CutMix, SpecAugment (Table 10)",
    metric="classification/top1",
)
