"""Zero-shot retrieval between knowledge contexts and texts, with matching-head reranking.

Protocol: every candidate is ranked by the contrastive similarity (Eq. 4), then the top-k (paper: 50)
candidates of each query are reranked with the matching head (Eq. 5), the top-k staying above every
other candidate, which keep their contrastive order. MiCo appendix B.3 reranks "through the
Omni-modal Matching Process" without saying how the two scores combine; BLIP sums them. The reranked
order here is the fused score ``scale * sim + w * match`` (``scale``: the model's contrastive inverse
temperature, so ``scale * sim`` is the contrastive logit; ``match``: the matching head's log-odds).
``w`` is given, or chosen from a grid (:data:`RERANK_WEIGHTS`, :func:`choose_rerank_weight`) on a
split that is not the reported one (the runner tunes on ``eval.rerank_tune_shards``); w = 0 is in the
grid and reproduces the contrastive order, so the chosen fusion is never worse than contrastive on
the tuning split. The matching-only order (the logit alone inside the top-k) is reported too.

Items may carry several texts (COCO-style: 5 captions per image): text->knowledge (t2k) has one
positive item per text; knowledge->text (k2t) counts a hit at rank r when ANY of the item's texts is
within the top r. Ranks count ties pessimistically (a negative scoring equal to the best positive is
placed before it). Items carry every modality of their batch: the context fuses them all.

Distributed (:func:`evaluate_retrieval`): each rank encodes its items and their texts; features, the
text-to-item map and the (cheap) text token ids are gathered, every rank computes the same contrastive
ranking; then each rank scores with the matching head the top-k pairs whose ITEM it holds (its items'
context prefixes never leave it), the scores are gathered and every rank builds the same reranking
(and chooses the same weight). Every rank runs the same number of forward passes of each module
(ZeRO-3 gathers parameters collectively): chunks are padded with dummy work.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from mico_ds import distributed as mdist
from mico_ds.data import schema

KS = (1, 5, 10)
# Weights of the matching log-odds tried when the rerank weight is tuned (0: the contrastive order).
RERANK_WEIGHTS = (0.0, 0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0)


# ----------------------------------------------------------------------------- pure metrics


def positive_ranks(sim: torch.Tensor, positive: torch.Tensor) -> torch.Tensor:
    """0-based rank of the best-scoring positive of each query (row), ties counted pessimistically.

    Args:
        sim: (Q, C) scores of every query against every candidate.
        positive: (Q, C) bool, True where the candidate is a positive of the query (>= 1 per row).

    Returns:
        (Q,) int64: the number of negatives scoring >= the query's best positive.
    """
    if sim.shape != positive.shape:
        raise ValueError(f"sim {tuple(sim.shape)} and positive {tuple(positive.shape)} differ")
    if not positive.any(dim=1).all():
        raise ValueError("every query needs at least one positive candidate")
    best = sim.masked_fill(~positive, float("-inf")).amax(dim=1, keepdim=True)
    return ((sim >= best) & ~positive).sum(dim=1)


def recall_at(
    ranks: torch.Tensor, name: str, suffix: str = "", prefix: str = "retrieval/"
) -> dict[str, float]:
    """R@1/5/10 (percent) and median rank (1-based) of 0-based ``ranks``."""
    out = {f"{prefix}{name}_r{k}{suffix}": (ranks < k).double().mean().item() * 100 for k in KS}
    out[f"{prefix}{name}_medr{suffix}"] = ranks.double().median().item() + 1
    return out


def rerank_scores(sim: torch.Tensor, topk: torch.Tensor, match: torch.Tensor) -> torch.Tensor:
    """Scores whose order is: the top-k candidates by matching logit, then the rest by ``sim``.

    Args:
        sim: (Q, C) contrastive similarities.
        topk: (Q, k) candidate indices of each query's top-k.
        match: (Q, k) matching logits of those pairs.
    """
    return fused_scores(sim, topk, match, scale=0.0, weight=1.0)  # the matching logit alone


def fused_scores(
    sim: torch.Tensor, topk: torch.Tensor, match: torch.Tensor, scale: float, weight: float
) -> torch.Tensor:
    """Scores whose order is: the top-k by ``scale * sim + weight * match``, then the rest by ``sim``.

    Args:
        sim: (Q, C) contrastive similarities.
        topk: (Q, k) candidate indices of each query's top-k.
        match: (Q, k) matching log-odds of those pairs.
        scale: the contrastive inverse temperature (``scale * sim`` is the contrastive logit).
        weight: weight of the matching log-odds (0: the contrastive order).
    """
    sim = sim.double()
    fused = float(scale) * sim.gather(1, topk) + float(weight) * match.double()
    # An offset that puts every reranked candidate above every other one, whatever the logits.
    offset = sim.max() - fused.min() + 1.0
    return sim.scatter(1, topk, fused + offset)


RerankInputs = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]  # sim, topk, match, positive


def weight_sweep(
    directions: Sequence[RerankInputs], scale: float, weights: Sequence[float] = RERANK_WEIGHTS
) -> dict[float, tuple[float, float]]:
    """Mean over ``directions`` of the fused R@1 and R@5 (fractions) for every weight.

    Args:
        directions: per direction (t2k, k2t) the (sim (Q, C), topk (Q, k), match (Q, k), positive (Q, C)).
        scale: the contrastive inverse temperature.
        weights: the matching weights to try.
    """
    out = {}
    for w in weights:
        ranks = [positive_ranks(fused_scores(s, t, m, scale, w), p) for s, t, m, p in directions]
        r1 = sum((r < 1).double().mean().item() for r in ranks) / len(ranks)
        r5 = sum((r < 5).double().mean().item() for r in ranks) / len(ranks)
        out[float(w)] = (round(r1, 12), round(r5, 12))  # rounded: equal recalls must tie exactly
    return out


def choose_rerank_weight(
    directions: Sequence[RerankInputs], scale: float, weights: Sequence[float] = RERANK_WEIGHTS
) -> float:
    """The weight maximizing the mean fused R@1 over ``directions``; ties: mean R@5, then the smaller w."""
    if not weights or min(weights) < 0:
        raise ValueError(f"rerank weights must be a non-empty list of values >= 0, got {list(weights)}")
    sweep = weight_sweep(directions, scale, sorted(weights))
    return max(sweep, key=lambda w: (*sweep[w], -w))


def retrieval_metrics(
    k_feats: torch.Tensor,
    t_feats: torch.Tensor,
    item_of_text: torch.Tensor | None = None,
    prefix: str = "retrieval/",
) -> dict[str, float]:
    """Contrastive R@1/5/10 and median rank for t2k and k2t.

    Args:
        k_feats: (Nk, E) L2-normalized knowledge features.
        t_feats: (Nt, E) L2-normalized text features.
        item_of_text: (Nt,) the item each text describes (default: text i describes item i).
    """
    if item_of_text is None:
        if k_feats.shape != t_feats.shape:
            raise ValueError(
                f"feature shapes differ: knowledge {tuple(k_feats.shape)} vs text {tuple(t_feats.shape)}"
            )
        item_of_text = torch.arange(k_feats.shape[0], device=k_feats.device)
    sim = k_feats.float() @ t_feats.float().T  # (Nk, Nt)
    pos = positive_matrix(item_of_text, k_feats.shape[0])  # (Nt, Nk)
    out: dict[str, float] = {f"{prefix}n": float(sim.shape[0]), f"{prefix}n_texts": float(sim.shape[1])}
    out |= recall_at(positive_ranks(sim.T, pos), "t2k", prefix=prefix)
    out |= recall_at(positive_ranks(sim, pos.T), "k2t", prefix=prefix)
    return out


def positive_matrix(item_of_text: torch.Tensor, num_items: int) -> torch.Tensor:
    """(Nt, Nk) bool: text t is a positive of item item_of_text[t]."""
    return item_of_text.view(-1, 1) == torch.arange(num_items, device=item_of_text.device).view(1, -1)


# ----------------------------------------------------------------------------- model side


def encode_items(model: Any, batch: dict[str, Any], with_prefix: bool) -> tuple[torch.Tensor, Any]:
    """One encoder pass -> (v_z (B, E) normalized, LLM prefix (B, P, H) or None).

    ``MiCoModel.embed_knowledge`` and ``context_prefix`` each run the encoder; reranking needs both,
    so this shares one ``encode_context`` (the same computation as those two methods)."""
    z, fused = model.encode_context(batch)
    v = F.normalize(model.proj_z(z).float(), dim=-1)
    if not with_prefix:
        return v, None
    return v, model.prefix_proj(model._select_prefix(fused))


def item_texts(batch: dict[str, Any]) -> list[list[str]]:
    """Every text of each item of a batch (``eval_texts``, else the single ``captions`` entry)."""
    texts = batch.get(schema.EVAL_TEXTS)
    return [list(t) for t in texts] if texts is not None else [[c] for c in batch[schema.CAPTIONS]]


def _chunks(n: int, size: int) -> int:
    return -(-n // size)


def _pad_cols(x: torch.Tensor, width: int, value: int) -> torch.Tensor:
    if x.shape[1] >= width:
        return x
    return F.pad(x, (0, width - x.shape[1]), value=value)


@torch.no_grad()
def evaluate_retrieval(
    model: Any,
    batches: Iterable[dict[str, Any]],
    tokenizer: Any,
    max_items: int | None = None,
    rerank_k: int = 50,
    batch_size: int = 32,
    text_max_len: int = 64,
    progress: bool = False,
    prefix: str = "retrieval/",
    rerank_weight: float | None = 1.0,
    rerank_weights: Sequence[float] = RERANK_WEIGHTS,
) -> dict[str, float]:
    """Retrieval over the valid items of ``batches`` on every rank (see the module docstring).

    Args:
        model: exposes encode_context / proj_z / prefix_proj / embed_text / matching_scores /
            logit_scale (MiCoModel).
        batches: this rank's evaluation batches, the same count on every rank, with ``valid`` (B,) bool
            marking padding items.
        tokenizer: encodes the items' texts (``encode(texts, max_len)``, ``special``).
        max_items: evaluate at most this many items in all (the first ones in rank order).
        rerank_k: candidates reranked by the matching head per query (0: contrastive only).
        batch_size: texts per text-encoder pass and pairs per matching pass.
        text_max_len: token budget of a text (as in training: ``data.text_max_len``).
        rerank_weight: weight w of the matching log-odds in the fused rerank score; None: the weight of
            ``rerank_weights`` that does best on THESE items (:func:`choose_rerank_weight`; meant for
            a tuning split, not for the reported one).
        rerank_weights: the grid searched when ``rerank_weight`` is None.

    Returns:
        ``retrieval/{t2k,k2t}_{r1,r5,r10,medr}`` (contrastive) and, with reranking, the same keys with
        ``_rerank`` (fused) and ``_rerank_match`` (matching logit alone); ``retrieval/n`` items,
        ``retrieval/n_texts``, ``retrieval/rerank_k``, ``retrieval/rerank_weight`` (the w used) and
        ``retrieval/rerank_weight_tuned`` (1.0: chosen here, 0.0: given), ``retrieval/rerank_scale``.
    """
    if rerank_weight is not None and not rerank_weight >= 0:
        raise ValueError(f"rerank_weight must be >= 0 (or None: tuned), got {rerank_weight}")
    from tqdm import tqdm

    rank = mdist.get_rank()
    with_prefix = rerank_k > 0
    feats, prefixes, texts = [], [], []
    dummy_prefix = None
    device = None
    for batch in tqdm(list(batches), desc="retrieval: items", disable=not progress, leave=False):
        v, pre = encode_items(model, batch, with_prefix)
        device = v.device
        valid = batch["valid"].to(v.device) if "valid" in batch else torch.ones(len(v), dtype=torch.bool)
        feats.append(v[valid])
        if with_prefix:
            dummy_prefix = pre[:1] if dummy_prefix is None else dummy_prefix
            prefixes.append(pre[valid])
        texts += [t for t, ok in zip(item_texts(batch), valid.tolist()) if ok]
    if device is None:
        raise ValueError(f"rank {rank} got no evaluation batch")
    k_loc = torch.cat(feats)
    # Keep the first max_items items in rank order: this rank's items start at offsets[rank].
    counts = [int(c) for c in mdist.all_gather_object(len(k_loc))]
    offsets = [sum(counts[:r]) for r in range(len(counts))]
    keep = len(k_loc) if max_items is None else max(0, min(len(k_loc), max_items - offsets[rank]))
    k_loc, texts = k_loc[:keep], texts[:keep]
    first_item = offsets[rank]
    pre_loc = torch.cat(prefixes)[:keep] if with_prefix else None

    # Texts of this rank's items: tokenize, encode in chunks (same chunk count on every rank).
    flat = [t for ts in texts for t in ts]
    owner_item = [first_item + i for i, ts in enumerate(texts) for _ in ts]
    special = tokenizer.special
    if flat:
        ids, mask = tokenizer.encode(flat, text_max_len)
    else:
        ids = torch.tensor([[special.bos_id, special.eos_id]])
        mask = torch.ones_like(ids)
    ids, mask = ids.to(device), mask.to(device)
    n_chunks = int(mdist.dist_max(torch.tensor([_chunks(len(flat), batch_size)], device=device)).item())
    t_parts = []
    for c in tqdm(range(n_chunks), desc="retrieval: texts", disable=not progress, leave=False):
        sl = slice(c * batch_size, (c + 1) * batch_size)
        if sl.start >= len(flat):
            model.embed_text(ids[:1], mask[:1])  # dummy pass: other ranks have more texts
            continue
        t_parts.append(model.embed_text(ids[sl], mask[sl]))
    t_loc = torch.cat(t_parts) if t_parts else k_loc.new_zeros((0, k_loc.shape[1]))

    k_all = mdist.all_gather_variable(k_loc)
    t_all = mdist.all_gather_variable(t_loc)
    item_of_text = mdist.all_gather_variable(torch.tensor(owner_item, dtype=torch.long, device=device))
    if k_all.shape[0] == 0 or t_all.shape[0] == 0:
        raise ValueError("no valid evaluation item on any rank")
    out = retrieval_metrics(k_all, t_all, item_of_text, prefix=prefix)
    if not with_prefix:
        return out

    # ---- rerank the top-k of every query with the matching head
    nk, nt = k_all.shape[0], t_all.shape[0]
    sim = k_all.float() @ t_all.float().T  # (Nk, Nt)
    width = int(mdist.dist_max(torch.tensor([ids.shape[1]], device=device)).item())
    if not flat:
        ids, mask = ids[:0], mask[:0]
    ids_all = mdist.all_gather_variable(_pad_cols(ids, width, special.pad_id))
    mask_all = mdist.all_gather_variable(_pad_cols(mask, width, 0))
    k_t2k, k_k2t = min(rerank_k, nk), min(rerank_k, nt)
    top_t2k = sim.T.topk(k_t2k, dim=1).indices  # (Nt, k) items for each text
    top_k2t = sim.topk(k_k2t, dim=1).indices  # (Nk, k) texts for each item
    mine = slice(first_item, first_item + keep)
    # Pairs (item, text) this rank scores: t2k pairs whose candidate item it holds, k2t pairs of its
    # own query items. Row layout: (local item, global text, kind 0/1, query, slot).
    q_t2k, s_t2k = ((top_t2k >= mine.start) & (top_t2k < mine.stop)).nonzero(as_tuple=True)
    items_t2k = top_t2k[q_t2k, s_t2k] - first_item
    q_k2t = torch.arange(mine.start, mine.stop, device=device).repeat_interleave(k_k2t)
    s_k2t = torch.arange(k_k2t, device=device).repeat(keep)
    texts_k2t = top_k2t[q_k2t, s_k2t] if keep else q_k2t
    pair_item = torch.cat([items_t2k, q_k2t - first_item])
    pair_text = torch.cat([q_t2k, texts_k2t])
    n_pairs = len(pair_item)
    n_chunks = int(mdist.dist_max(torch.tensor([_chunks(n_pairs, batch_size)], device=device)).item())
    scores = []
    for c in tqdm(range(n_chunks), desc="retrieval: rerank", disable=not progress, leave=False):
        sl = slice(c * batch_size, (c + 1) * batch_size)
        if sl.start >= n_pairs:
            model.matching_scores(dummy_prefix, ids_all[:1], mask_all[:1])  # dummy pass
            continue
        ti = pair_text[sl]
        scores.append(model.matching_scores(pre_loc[pair_item[sl]], ids_all[ti], mask_all[ti]).float())
    local = torch.cat(scores) if scores else sim.new_zeros(0)
    kind = torch.cat([torch.zeros_like(q_t2k), torch.ones_like(q_k2t)])
    query = torch.cat([q_t2k, q_k2t])
    slot = torch.cat([s_t2k, s_k2t])
    rows = mdist.all_gather_variable(torch.stack([kind, query, slot], dim=1))
    vals = mdist.all_gather_variable(local)
    m_t2k = torch.full((nt, k_t2k), float("nan"), device=device)
    m_k2t = torch.full((nk, k_k2t), float("nan"), device=device)
    sel = rows[:, 0] == 0
    m_t2k[rows[sel, 1], rows[sel, 2]] = vals[sel]
    m_k2t[rows[~sel, 1], rows[~sel, 2]] = vals[~sel]
    assert not m_t2k.isnan().any() and not m_k2t.isnan().any(), "a reranked pair was scored by no rank"
    pos = positive_matrix(item_of_text, nk)
    directions = {"t2k": (sim.T, top_t2k, m_t2k, pos), "k2t": (sim, top_k2t, m_k2t, pos.T)}
    scale = float(model.logit_scale())  # every rank: a module forward (ZeRO-3 gathers collectively)
    tuned = rerank_weight is None
    w = choose_rerank_weight(list(directions.values()), scale, rerank_weights) if tuned else rerank_weight
    for name, (s, top, m, p) in directions.items():
        out |= recall_at(positive_ranks(fused_scores(s, top, m, scale, w), p), name, "_rerank", prefix)
        out |= recall_at(positive_ranks(rerank_scores(s, top, m), p), name, "_rerank_match", prefix)
    out[f"{prefix}rerank_k"] = float(rerank_k)
    out[f"{prefix}rerank_weight"] = float(w)
    out[f"{prefix}rerank_weight_tuned"] = float(tuned)
    out[f"{prefix}rerank_scale"] = scale
    return out
