"""Omni-modal matching with hard negatives (MiCo Eq. 5), ALBEF-style mining over the global batch.

For each local context ``k`` negative texts, and for each local text ``k`` negative contexts
(``objectives.matching_negatives``; the paper: 1), are drawn without replacement from the softmax of
the GLOBAL similarities (local rows vs all-gathered columns, no gradient through the sampling) with
the positive excluded, and with ``objectives.matching_dedup`` every candidate that shares the
positive's caption or source group, so negatives may live on another rank but are never a duplicate
of the positive. The matching head scores b(1 + 2k) pairs per rank: b positives, then the b*k
context-with-negative-text pairs (query-major), then the b*k text-with-negative-context pairs.

Two losses (``objectives.matching_form``): "pointwise", the mean binary cross-entropy over the pairs
(Eq. 5), and "listwise", per query the softmax cross-entropy of its positive among the 1 + k
candidates, both directions averaged: the task a top-k rerank asks of the head. All ranks hold the
same b, so the rank-averaged gradient (DeepSpeed) is the gradient of the global mean (up to negatives
left out as invalid when a query has fewer than k allowed candidates).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mico_ds.distributed import all_gather_no_grad, dist_max
from mico_ds.objectives.contrastive import resolve_impl


@torch.no_grad()
def sample_hard_negatives(
    q_local: torch.Tensor,
    k_global: torch.Tensor,
    logit_scale: torch.Tensor | float,
    positive_idx: torch.Tensor,
    generator: torch.Generator | None = None,
    num: int = 1,
    q_groups: torch.Tensor | None = None,
    k_groups: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw ``num`` hard negatives per query, without replacement, from softmax(scale * q @ k^T) over
    the allowed candidates: never the positive, and with groups never a candidate sharing a group id
    with the query (a duplicate caption, another clip of the same video).

    Args:
        q_local: (b, E) queries of this rank.
        k_global: (n, E) candidate keys (all ranks), n >= num + 1.
        logit_scale: inverse temperature of the sampling softmax.
        positive_idx: (b,) global index of each query's positive (never drawn).
        generator: a torch.Generator on the queries' device (reproducible draws).
        num: negatives per query.
        q_groups, k_groups: (b, G) and (n, G) int64 group ids, or None.

    Returns:
        (idx, valid): (b, num) int64 global indices into ``k_global``, and (b, num) bool, False where
        a query had fewer than ``num`` allowed candidates and a banned one (never its positive) fills
        the slot; such pairs must not count in a loss.
    """
    if k_global.shape[0] < num + 1:
        raise ValueError(
            f"hard-negative mining needs at least {num + 1} candidates in the global batch, got "
            f"{k_global.shape[0]} (raise the batch size, lower objectives.matching_negatives or set "
            "objectives.matching_weight=0)"
        )
    scale = torch.as_tensor(logit_scale, device=q_local.device).detach().float()  # no host sync
    sim = scale * (q_local.float() @ k_global.float().T)  # (b, n)
    rows = torch.arange(q_local.shape[0], device=sim.device)
    allowed = torch.ones_like(sim, dtype=torch.bool)
    if q_groups is not None and k_groups is not None:
        allowed = ~(q_groups[:, None, :] == k_groups[None, :, :]).any(-1)
    allowed[rows, positive_idx] = False
    sim = sim.masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(sim, dim=1).nan_to_num_(0.0)  # a row with nothing allowed: all zeros
    # Rows short of allowed candidates: a negligible weight on their banned ones (never the positive),
    # so the draw fills every slot; unchanged elsewhere (no host sync).
    short = allowed.sum(1) < num
    filler = torch.full_like(probs, 1e-12)
    filler[rows, positive_idx] = 0.0
    probs = torch.where(short[:, None] & ~allowed, filler, probs)
    idx = torch.multinomial(probs, num, replacement=False, generator=generator)
    return idx, allowed.gather(1, idx)


def mine_hard_negatives(
    q_local: torch.Tensor,
    k_global: torch.Tensor,
    logit_scale: torch.Tensor,
    positive_idx: torch.Tensor,
    generator: torch.Generator,
    impl: str = "naive",
    tile: int = 1024,
    num: int = 1,
    q_groups: torch.Tensor | None = None,
    k_groups: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Hard negatives by the objectives' implementation (:func:`resolve_impl`): the softmax of the full
    similarities ("naive"), or Gumbel-top-k over column tiles (the same law, O(b x tile) memory:
    ``mico_ds.kernels.contrastive.sample_hard_negatives_tiled``). Returns (idx, valid), (b, num) each."""
    args = (q_local, k_global, logit_scale, positive_idx, generator)
    if resolve_impl(impl, q_local.device) == "naive":
        return sample_hard_negatives(*args, num=num, q_groups=q_groups, k_groups=k_groups)
    from mico_ds.kernels.contrastive import sample_hard_negatives_tiled

    return sample_hard_negatives_tiled(*args, tile=tile, num=num, q_groups=q_groups, k_groups=k_groups)


@torch.no_grad()
def caption_hash(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B,) int64 id of each caption's token sequence, independent of how far it is padded: equal
    captions (after tokenization and truncation) share it; distinct ones collide with negligible
    probability (a random position-weighted sum modulo 2**64)."""
    pos = torch.arange(1, ids.shape[1] + 1, device=ids.device, dtype=torch.int64)
    weights = pos * -7046029254386353131 + 0x2545F4914F6CDD1D  # odd multiplier: distinct per position
    return ((ids.to(torch.int64) + 1) * mask.to(torch.int64) * weights).sum(1)  # int64 wraps: modulo 2**64


@torch.no_grad()
def gather_texts(
    text_ids: torch.Tensor, text_mask: torch.Tensor, pad_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """All-gather (no grad) token ids and masks whose length may differ across ranks.

    Pads to the global maximum length first (one scalar all-reduce; its ``.item()`` is a host sync).

    Returns:
        (ids_local, mask_local, ids_all, mask_all): local tensors padded to the global length L_g,
        and the (world*b, L_g) gathered ones.
    """
    length = torch.tensor([text_ids.shape[1]], device=text_ids.device)
    lg = int(dist_max(length).item())  # host sync
    pad = lg - text_ids.shape[1]
    if pad:
        text_ids = F.pad(text_ids, (0, pad), value=pad_id)
        text_mask = F.pad(text_mask, (0, pad), value=0)
    return text_ids, text_mask, all_gather_no_grad(text_ids), all_gather_no_grad(text_mask)


def matching_labels(b: int, device: torch.device | str, num: int = 1) -> torch.Tensor:
    """Labels of the b(1 + 2 num) pairs in the order the model scores them: b positives, then negatives."""
    return torch.cat([torch.ones(b, device=device), torch.zeros(2 * b * num, device=device)])


def split_pairs(logits: torch.Tensor, b: int, num: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(positives (b,), context->negative texts (b, num), text->negative contexts (b, num))."""
    return logits[:b], logits[b : b + b * num].view(b, num), logits[b + b * num :].view(b, num)


def matching_loss(
    logits: torch.Tensor, labels: torch.Tensor, valid: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean binary cross-entropy over the scored pairs (MiCo Eq. 5); ``valid`` (same shape, bool)
    leaves out negatives that filled a slot without being allowed."""
    dtype = torch.promote_types(logits.dtype, torch.float32)
    if valid is None:
        return F.binary_cross_entropy_with_logits(logits.to(dtype), labels.to(dtype))
    w = valid.to(dtype)
    per = F.binary_cross_entropy_with_logits(logits.to(dtype), labels.to(dtype), reduction="none")
    return (per * w).sum() / w.sum().clamp_min(1.0)


def listwise_matching_loss(logits: torch.Tensor, b: int, num: int, valid: torch.Tensor) -> torch.Tensor:
    """Per query, the cross-entropy of its positive among itself and its ``num`` negatives, for
    contexts (against negative texts) and texts (against negative contexts), averaged.

    Args:
        logits: (b(1 + 2 num),) matching logits in :func:`matching_labels` order.
        valid: (2 b num,) bool per negative pair, same order (False: left out of its list).
    """
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    pos, neg_t, neg_z = split_pairs(logits, b, num)
    ok_t, ok_z = valid.view(2, b, num)
    terms = []
    for neg, ok in ((neg_t, ok_t), (neg_z, ok_z)):
        cands = torch.cat([pos[:, None], neg.masked_fill(~ok, float("-inf"))], dim=1)  # (b, 1 + num)
        terms.append(F.cross_entropy(cands, torch.zeros(b, dtype=torch.long, device=logits.device)))
    return (terms[0] + terms[1]) / 2


@torch.no_grad()
def matching_metrics(logits: torch.Tensor, b: int, num: int, valid: torch.Tensor) -> dict[str, torch.Tensor]:
    """Balanced figures of the matching head (logged): accuracy on positives (logit > 0) and on valid
    negatives (logit <= 0) separately, their mean, and how often a positive outscores every valid
    negative of its list (both directions; what reranking needs). Chance: 0.5 balanced."""
    pos, neg_t, neg_z = split_pairs(logits.float(), b, num)
    ok = valid.view(2, b, num)
    neg = torch.stack([neg_t, neg_z])
    pos_acc = (pos > 0).float().mean()
    neg_acc = ((neg <= 0) & ok).float().sum() / ok.float().sum().clamp_min(1.0)
    beats = ((pos[None, :, None] > neg) | ~ok).all(-1).float().mean()
    return {
        "matching_pos_acc": pos_acc,
        "matching_neg_acc": neg_acc,
        "matching_balanced_acc": (pos_acc + neg_acc) / 2,
        "matching_top1": beats,
    }
