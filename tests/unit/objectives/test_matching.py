"""Matching with hard negatives (MiCo Eq. 5): the sampler's support and distribution, cross-rank negatives."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from mico_ds.distributed import all_gather_no_grad, all_gather_with_grad
from mico_ds.kernels import sample_hard_negatives_tiled
from mico_ds.objectives.matching import (
    caption_hash,
    gather_texts,
    listwise_matching_loss,
    matching_labels,
    matching_loss,
    sample_hard_negatives,
)
from tests.helpers.ranks import run_ranks

CHI2_DF3_P001 = 16.27  # chi-square critical value, 3 degrees of freedom, p = 0.001


def test_never_draws_the_positive() -> None:
    g = torch.Generator().manual_seed(0)
    q = F.normalize(torch.randn(64, 8, generator=g), dim=1)
    k = torch.cat([q, F.normalize(torch.randn(4, 8, generator=g), dim=1)])  # positives are the best matches
    pos = torch.arange(64)
    for scale in (1.0, 100.0):
        for seed in range(20):
            idx, ok = sample_hard_negatives(
                q, k, torch.tensor(scale), pos, torch.Generator().manual_seed(seed)
            )
            assert ok.all() and idx.shape == (64, 1)
            idx = idx[:, 0]
            assert idx.shape == (64,) and idx.dtype == torch.long
            assert not (idx == pos).any()
            assert int(idx.min()) >= 0 and int(idx.max()) < 68


def test_follows_the_softmax_of_similarities_without_the_positive() -> None:
    k = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0], [-0.6, 0.8], [-1.0, 0.0]])
    q = torch.tensor([[1.0, 0.0]]).repeat(20000, 1)
    scale, positive = 2.0, 0
    idx = sample_hard_negatives(
        q, k, scale, torch.zeros(20000, dtype=torch.long), torch.Generator().manual_seed(3)
    )[0][:, 0]
    observed = torch.bincount(idx, minlength=5).double()
    assert observed[positive] == 0
    logits = scale * (k @ q[0])
    logits[positive] = float("-inf")
    expected = torch.softmax(logits.double(), 0) * 20000
    rest = [1, 2, 3, 4]
    chi2 = float(((observed[rest] - expected[rest]) ** 2 / expected[rest]).sum())
    assert chi2 < CHI2_DF3_P001, (observed, expected)
    uniform = torch.full((4,), 5000.0, dtype=torch.float64)  # the test has the power to reject uniform draws
    assert float(((observed[rest] - uniform) ** 2 / uniform).sum()) > 100 * CHI2_DF3_P001


def test_seeded_draws_are_reproducible() -> None:
    g = torch.Generator().manual_seed(1)
    q, k = torch.randn(16, 4, generator=g), torch.randn(16, 4, generator=g)
    pos = torch.arange(16)
    a = sample_hard_negatives(q, k, 1.0, pos, torch.Generator().manual_seed(5))[0]
    b = sample_hard_negatives(q, k, 1.0, pos, torch.Generator().manual_seed(5))[0]
    c = sample_hard_negatives(q, k, 1.0, pos, torch.Generator().manual_seed(6))[0]
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_needs_two_candidates() -> None:
    with pytest.raises(ValueError, match="at least 2 candidates"):
        sample_hard_negatives(torch.randn(1, 4), torch.randn(1, 4), 1.0, torch.zeros(1, dtype=torch.long))


def test_matching_loss_is_mean_bce_over_3b_pairs() -> None:
    logits = torch.tensor([2.0, -1.0, 0.5, 0.3, -2.0, 1.0])  # b = 2
    labels = matching_labels(2, "cpu")
    assert labels.tolist() == [1, 1, 0, 0, 0, 0]
    p = torch.sigmoid(logits)
    expect = -(labels * p.log() + (1 - labels) * (1 - p).log()).mean()
    torch.testing.assert_close(matching_loss(logits, labels), expect)


def _cross_rank_worker(rank: int) -> dict[str, torch.Tensor]:
    b, e = 3, 4
    g = torch.Generator().manual_seed(100 + rank)
    z_local = F.normalize(torch.randn(b, e, generator=g), dim=1)
    if rank == 0:
        t_local = F.normalize(torch.randn(b, e, generator=g), dim=1)
    else:  # rank 1's texts are copies of rank 0's contexts: rank 0's hardest negatives live here
        t_local = _rank0_contexts(b, e)
    z_all, t_all = all_gather_no_grad(z_local), all_gather_no_grad(t_local)
    pos = torch.arange(b) + rank * b
    neg_t = sample_hard_negatives(z_local, t_all, 100.0, pos, torch.Generator().manual_seed(rank))[0][:, 0]
    # texts of different lengths per rank: padded to the longest, gathered
    length = 5 if rank == 0 else 8
    ids = torch.full((b, length), 10 + rank)
    mask = torch.ones(b, length, dtype=torch.long)
    ids_l, mask_l, ids_all, mask_all = gather_texts(ids, mask, pad_id=0)
    # a negative context from the other rank keeps its gradient path to its owner
    prefix = torch.full((b, 2, e), float(rank + 1), requires_grad=True)
    prefix_all = all_gather_with_grad(prefix)
    other = torch.arange(b) + (1 - rank) * b
    (prefix_all[other] * (rank + 1)).sum().backward()
    return {
        "neg_t": neg_t,
        "ids_all": ids_all,
        "mask_all": mask_all,
        "ids_l": ids_l,
        "grad": prefix.grad,
        "z_all": z_all,
    }


def _rank0_contexts(b: int, e: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(100)  # rank 0's generator: its first draw is z_local
    return F.normalize(torch.randn(b, e, generator=g), dim=1)


@pytest.mark.distributed
def test_negatives_and_their_texts_and_contexts_cross_ranks(tmp_path: Path) -> None:
    r0, r1 = run_ranks(_cross_rank_worker, 2, tmp_path)
    b = 3
    # rank 0's contexts match rank 1's texts almost exactly: every sampled negative is on rank 1,
    # and it is the near-copy (global column b + i)
    assert r0["neg_t"].tolist() == [b + i for i in range(b)]
    # text gathering pads rank 0's 5 tokens to rank 1's 8
    for r in (r0, r1):
        assert r["ids_all"].shape == (6, 8)
        assert r["mask_all"][:3].sum(1).tolist() == [5, 5, 5] and r["mask_all"][3:].sum(1).tolist() == [
            8,
            8,
            8,
        ]
        assert (r["ids_all"][:3, 5:] == 0).all() and (r["ids_all"][3:] == 11).all()
    assert r0["ids_l"].shape == (3, 8)
    # rank 0 used rank 1's prefixes (weight 1), rank 1 used rank 0's (weight 2): gradients went home
    torch.testing.assert_close(r1["grad"], torch.full((b, 2, 4), 1.0))
    torch.testing.assert_close(r0["grad"], torch.full((b, 2, 4), 2.0))


@pytest.mark.parametrize("impl", ["naive", "tiled"])
def test_mining_never_returns_a_duplicate_caption_or_a_same_key_candidate(impl: str) -> None:
    """Groups: column 0 a caption hash (every 4th sample repeats sample 0's caption), column 1 a
    source key (clips of one video: 8 videos x 4 clips). The near-copies are the hardest negatives,
    yet never drawn."""
    g = torch.Generator().manual_seed(2)
    n, k = 32, 3
    ids = torch.randint(3, 50, (n, 6), generator=g)
    ids[::4] = ids[0]  # duplicate captions
    mask = torch.ones_like(ids)
    groups = torch.stack([caption_hash(ids, mask), torch.arange(n) // 4], dim=1)
    base = F.normalize(torch.randn(8, 16, generator=g), dim=1)
    feats = F.normalize(base[torch.arange(n) // 4] + 0.01 * torch.randn(n, 16, generator=g), dim=1)
    pos = torch.arange(n)
    same = (groups[:, None, :] == groups[None, :, :]).any(-1)
    for seed in range(10):
        gen = torch.Generator().manual_seed(seed)
        if impl == "naive":
            idx, ok = sample_hard_negatives(
                feats, feats, 50.0, pos, gen, num=k, q_groups=groups, k_groups=groups
            )
        else:
            idx, ok = sample_hard_negatives_tiled(
                feats, feats, 50.0, pos, gen, tile=5, num=k, q_groups=groups, k_groups=groups
            )
        assert ok.all()  # every row has >= k allowed candidates
        assert not same.gather(1, idx).any()
        assert all(len(set(r.tolist())) == k for r in idx)
    # without groups, the near-copies are what gets drawn
    idx, _ = sample_hard_negatives(feats, feats, 50.0, pos, torch.Generator().manual_seed(0), num=1)
    assert same.gather(1, idx).float().mean() > 0.9


def test_rows_short_of_allowed_candidates_flag_their_filled_slots() -> None:
    q = F.normalize(torch.randn(4, 8, generator=torch.Generator().manual_seed(0)), dim=1)
    groups = torch.tensor([[0], [0], [0], [1]])  # rows 0-2 share a group: each has one allowed (row 3)
    for fn in (sample_hard_negatives, partial(sample_hard_negatives_tiled, tile=2)):
        idx, ok = fn(
            q,
            q,
            1.0,
            torch.arange(4),
            torch.Generator().manual_seed(1),
            num=2,
            q_groups=groups,
            k_groups=groups,
        )
        assert (idx != torch.arange(4)[:, None]).all()  # never the positive, even as a filler
        assert ok[:3].sum(1).tolist() == [1, 1, 1] and ok[3].all()
        assert (idx[:3][ok[:3]] == 3).all()


def test_caption_hash_ignores_padding_and_separates_captions() -> None:
    ids = torch.tensor([[5, 6, 7, 0, 0], [5, 6, 7, 0, 0], [5, 6, 8, 0, 0], [5, 6, 0, 0, 0]])
    mask = (ids > 0).long()
    h = caption_hash(ids, mask)
    assert h[0] == h[1] and len(set(h.tolist())) == 3
    assert torch.equal(caption_hash(ids[:, :3], mask[:, :3]), h)  # padded further: same ids


def _listwise_worker(
    rank: int, z_full: torch.Tensor, t_full: torch.Tensor, k: int
) -> dict[str, torch.Tensor]:
    b = z_full.shape[0] // 2
    z = z_full[rank * b : (rank + 1) * b].clone().requires_grad_(True)
    t = t_full[rank * b : (rank + 1) * b].clone().requires_grad_(True)
    z_all, t_all = all_gather_with_grad(z), all_gather_with_grad(t)
    pos = torch.arange(b) + rank * b
    gen = torch.Generator().manual_seed(rank)
    neg_t, ok_t = sample_hard_negatives(z.detach(), t_all.detach(), 5.0, pos, gen, num=k)
    neg_z, ok_z = sample_hard_negatives(t.detach(), z_all.detach(), 5.0, pos, gen, num=k)
    # a stand-in matching head: the pair's dot product, with the gradient through the gathers
    logits = torch.cat(
        [
            (z * t).sum(1),
            (z.repeat_interleave(k, 0) * t_all[neg_t.flatten()]).sum(1),
            (z_all[neg_z.flatten()] * t.repeat_interleave(k, 0)).sum(1),
        ]
    )
    loss = listwise_matching_loss(logits, b, k, torch.cat([ok_t.flatten(), ok_z.flatten()]))
    (loss / 2).backward()  # the mean over ranks, as DeepSpeed averages gradients
    return {"loss": loss.detach(), "neg_t": neg_t, "neg_z": neg_z, "gz": z.grad, "gt": t.grad}


@pytest.mark.distributed
def test_listwise_loss_across_two_ranks_equals_a_naive_reference(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(4)
    n, k = 8, 3
    z_full = F.normalize(torch.randn(n, 6, generator=g), dim=1)
    t_full = F.normalize(z_full + 0.5 * torch.randn(n, 6, generator=g), dim=1)
    res = run_ranks(_listwise_worker, 2, tmp_path, z_full, t_full, k)
    z, t = z_full.clone().requires_grad_(True), t_full.clone().requires_grad_(True)
    total = 0.0
    for r, out in enumerate(res):
        for i in range(n // 2):
            q = r * n // 2 + i
            for cands in (
                [(z[q] * t[j]).sum() for j in out["neg_t"][i]],
                [(z[j] * t[q]).sum() for j in out["neg_z"][i]],
            ):
                row = torch.stack([(z[q] * t[q]).sum(), *cands])
                total = total + (torch.logsumexp(row, 0) - row[0]) / (2 * (n // 2)) / 2
    total.backward()
    torch.testing.assert_close(sum(o["loss"] for o in res) / 2, total.detach())
    # negatives come from both ranks, and each rank's gradient share reached its own rows (summed over ranks)
    assert any(int(j) >= n // 2 for j in res[0]["neg_t"].flatten())
    gz = torch.cat([res[0]["gz"], res[1]["gz"]])
    gt = torch.cat([res[0]["gt"], res[1]["gt"]])
    torch.testing.assert_close(gz, z.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gt, t.grad, rtol=1e-5, atol=1e-6)
