"""Gumbel-max hard-negative sampler over column tiles: never the positive, and the softmax law."""

from __future__ import annotations

import math

import pytest
import torch

from mico_ds.kernels import sample_hard_negatives_tiled


@pytest.mark.parametrize("tile", [1, 3, 8, 1024])
def test_never_returns_the_positive_even_when_it_dominates(tile, rng):
    b, n, E = 40, 11, 6
    k = torch.randn(n, E, generator=rng)
    pos = torch.randint(0, n, (b,), generator=rng)
    # Each query is its positive key, scaled: the positive holds nearly all the softmax mass.
    q = k[pos] * 5.0
    for _ in range(20):
        idx, ok = sample_hard_negatives_tiled(q, k, torch.tensor(10.0), pos, rng, tile=tile)
        assert ok.all() and idx.shape == (b, 1)
        idx = idx[:, 0]
        assert idx.shape == (b,) and idx.dtype == torch.long
        assert ((idx >= 0) & (idx < n)).all()
        assert (idx != pos).all()


@pytest.mark.parametrize("tile", [2, 7])
def test_matches_the_softmax_without_the_positive(tile, rng):
    """Empirical law over many draws vs the exact probabilities, in total-variation distance.

    With n draws over K categories, P(||p_hat - p||_1 >= eps) <= (2^K - 2) exp(-n eps^2 / 2)
    (Bretagnolle-Huber-Carol); n = 40000, K = 7, TV = L1/2 > 0.02 has probability < 2e-12 per row.
    """
    rows, n, E, draws = 3, 7, 4, 40000
    q = torch.randn(rows, E, generator=rng)
    k = torch.randn(n, E, generator=rng)
    s = torch.tensor(1.5)
    pos = torch.randperm(n, generator=rng)[:rows]
    logits = s * q @ k.T
    logits[torch.arange(rows), pos] = float("-inf")
    exact = torch.softmax(logits.double(), dim=1)  # (rows, n), zero at the positive
    uniform = (exact > 0).double() / (n - 1)
    # The test has power: a sampler ignoring the scores (uniform) would be far off.
    assert ((exact - uniform).abs().sum(1) / 2 > 0.05).all(), "degenerate draw; scores too flat"
    # Replicate each row `draws` times: one call gives `draws` independent samples per row.
    idx = sample_hard_negatives_tiled(
        q.repeat_interleave(draws, 0), k, s, pos.repeat_interleave(draws), rng, tile=tile
    )[0].view(rows, draws)
    for r in range(rows):
        freq = torch.bincount(idx[r], minlength=n).double() / draws
        assert freq[pos[r]] == 0
        tv = (freq - exact[r]).abs().sum().item() / 2
        assert tv < 0.02, f"row {r}: TV {tv:.4f}, freq {freq.tolist()} vs {exact[r].tolist()}"
    bound = (2**n - 2) * math.exp(-draws * 0.04**2 / 2)
    assert bound < 2e-12  # the false-failure probability quoted above


def test_same_generator_seed_same_draw(rng):
    q, k = torch.randn(9, 5, generator=rng), torch.randn(13, 5, generator=rng)
    pos = torch.randint(0, 13, (9,), generator=rng)
    a = sample_hard_negatives_tiled(q, k, torch.tensor(3.0), pos, torch.Generator().manual_seed(7), tile=4)
    b = sample_hard_negatives_tiled(q, k, torch.tensor(3.0), pos, torch.Generator().manual_seed(7), tile=4)
    assert torch.equal(a[0], b[0])


def test_bad_arguments_raise_value_errors():
    q, k, s = torch.randn(3, 4), torch.randn(5, 4), torch.tensor(1.0)
    pos = torch.zeros(3, dtype=torch.long)
    with pytest.raises(ValueError, match="share E"):
        sample_hard_negatives_tiled(q, k[:, :3], s, pos)
    with pytest.raises(ValueError, match=">= 2 candidates"):
        sample_hard_negatives_tiled(q, k[:1], s, pos)
    with pytest.raises(ValueError, match="positive_idx"):
        sample_hard_negatives_tiled(q, k, s, pos[:2])
    with pytest.raises(ValueError, match="tile"):
        sample_hard_negatives_tiled(q, k, s, pos, tile=0)
