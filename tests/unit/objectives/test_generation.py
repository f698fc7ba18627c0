"""Masked caption generation (MiCo Eq. 6): exact masking counts, eligibility, global normalization."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from mico_ds.objectives.generation import generation_loss, mask_caption_tokens
from tests.helpers.ranks import run_ranks
from tests.helpers.tiny import make_tiny_special

SPECIAL = make_tiny_special()  # pad 0, bos 1, eos 2, mask 3


def _captions(lengths: list[int], width: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for r, n in enumerate(lengths):
        ids[r, 0], ids[r, n - 1] = SPECIAL.bos_id, SPECIAL.eos_id
        ids[r, 1 : n - 1] = torch.randint(4, SPECIAL.vocab_size, (n - 2,), generator=g)
        mask[r, :n] = 1
    return ids, mask


@pytest.mark.parametrize("ratio", [0.6, 0.15, 0.5, 1.0])
def test_exact_count_of_eligible_tokens_masked(ratio: float) -> None:
    lengths = [3, 4, 7, 12, 12, 9]
    ids, mask = _captions(lengths, 12)
    out, masked = mask_caption_tokens(ids, mask, ratio, SPECIAL, torch.Generator().manual_seed(0))
    for r, n in enumerate(lengths):
        eligible = n - 1  # all but BOS (EOS is a target: the decoder must learn to stop); no padding
        assert int(masked[r].sum()) == math.floor(ratio * eligible + 0.5), (r, n)
    assert not masked[:, 0].any()  # BOS
    if ratio == 1.0:
        assert (masked == (ids == SPECIAL.eos_id)).any(dim=1).all()  # every EOS masked at ratio 1
    assert not (masked & (mask == 0)).any()
    assert (out[masked] == SPECIAL.mask_id).all()
    assert torch.equal(out[~masked], ids[~masked])


def test_masked_positions_are_uniform_and_seeded() -> None:
    ids, mask = _captions([12], 12)  # 11 eligible tokens (EOS included), 7 masked per draw
    counts = torch.zeros(12)
    for seed in range(2000):
        _, masked = mask_caption_tokens(ids, mask, 0.6, SPECIAL, torch.Generator().manual_seed(seed))
        counts += masked[0].float()
    freq = counts[1:12] / 2000
    assert ((freq - 7 / 11).abs() < 0.05).all(), freq  # 0.05 ~ 4.5 standard errors
    a = mask_caption_tokens(ids, mask, 0.6, SPECIAL, torch.Generator().manual_seed(1))[1]
    b = mask_caption_tokens(ids, mask, 0.6, SPECIAL, torch.Generator().manual_seed(1))[1]
    assert torch.equal(a, b)


def test_bos_and_padding_are_never_masked_eos_is() -> None:
    ids = torch.tensor([[1, 5, 2, 1, 6, 7, 2, 0]])  # BOS/EOS wherever they occur, then padding
    mask = torch.tensor([[1, 1, 1, 1, 1, 1, 1, 0]])
    _, masked = mask_caption_tokens(ids, mask, 1.0, SPECIAL, torch.Generator().manual_seed(0))
    assert masked[0].tolist() == [False, True, True, False, True, True, True, False]


def test_bad_ratio_raises() -> None:
    ids, mask = _captions([5], 5)
    with pytest.raises(ValueError, match="mask_ratio"):
        mask_caption_tokens(ids, mask, 0.0, SPECIAL)


def test_single_process_loss_is_mean_ce_over_masked_tokens() -> None:
    g = torch.Generator().manual_seed(0)
    logits, targets = torch.randn(7, 11, generator=g), torch.randint(0, 11, (7,), generator=g)
    loss, count = generation_loss(logits, targets)
    torch.testing.assert_close(loss, F.cross_entropy(logits, targets))
    assert float(count) == 7


def _rank_inputs(rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(rank)
    n = (3, 9)[rank]  # different masked counts per rank
    return (
        torch.randn(n, 6, generator=g, dtype=torch.float64),
        torch.randint(0, 13, (n,), generator=g),
        _theta(),
    )


def _theta() -> torch.Tensor:
    return torch.randn(13, 6, generator=torch.Generator().manual_seed(42), dtype=torch.float64)


def _global_norm_worker(rank: int) -> dict[str, torch.Tensor]:
    h, targets, theta = _rank_inputs(rank)
    theta.requires_grad_()  # a parameter replicated on both ranks
    loss, count = generation_loss(h @ theta.T, targets)
    loss.backward()
    return {"loss": loss.detach(), "count": count, "grad": theta.grad}


@pytest.mark.distributed
def test_two_ranks_with_different_counts_give_the_global_mean(tmp_path: Path) -> None:
    r0, r1 = run_ranks(_global_norm_worker, 2, tmp_path)
    assert float(r0["count"]) == float(r1["count"]) == 12
    h = torch.cat([_rank_inputs(0)[0], _rank_inputs(1)[0]])
    targets = torch.cat([_rank_inputs(0)[1], _rank_inputs(1)[1]])
    theta = _theta().requires_grad_()
    full = F.cross_entropy(h @ theta.T, targets)  # mean over all 12 masked tokens of the global batch
    full.backward()
    torch.testing.assert_close((r0["loss"] + r1["loss"]) / 2, full.detach())
    torch.testing.assert_close((r0["grad"] + r1["grad"]) / 2, theta.grad)  # DeepSpeed's rank average
    # a per-rank mean would weight rank 0's 3 tokens like rank 1's 9: not the global mean
    per_rank = [F.cross_entropy(_rank_inputs(r)[0] @ _theta().T, _rank_inputs(r)[1]) for r in (0, 1)]
    assert not torch.allclose((per_rank[0] + per_rank[1]) / 2, full.detach())
