"""Retrieval: ranks against brute-force sorting, reranking order, and evaluate_retrieval (1 process and
2 gloo ranks with uneven shares) against a reference that scores every pair directly."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mico_ds.eval.retrieval import (
    evaluate_retrieval,
    positive_matrix,
    positive_ranks,
    recall_at,
    rerank_scores,
    retrieval_metrics,
)
from mico_ds.models.mico import MiCoModel
from tests.helpers.ranks import run_ranks
from tests.helpers.tiny import make_random_batch, make_tiny_config, make_tiny_special


def brute_rank(scores: list[float], positives: set[int]) -> int:
    """Position of the first positive in a descending sort where ties put negatives first."""
    order = sorted(range(len(scores)), key=lambda j: (-scores[j], j in positives))
    return next(i for i, j in enumerate(order) if j in positives)


def test_positive_ranks_equal_brute_force_with_ties_and_several_positives() -> None:
    g = torch.Generator().manual_seed(0)
    sim = torch.randint(0, 6, (40, 30), generator=g).float()  # many ties
    pos = torch.rand(40, 30, generator=g) < 0.1
    pos[torch.arange(40), torch.randint(0, 30, (40,), generator=g)] = True
    got = positive_ranks(sim, pos)
    for q in range(40):
        want = brute_rank(sim[q].tolist(), set(pos[q].nonzero().flatten().tolist()))
        assert int(got[q]) == want


def test_one_to_one_metrics_match_the_classic_definition() -> None:
    g = torch.Generator().manual_seed(1)
    k = torch.nn.functional.normalize(torch.randn(50, 8, generator=g), dim=1)
    t = torch.nn.functional.normalize(k + 0.8 * torch.randn(50, 8, generator=g), dim=1)
    out = retrieval_metrics(k, t)
    sim = k @ t.T
    t2k = (sim.T.argsort(dim=1, descending=True) == torch.arange(50).view(-1, 1)).float().argmax(1)
    k2t = (sim.argsort(dim=1, descending=True) == torch.arange(50).view(-1, 1)).float().argmax(1)
    for name, r in (("t2k", t2k), ("k2t", k2t)):
        for n in (1, 5, 10):
            assert out[f"retrieval/{name}_r{n}"] == pytest.approx((r < n).float().mean().item() * 100)
        assert out[f"retrieval/{name}_medr"] == r.double().median().item() + 1
    assert 0 < out["retrieval/t2k_r1"] < 100


def test_k2t_counts_any_caption_of_the_item() -> None:
    # item 0 has texts 0, 1; item 1 has text 2. Item 0's best text is its second one.
    k = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    t = torch.nn.functional.normalize(torch.tensor([[-1.0, 0.0], [1.0, 0.1], [0.1, 1.0]]), dim=1)
    out = retrieval_metrics(k, t, torch.tensor([0, 0, 1]))
    assert out["retrieval/k2t_r1"] == 100.0
    assert out["retrieval/t2k_r1"] == pytest.approx(200 / 3)  # text 0 points at item 1
    assert out["retrieval/k2t_medr"] == 1.0 and out["retrieval/n_texts"] == 3


def test_rerank_orders_the_top_k_by_matching_then_the_rest_by_similarity() -> None:
    sim = torch.tensor([[0.9, 0.8, 0.7, 0.6, 0.5]])
    top = sim.topk(3, dim=1).indices  # candidates 0, 1, 2
    match = torch.tensor([[-5.0, 3.0, 1.0]])  # matching prefers 1 > 2 > 0
    order = rerank_scores(sim, top, match).argsort(dim=1, descending=True)
    assert order.tolist() == [[1, 2, 0, 3, 4]]
    pos = torch.zeros(1, 5, dtype=torch.bool)
    pos[0, 4] = True  # a positive outside the top-k keeps its contrastive place
    assert int(positive_ranks(rerank_scores(sim, top, match), pos)[0]) == 4
    assert recall_at(torch.tensor([0, 3, 7]), "t2k")["retrieval/t2k_r5"] == pytest.approx(200 / 3)


# ----------------------------------------------------------------------------- with a model


class ListTokenizer:
    """Maps a text "w1 w2 ..." of integers to ids BOS + words + EOS (the tiny vocabulary)."""

    special = make_tiny_special()

    def encode(self, texts: list[str], max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        rows = [[1, *map(int, t.split())][: max_len - 1] + [2] for t in texts]
        n = max(len(r) for r in rows)
        ids = torch.zeros(len(rows), n, dtype=torch.long)
        mask = torch.zeros(len(rows), n, dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r)], mask[i, : len(r)] = torch.tensor(r), 1
        return ids, mask


def _model() -> MiCoModel:
    torch.manual_seed(0)
    return MiCoModel.from_run_config(make_tiny_config(), make_tiny_special()).eval()


def _batches(n_batches: int, seed: int, valid_last: int | None = None) -> list[dict]:
    """Batches of 4 image+audio items, each with 1-3 texts of random word ids."""
    cfg = make_tiny_config()
    out = []
    g = torch.Generator().manual_seed(seed + 100)
    for i in range(n_batches):
        b = make_random_batch(cfg, ["image", "audio"], 4, seed=seed * 10 + i)
        n_texts = torch.randint(1, 4, (4,), generator=g).tolist()
        b["eval_texts"] = [
            [" ".join(str(int(w)) for w in torch.randint(4, 96, (5,), generator=g)) for _ in range(n)]
            for n in n_texts
        ]
        b["valid"] = torch.ones(4, dtype=torch.bool)
        out.append(b)
    if valid_last is not None:
        out[-1]["valid"][valid_last:] = False
    return out


@torch.no_grad()
def reference(
    model: MiCoModel, batches: list[dict], k: int, max_items: int | None = None
) -> dict[str, float]:
    """Every pair scored directly with the public methods, ranks by brute force."""
    tok = ListTokenizer()
    feats, prefixes, texts, owner = [], [], [], []
    for b in batches:
        v, p = model.embed_knowledge(b), model.context_prefix(b)
        for i in b["valid"].nonzero().flatten().tolist():
            for t in b["eval_texts"][i]:
                texts.append(t)
                owner.append(len(feats))
            feats.append(v[i])
            prefixes.append(p[i])
    if max_items is not None:
        feats, prefixes = feats[:max_items], prefixes[:max_items]
        keep = [j for j, o in enumerate(owner) if o < max_items]
        texts, owner = [texts[j] for j in keep], [owner[j] for j in keep]
    ids, mask = tok.encode(texts, 64)
    kf, tf = torch.stack(feats), model.embed_text(ids, mask)
    sim = kf @ tf.T
    out = {}
    for name, s, n_cand in (("t2k", sim.T, len(feats)), ("k2t", sim, len(texts))):
        ranks_c, ranks_r = [], []
        for q in range(s.shape[0]):
            positives = {owner[q]} if name == "t2k" else {j for j, o in enumerate(owner) if o == q}
            scores = s[q].tolist()
            ranks_c.append(brute_rank(scores, positives))
            top = s[q].topk(min(k, n_cand)).indices.tolist()
            big = max(scores) + 1e6
            for c in top:
                item, text = (c, q) if name == "t2k" else (q, c)
                m = model.matching_scores(prefixes[item][None], ids[text : text + 1], mask[text : text + 1])
                scores[c] = big + float(m)
            ranks_r.append(brute_rank(scores, positives))
        out |= recall_at(torch.tensor(ranks_c), name)
        out |= recall_at(torch.tensor(ranks_r), name, "_rerank")
    return out


@pytest.mark.parametrize("max_items", [None, 9])
def test_single_process_equals_direct_pair_scoring(max_items: int | None) -> None:
    model = _model()
    batches = _batches(3, seed=0, valid_last=2)  # 10 valid items, 2 padding
    got = evaluate_retrieval(model, batches, ListTokenizer(), max_items=max_items, rerank_k=4, batch_size=5)
    want = reference(model, batches, 4, max_items)
    n = 10 if max_items is None else max_items
    assert got["retrieval/n"] == n
    for key, v in want.items():
        assert got[key] == pytest.approx(v, abs=1e-9), key
    # reranking changes the figures (the untrained matching head reorders the top-4)
    assert any(got[k] != got[f"{k}_rerank"] for k in got if f"{k}_rerank" in got)
    no_rerank = evaluate_retrieval(model, batches, ListTokenizer(), max_items=max_items, rerank_k=0)
    assert "retrieval/t2k_r1_rerank" not in no_rerank
    assert no_rerank["retrieval/t2k_r1"] == got["retrieval/t2k_r1"]


def _two_rank_worker(rank: int) -> dict[str, float]:
    model = _model()
    all_batches = _batches(3, seed=0, valid_last=2)
    # uneven shares: rank 0 holds batches 0-1 (8 items), rank 1 holds batch 2 (2 valid) + padding
    pad = {**all_batches[2], "valid": torch.zeros(4, dtype=torch.bool)}
    mine = all_batches[:2] if rank == 0 else [all_batches[2], pad]
    return evaluate_retrieval(model, mine, ListTokenizer(), rerank_k=4, batch_size=3)


@pytest.mark.slow
@pytest.mark.distributed
def test_two_ranks_equal_one_process(tmp_path: Path) -> None:
    r0, r1 = run_ranks(_two_rank_worker, 2, tmp_path)
    batches = _batches(3, seed=0, valid_last=2)
    want = evaluate_retrieval(_model(), batches, ListTokenizer(), rerank_k=4, batch_size=7)
    for key, v in want.items():
        assert r0[key] == pytest.approx(v, abs=1e-9), key
        assert r1[key] == r0[key], key


def test_positive_matrix() -> None:
    assert positive_matrix(torch.tensor([0, 0, 1]), 2).tolist() == [
        [True, False],
        [True, False],
        [False, True],
    ]
