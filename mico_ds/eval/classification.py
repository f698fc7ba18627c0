"""Top-1 / top-5 accuracy of the classification head on held-out items (``task.name=classification``,
MiCo Table 10).

The evaluation batches (``mico_ds.eval.runner.load_batches``) carry the items' keys, not their
labels: the labels are each sample's json ``label_index``, read once per process from the evaluated
shards' json members (:func:`split_labels`; the media members are passed over unread). An item counts
when it is valid (not padding) and its label lies in ``[0, C)``; the counts are summed over the ranks.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from tqdm import tqdm

from mico_ds import distributed as mdist
from mico_ds.data import schema
from mico_ds.data.io import expand_urls, iter_tar
from mico_ds.objectives.classification import class_logits
from mico_ds.tasks.classification import read_label

log = logging.getLogger("mico_ds")
JSON_ONLY_BYTES = 1 << 20  # members above this are passed over unread (media); a label json is far smaller
_LABELS: dict[tuple[str, ...], dict[str, int]] = {}


def read_labels(urls: Iterable[str]) -> dict[str, int]:
    """Sample key -> json ``label_index`` of every sample of these shards that has one.

    Raises:
        ValueError: a damaged shard, or a key given two different labels.
    """
    out: dict[str, int] = {}
    for url in urls:
        for item in iter_tar(url, max_member_bytes=JSON_ONLY_BYTES):
            if "__error__" in item:
                raise ValueError(f"{url}: {item['__error__']}: {item['__detail__']}")
            y = read_label(item)
            if y is None:
                continue
            key = item["__key__"]
            if out.setdefault(key, y) != y:
                raise ValueError(
                    f"{url}: sample {key!r} has label_index {y}, an earlier shard gave it {out[key]}"
                )
    return out


def split_labels(cfg: Any, shards: str | None = None) -> dict[str, int]:
    """:func:`read_labels` of ``shards`` (default ``data.val_shards``), read once per process."""
    urls = tuple(expand_urls(shards or cfg.data.val_shards, cfg.data.root))
    if urls not in _LABELS:
        _LABELS[urls] = read_labels(urls)
    return _LABELS[urls]


def topk_hits(logits_BC: torch.Tensor, labels_B: torch.Tensor, k: int) -> torch.Tensor:
    """(B,) bool: the label is among the k highest logits (k capped at C)."""
    top = logits_BC.topk(min(k, logits_BC.shape[1]), dim=-1).indices
    return (top == labels_B[:, None]).any(dim=1)


@torch.no_grad()
def evaluate_classification(
    model: Any,
    batches: Iterable[dict[str, Any]],
    labels: Mapping[str, int],
    prefix: str = "classification/",
    progress: bool = False,
) -> dict[str, float]:
    """Classify the valid items of ``batches`` and score them against ``labels`` (key -> class).

    Every rank must pass the same number of batches (ZeRO-3: the same forward passes); items with
    ``valid`` False, or without a label in ``[0, C)``, run but are not counted.

    Returns:
        ``top1``, ``top5`` (percent of the counted items), ``n`` (counted), ``unlabeled`` (valid items
        without a usable label) and ``num_classes``, each under ``prefix``; {} when no rank counted any.
    """
    sums = torch.zeros(4, dtype=torch.float64)  # top-1 hits, top-5 hits, counted, unlabeled
    device: torch.device | str = "cpu"
    num_classes = 0
    for batch in tqdm(list(batches), desc="classification", disable=not progress, leave=False):
        logits_BC = class_logits(model, batch)
        device, num_classes = logits_BC.device, logits_BC.shape[1]
        keys = batch[schema.KEYS]
        y_B = torch.tensor([labels.get(k, -1) for k in keys], dtype=torch.int64)
        valid = batch.get("valid", torch.ones(len(keys), dtype=torch.bool)).cpu()
        ok = valid & (y_B >= 0) & (y_B < num_classes)
        logits_BC = logits_BC.cpu()  # host sync: the counts are read here
        h1, h5 = topk_hits(logits_BC, y_B, 1) & ok, topk_hits(logits_BC, y_B, 5) & ok
        sums += torch.tensor([h1.sum(), h5.sum(), ok.sum(), (valid & ~ok).sum()], dtype=torch.float64)
    total = mdist.all_reduce_sum(sums.to(device)).cpu()
    c = float(mdist.dist_max(torch.tensor([num_classes], device=device)).item())
    if total[2] == 0:
        if mdist.is_main_process():
            log.warning("classification: no held-out item has a json 'label_index' in [0, C); task skipped")
        return {}
    n = float(total[2])
    return {
        f"{prefix}top1": 100.0 * float(total[0]) / n,
        f"{prefix}top5": 100.0 * float(total[1]) / n,
        f"{prefix}n": n,
        f"{prefix}unlabeled": float(total[3]),
        f"{prefix}num_classes": c,
    }
