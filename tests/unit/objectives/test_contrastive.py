"""Contrastive loss (MiCo Eq. 4): a written-out reference, OpenCLIP's ClipLoss on 1 and 2 gloo ranks."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss

from mico_ds.objectives.contrastive import contrastive_loss, in_batch_top1
from tests.helpers.ranks import run_ranks

WORLD = 2


def _features(n: int, e: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    z = F.normalize(torch.randn(n, e, generator=g, dtype=torch.float64), dim=1)
    t = F.normalize(z + 0.8 * torch.randn(n, e, generator=g, dtype=torch.float64), dim=1)
    return z, t, torch.tensor(14.3, dtype=torch.float64)


def _reference(z: torch.Tensor, t: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """Eq. 4 as two loops (averaged over the batch instead of summed)."""
    n = z.shape[0]
    total = z.new_zeros(())
    for i in range(n):
        row_z = torch.stack([s * z[i] @ t[j] for j in range(n)])
        row_t = torch.stack([s * t[i] @ z[j] for j in range(n)])
        total = (
            total
            - 0.5 * (row_z[i] - torch.logsumexp(row_z, 0))
            - 0.5 * (row_t[i] - torch.logsumexp(row_t, 0))
        )
    return total / n


def _loss_and_grads(fn, z, t, s) -> list[torch.Tensor]:
    z, t, s = (x.detach().clone().requires_grad_() for x in (z, t, s))
    loss = fn(z, t, s)
    return [x.detach() for x in (loss, *torch.autograd.grad(loss, (z, t, s)))]


def test_single_process_matches_two_loop_reference_and_clip_loss() -> None:
    z, t, s = _features(6, 5, seed=0)
    ours = _loss_and_grads(lambda a, b, c: contrastive_loss(a, b, c, impl="naive"), z, t, s)
    ref = _loss_and_grads(_reference, z, t, s)
    clip = _loss_and_grads(lambda a, b, c: ClipLoss()(a, b, c), z, t, s)
    for mine, r, c in zip(ours, ref, clip):
        torch.testing.assert_close(mine, r)
        torch.testing.assert_close(mine, c)


def test_tiled_impl_has_the_same_semantics() -> None:
    z, t, s = _features(7, 5, seed=1)
    naive = _loss_and_grads(
        lambda a, b, c: contrastive_loss(a, b, c, impl="naive"), z.float(), t.float(), s.float()
    )
    tiled = _loss_and_grads(
        lambda a, b, c: contrastive_loss(a, b, c, impl="torch", tile=3), z.float(), t.float(), s.float()
    )
    for a, b in zip(naive, tiled):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_bad_arguments_raise() -> None:
    z, t, s = _features(4, 3, seed=2)
    with pytest.raises(ValueError, match="impl"):
        contrastive_loss(z, t, s, impl="cuda")
    with pytest.raises(ValueError, match=r"\(b, E\)"):
        contrastive_loss(z, t[:3], s)


def test_in_batch_top1() -> None:
    q = torch.eye(3)
    k = torch.cat([0.5 * torch.eye(3)[[1, 0, 2]], torch.eye(3)])  # each query's best key is on rank 1
    assert float(in_batch_top1(q, k, rank=1)) == 1.0
    assert float(in_batch_top1(q, k, rank=0)) == 0.0
    k[2, 2] = 2.0  # now query 2's best key is column 2, its rank-0 positive
    assert float(in_batch_top1(q, k, rank=0)) == pytest.approx(1 / 3)
    for tile in (1, 2, 4, 5):  # tiles that split the rows anywhere give the full-row argmax
        assert float(in_batch_top1(q, k, rank=0, tile=tile)) == pytest.approx(1 / 3)
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(7, 5, generator=g), torch.randn(21, 5, generator=g)
    k[10] = k[3]  # a tie: the lowest column wins, as with argmax over the row
    full = ((q @ k.T).argmax(dim=1) == torch.arange(7) + 7).float().mean()
    for tile in (1, 4, 10, 64):
        assert float(in_batch_top1(q, k, rank=1, tile=tile)) == float(full)


def _two_rank_worker(rank: int, b: int, e: int, seed: int) -> dict[str, list[torch.Tensor]]:
    z_all, t_all, s = _features(WORLD * b, e, seed)
    rows = slice(rank * b, (rank + 1) * b)
    ours = _loss_and_grads(
        lambda a, c, d: contrastive_loss(a, c, d, impl="naive"), z_all[rows], t_all[rows], s
    )
    clip_fn = ClipLoss(local_loss=True, gather_with_grad=True, rank=rank, world_size=WORLD)
    clip = _loss_and_grads(lambda a, c, d: clip_fn(a, c, d), z_all[rows], t_all[rows], s)
    return {"ours": ours, "clip": clip}


@pytest.mark.distributed
def test_two_gloo_ranks_match_clip_loss_and_the_global_gradient(tmp_path: Path) -> None:
    b, e, seed = 3, 4, 7
    results = run_ranks(_two_rank_worker, WORLD, tmp_path, b, e, seed)
    for r in results:  # loss, grad z, grad t, grad s of this rank's local rows
        for mine, clip in zip(r["ours"], r["clip"]):
            torch.testing.assert_close(mine, clip)
    # The global-mean loss over the whole batch, in one process: its value is the mean of the rank
    # losses, and the rank-averaged gradients (DeepSpeed's averaging) are its gradients.
    z_all, t_all, s = _features(WORLD * b, e, seed)
    full = _loss_and_grads(lambda a, c, d: contrastive_loss(a, c, d, impl="naive"), z_all, t_all, s)
    losses = torch.stack([r["ours"][0] for r in results])
    torch.testing.assert_close(losses.mean(), full[0])
    assert not torch.allclose(losses[0], losses[1])  # the ranks really saw different rows
    grad_z = torch.cat([r["ours"][1] for r in results]) / WORLD
    grad_t = torch.cat([r["ours"][2] for r in results]) / WORLD
    torch.testing.assert_close(grad_z, full[1])
    torch.testing.assert_close(grad_t, full[2])
    torch.testing.assert_close(torch.stack([r["ours"][3] for r in results]).mean(), full[3])
