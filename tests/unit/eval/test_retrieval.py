"""Retrieval: ranks against brute-force sorting, reranking orders (matching only, fused with the
contrastive logit) and the weight choice against direct computations, and evaluate_retrieval (1 process
and 2 gloo ranks with uneven shares) against a reference that scores every pair directly."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mico_ds.eval.retrieval import (
    RERANK_WEIGHTS,
    choose_rerank_weight,
    evaluate_retrieval,
    fused_scores,
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


def brute_fused_rank(
    sim: list[float], top: list[int], match: list[float], positives: set[int], scale: float, w: float
) -> int:
    """Sort every candidate by (in the top-k, its score): the fused score inside the top-k, the
    similarity outside; ties put negatives first (as positive_ranks)."""
    fused = {c: scale * sim[c] + w * m for c, m in zip(top, match)}
    key = {c: (1, fused[c]) if c in fused else (0, sim[c]) for c in range(len(sim))}
    order = sorted(range(len(sim)), key=lambda c: (-key[c][0], -key[c][1], c in positives))
    return next(i for i, c in enumerate(order) if c in positives)


def _rerank_case(seed: int, q: int = 30, c: int = 25, k: int = 6, ties: bool = False) -> tuple:
    g = torch.Generator().manual_seed(seed)
    sim = torch.randint(0, 8, (q, c), generator=g) / 8 if ties else torch.rand(q, c, generator=g) * 2 - 1
    pos = torch.rand(q, c, generator=g) < 0.08
    pos[torch.arange(q), torch.randint(0, c, (q,), generator=g)] = True
    top = sim.topk(k, dim=1).indices
    match = torch.randint(-3, 4, (q, k), generator=g).float() if ties else torch.randn(q, k, generator=g) * 3
    return sim, top, match, pos


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("w", [0.0, 0.5, 4.0])
def test_fused_rerank_equals_brute_force_sorting_of_every_fused_score(ties: bool, w: float) -> None:
    sim, top, match, pos = _rerank_case(2, ties=ties)
    scale = 8.0 if ties else 14.3  # with ties: exact binary fractions, fused ties stay ties
    got = positive_ranks(fused_scores(sim, top, match, scale, w), pos)
    for q in range(sim.shape[0]):
        want = brute_fused_rank(
            sim[q].tolist(),
            top[q].tolist(),
            match[q].tolist(),
            set(pos[q].nonzero().flatten().tolist()),
            scale,
            w,
        )
        assert int(got[q]) == want, q


def test_fused_order_keeps_the_top_k_above_the_rest_and_mixes_both_scores() -> None:
    sim = torch.tensor([[0.9, 0.8, 0.7, 0.6, 0.5]])
    top = sim.topk(3, dim=1).indices
    match = torch.tensor([[-5.0, 3.0, 1.0]])
    order = lambda w: fused_scores(sim, top, match, 10.0, w).argsort(dim=1, descending=True).tolist()  # noqa: E731
    assert order(0.0) == [[0, 1, 2, 3, 4]]  # contrastive
    assert order(0.25) == [[1, 0, 2, 3, 4]]  # fused 7.75, 8.75, 7.25: neither order alone
    assert order(100.0) == [[1, 2, 0, 3, 4]]  # matching dominates: the matching-only order
    assert order(100.0) == rerank_scores(sim, top, match).argsort(dim=1, descending=True).tolist()


def test_weight_zero_gives_the_contrastive_ranks() -> None:
    sim, top, match, pos = _rerank_case(3)
    assert torch.equal(
        positive_ranks(fused_scores(sim, top, match, 20.0, 0.0), pos), positive_ranks(sim, pos)
    )


def test_weight_choice_equals_a_direct_loop_over_the_grid() -> None:
    for seed in range(6):
        a, b = _rerank_case(10 + seed, k=8), _rerank_case(20 + seed, q=25, c=30, k=8)
        scale = 5.0
        best, best_key = None, None
        for w in RERANK_WEIGHTS:
            r1, r5 = [], []
            for sim, top, match, pos in (a, b):
                ranks = [
                    brute_fused_rank(
                        sim[q].tolist(),
                        top[q].tolist(),
                        match[q].tolist(),
                        set(pos[q].nonzero().flatten().tolist()),
                        scale,
                        w,
                    )  # fmt: skip
                    for q in range(sim.shape[0])
                ]
                r1.append(sum(r < 1 for r in ranks) / len(ranks))
                r5.append(sum(r < 5 for r in ranks) / len(ranks))
            key = (round(sum(r1) / 2, 12), round(sum(r5) / 2, 12))
            if best_key is None or key > best_key:  # strictly better: ties keep the smaller w
                best, best_key = w, key
        assert choose_rerank_weight([a, b], scale) == best, seed
        # the grid's order does not matter; a one-weight grid returns that weight
        assert choose_rerank_weight([a, b], scale, list(reversed(RERANK_WEIGHTS))) == best
        assert choose_rerank_weight([a, b], scale, [3.0]) == 3.0


def test_weight_choice_breaks_ties_by_r5_then_the_smaller_weight() -> None:
    # one query, positive = candidate 2 (sim 0.7): top-3 = 0, 1, 2
    sim = torch.tensor([[0.9, 0.8, 0.7, 0.6]])
    top = sim.topk(3, dim=1).indices
    pos = torch.tensor([[False, False, True, False]])
    never = torch.tensor([[0.0, 0.0, -9.0]])  # matching never helps: every w ties -> w = 0
    assert choose_rerank_weight([(sim, top, never, pos)], 1.0) == 0.0
    lifts = torch.tensor([[0.0, 0.0, 9.0]])  # enough weight lifts the positive to rank 0
    w = choose_rerank_weight([(sim, top, lifts, pos)], 1.0)
    assert w == min(x for x in RERANK_WEIGHTS if 1.0 * 0.7 + x * 9.0 > 0.9)
    with pytest.raises(ValueError, match=">= 0"):
        choose_rerank_weight([(sim, top, lifts, pos)], 1.0, [-1.0, 1.0])


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
    model: MiCoModel, batches: list[dict], k: int, max_items: int | None = None, weights: tuple = (1.0,)
) -> tuple[dict[str, float], dict[float, dict[str, float]]]:
    """Every pair scored directly with the public methods, ranks by brute force: the contrastive and
    matching-only (``_rerank_match``) figures, and for each weight the fused (``_rerank``) ones."""
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
    scale = float(model.logit_scale())
    out: dict[str, float] = {}
    fused: dict[float, dict[str, float]] = {w: {} for w in weights}
    for name, s, n_cand in (("t2k", sim.T, len(feats)), ("k2t", sim, len(texts))):
        ranks_c, ranks_m, ranks_f = [], [], {w: [] for w in weights}
        for q in range(s.shape[0]):
            positives = {owner[q]} if name == "t2k" else {j for j, o in enumerate(owner) if o == q}
            scores = s[q].tolist()
            ranks_c.append(brute_rank(scores, positives))
            top = s[q].topk(min(k, n_cand)).indices.tolist()
            match = []
            for c in top:
                item, text = (c, q) if name == "t2k" else (q, c)
                m = model.matching_scores(prefixes[item][None], ids[text : text + 1], mask[text : text + 1])
                match.append(float(m))
            big = max(scores) + 1e6
            ranks_m.append(
                brute_rank(
                    [big + match[top.index(c)] if c in top else x for c, x in enumerate(scores)], positives
                )
            )
            for w in weights:
                ranks_f[w].append(brute_fused_rank(scores, top, match, positives, scale, w))
        out |= recall_at(torch.tensor(ranks_c), name)
        out |= recall_at(torch.tensor(ranks_m), name, "_rerank_match")
        for w in weights:
            fused[w] |= recall_at(torch.tensor(ranks_f[w]), name, "_rerank")
    return out, fused


@pytest.mark.parametrize("max_items", [None, 9])
def test_single_process_equals_direct_pair_scoring(max_items: int | None) -> None:
    model = _model()
    batches = _batches(3, seed=0, valid_last=2)  # 10 valid items, 2 padding
    got = evaluate_retrieval(model, batches, ListTokenizer(), max_items=max_items, rerank_k=4, batch_size=5)
    want, fused = reference(model, batches, 4, max_items, RERANK_WEIGHTS)
    n = 10 if max_items is None else max_items
    assert got["retrieval/n"] == n
    assert got["retrieval/rerank_weight"] == 1.0 and got["retrieval/rerank_weight_tuned"] == 0.0
    assert got["retrieval/rerank_scale"] == pytest.approx(float(model.logit_scale().detach()))
    for key, v in (want | fused[1.0]).items():
        assert got[key] == pytest.approx(v, abs=1e-9), key
    # the matching-only rerank changes the figures (the untrained matching head reorders the top-4)
    assert any(got[k] != got[f"{k}_rerank_match"] for k in got if f"{k}_rerank_match" in got)
    no_rerank = evaluate_retrieval(model, batches, ListTokenizer(), max_items=max_items, rerank_k=0)
    assert "retrieval/t2k_r1_rerank" not in no_rerank and "retrieval/rerank_weight" not in no_rerank
    assert no_rerank["retrieval/t2k_r1"] == got["retrieval/t2k_r1"]

    # tuned on these items: the weight a direct search over the grid picks, and its figures
    tuned = evaluate_retrieval(
        model, batches, ListTokenizer(), max_items=max_items, rerank_k=4, batch_size=5, rerank_weight=None
    )

    def key(w: float) -> tuple:
        f = fused[w]
        mean = lambda r: round((f[f"retrieval/t2k_{r}_rerank"] + f[f"retrieval/k2t_{r}_rerank"]) / 200, 12)  # noqa: E731
        return mean("r1"), mean("r5"), -w

    best = max(RERANK_WEIGHTS, key=key)
    assert tuned["retrieval/rerank_weight"] == best and tuned["retrieval/rerank_weight_tuned"] == 1.0
    for k, v in (want | fused[best]).items():
        assert tuned[k] == pytest.approx(v, abs=1e-9), k
    # w = 0 is in the grid: on the tuning items the fusion never loses to the contrastive order
    assert key(best)[0] >= round((want["retrieval/t2k_r1"] + want["retrieval/k2t_r1"]) / 200, 12)
    zero = evaluate_retrieval(
        model, batches, ListTokenizer(), max_items=max_items, rerank_k=4, rerank_weight=0.0
    )
    for d in ("t2k", "k2t"):
        for r in ("r1", "r5", "r10", "medr"):
            assert zero[f"retrieval/{d}_{r}_rerank"] == zero[f"retrieval/{d}_{r}"]


def _two_rank_worker(rank: int) -> dict[str, float]:
    model = _model()
    all_batches = _batches(3, seed=0, valid_last=2)
    # uneven shares: rank 0 holds batches 0-1 (8 items), rank 1 holds batch 2 (2 valid) + padding
    pad = {**all_batches[2], "valid": torch.zeros(4, dtype=torch.bool)}
    mine = all_batches[:2] if rank == 0 else [all_batches[2], pad]
    return evaluate_retrieval(model, mine, ListTokenizer(), rerank_k=4, batch_size=3, rerank_weight=None)


@pytest.mark.slow
@pytest.mark.distributed
def test_two_ranks_equal_one_process(tmp_path: Path) -> None:
    r0, r1 = run_ranks(_two_rank_worker, 2, tmp_path)
    batches = _batches(3, seed=0, valid_last=2)
    want = evaluate_retrieval(
        _model(), batches, ListTokenizer(), rerank_k=4, batch_size=7, rerank_weight=None
    )
    for key, v in want.items():
        assert r0[key] == pytest.approx(v, abs=1e-9), key
        assert r1[key] == r0[key], key


def test_positive_matrix() -> None:
    assert positive_matrix(torch.tensor([0, 0, 1]), 2).tolist() == [
        [True, False],
        [True, False],
        [False, True],
    ]


# ----------------------------------------------------------------------------- the runner's weight choice


def _runner_case(monkeypatch: pytest.MonkeyPatch, **eval_overrides) -> tuple:
    """run_evaluation on fake loaders: 10 val items (3 batches), 8 tune items (2 batches)."""
    from mico_ds.eval import runner

    val, tune = _batches(3, seed=0, valid_last=2), _batches(2, seed=5)
    calls = []

    def fake_load(cfg, device, bf16, n, modalities=None, shards=None, **kw):  # noqa: ANN001, ANN003, ANN202
        calls.append(shards)
        return tune if shards == "tune-*.tar" else val

    monkeypatch.setattr(runner, "load_batches", fake_load)
    monkeypatch.setattr(runner, "_warned", set())
    cfg = make_tiny_config()
    cfg.data.val_shards = "val-*.tar"
    for k, v in {
        "max_samples": 10,
        "rerank_k": 4,
        "batch_size": 5,
        "rerank_tune_samples": 8,
        **eval_overrides,
    }.items():
        setattr(cfg.eval, k, v)
    model = _model()
    res = runner.run_evaluation(model, cfg, ListTokenizer(), "cpu", tasks=["retrieval"])
    direct = dict(rerank_k=4, batch_size=5, text_max_len=cfg.data.text_max_len)
    return res, calls, model, val, tune, direct


def test_runner_chooses_the_weight_on_the_tune_split_and_reports_val_with_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from mico_ds.eval.runner import format_results

    res, calls, model, val, tune, direct = _runner_case(monkeypatch, rerank_tune_shards="tune-*.tar")
    assert calls == [None, "tune-*.tar"]  # val (the run's shards), then the tune split
    on_tune = evaluate_retrieval(model, tune, ListTokenizer(), max_items=8, rerank_weight=None, **direct)
    w = on_tune["retrieval/rerank_weight"]
    on_val = evaluate_retrieval(model, val, ListTokenizer(), max_items=10, rerank_weight=w, **direct)
    assert res["retrieval/rerank_weight"] == w and res["retrieval/rerank_weight_tuned"] == 1.0
    for k, v in on_val.items():
        if k != "retrieval/rerank_weight_tuned":
            assert res[k] == v, k
    assert res["retrieval/tune_n"] == 8
    for d in ("t2k", "k2t"):
        for suffix in ("", "_rerank", "_rerank_match"):
            assert res[f"retrieval/tune_{d}_r1{suffix}"] == on_tune[f"retrieval/{d}_r1{suffix}"]
    table = format_results(res)
    assert f"rerank top-4 fused (w={w:g}, tuned on 8 items)" in table
    assert table.count("rerank top-4 matching only") == 2
    assert "text->knowledge contrastive" in table and "knowledge->text contrastive" in table
    assert "tuning split R@1" in table


def test_runner_uses_a_given_weight_or_one_with_a_warning(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from mico_ds.eval.runner import format_results

    res, calls, *_ = _runner_case(monkeypatch, rerank_tune_shards="tune-*.tar", rerank_weight=0.5)
    assert calls == [None]  # a given weight loads no tune split
    assert res["retrieval/rerank_weight"] == 0.5 and res["retrieval/rerank_weight_tuned"] == 0.0
    assert "(w=0.5, given)" in format_results(res)
    with caplog.at_level("WARNING", logger="mico_ds"):
        res, calls, model, val, _, direct = _runner_case(monkeypatch)
    assert calls == [None] and res["retrieval/rerank_weight"] == 1.0
    assert (
        res["retrieval/t2k_r1_rerank"]
        == evaluate_retrieval(model, val, ListTokenizer(), max_items=10, rerank_weight=1.0, **direct)[
            "retrieval/t2k_r1_rerank"
        ]
    )
    assert sum("eval.rerank_tune_shards are not set" in r.getMessage() for r in caplog.records) == 1
    with pytest.raises(ValueError, match="another split"):
        _runner_case(monkeypatch, rerank_tune_shards="val-*.tar")
    res, calls, *_ = _runner_case(monkeypatch, rerank_tune_shards="tune-*.tar", rerank_k=0)
    assert calls == [None] and "retrieval/rerank_weight" not in res
