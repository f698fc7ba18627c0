"""Tiled contrastive loss on 2 real gloo ranks against open_clip's
ClipLoss(local_loss=True, gather_with_grad=True), and the per-chunk collectives it uses."""

from __future__ import annotations

import functools
import os
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

from mico_ds.distributed.launch import free_port
from tests.helpers.seeds import fresh_seed

WORLD = 2
# (b, E, tile, impls): b=1; b, N=2b and E not multiples of the tile or of the Triton blocks.
CASES = [(1, 7, 4, ("torch", "triton")), (5, 9, 3, ("torch",)), (37, 20, 16, ("torch", "triton"))]


def _global_inputs(b: int, E: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    Z = F.normalize(torch.randn(WORLD * b, E, generator=g, dtype=torch.float64), dim=1)
    T = F.normalize(Z + 0.7 * torch.randn(WORLD * b, E, generator=g, dtype=torch.float64), dim=1)
    s = torch.empty((), dtype=torch.float64).uniform_(1.0, 100.0, generator=g)
    return Z, T, s


def _loss_and_grads(fn, z, t, s):
    z, t, s = (x.detach().clone().requires_grad_() for x in (z, t, s))
    loss = fn(z, t, s)
    return [x.detach() for x in (loss, *torch.autograd.grad(loss, (z, t, s)))]


def _worker(rank: int, port: int, seed: int, out_dir: str) -> None:
    from open_clip.loss import ClipLoss

    from mico_ds import distributed as mdist
    from mico_ds.kernels import contrastive_loss_tiled

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD))
    torch.set_num_threads(1)
    mdist.init_process_group_from_env("gloo", timeout_s=120)
    out: dict = {"cases": []}
    try:
        # The per-chunk collectives on their own: broadcast chunks and per-destination reduces.
        x = torch.full((3, 2), float(rank + 1))
        out["chunks"] = [p.wait().clone() for p in mdist.all_gather_chunks_async(x)]
        pend = [mdist.reduce_sum_async(x * (k + 1), dst=k) for k in range(WORLD)]
        out["reduced_here"] = [p.wait().clone() for p in pend][rank]
        for i, (b, E, tile, impls) in enumerate(CASES):
            Z, T, s = _global_inputs(b, E, seed + i)
            z, t = Z[rank * b : (rank + 1) * b].float(), T[rank * b : (rank + 1) * b].float()
            clip = ClipLoss(local_loss=True, gather_with_grad=True, rank=rank, world_size=WORLD)
            res = {"clip": _loss_and_grads(clip, z, t, s.float())}
            for impl in impls:
                fn = functools.partial(contrastive_loss_tiled, tile=tile, impl=impl)
                res[impl] = _loss_and_grads(fn, z, t, s.float())
            out["cases"].append(res)
    finally:
        torch.save(out, Path(out_dir) / f"rank{rank}.pt")
        mdist.destroy()


def _naive_rank_loss(Z, T, s, rank: int, b: int):
    """fp64 loss of one rank under local_loss semantics: its rows against all columns."""
    rows = slice(rank * b, (rank + 1) * b)
    labels = torch.arange(rank * b, (rank + 1) * b)
    return 0.5 * (F.cross_entropy(s * Z[rows] @ T.T, labels) + F.cross_entropy(s * T[rows] @ Z.T, labels))


@pytest.mark.distributed
def test_two_gloo_ranks_match_cliploss_and_the_global_gradient(tmp_path, request):
    if "triton" in {i for c in CASES for i in c[3]}:
        request.getfixturevalue("triton_device")  # skips only if Triton cannot run here at all
    seed = fresh_seed()
    mp.spawn(_worker, args=(free_port(), seed, str(tmp_path)), nprocs=WORLD, join=True)
    per_rank = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]

    for r, res in enumerate(per_rank):
        assert [c[0, 0].item() for c in res["chunks"]] == [1.0, 2.0]  # rank k's tensor at slot k
        # Rank r receives sum_k (k_rank + 1) * (r + 1) = (1 + 2) * (r + 1).
        assert torch.equal(res["reduced_here"], torch.full((3, 2), 3.0 * (r + 1)))

    for i, (b, E, _, impls) in enumerate(CASES):
        Z, T, s = _global_inputs(b, E, seed + i)
        # Gather-with-grad semantics: rank r's feature gradient is d(sum over ranks of loss)/d(its rows).
        Zg, Tg = Z.clone().requires_grad_(), T.clone().requires_grad_()
        total = sum(_naive_rank_loss(Zg, Tg, s, r, b) for r in range(WORLD))
        dZ, dT = torch.autograd.grad(total, (Zg, Tg))
        atol = 2e-6 * float(s)  # fp32 logits of magnitude s (see test_contrastive.py)
        for r in range(WORLD):
            rows = slice(r * b, (r + 1) * b)
            sr = s.clone().requires_grad_()
            loss_r = _naive_rank_loss(Z, T, sr, r, b)
            (ds_r,) = torch.autograd.grad(loss_r, sr)
            exact = [loss_r.detach(), dZ[rows], dT[rows], ds_r]
            clip = per_rank[r]["cases"][i]["clip"]
            for impl in impls:
                ours = per_rank[r]["cases"][i][impl]
                for name, o, c, e in zip(("loss", "d v_z", "d v_t", "d logit_scale"), ours, clip, exact):
                    msg = f"case {i} rank {r} {impl} {name}"
                    torch.testing.assert_close(o, c, atol=atol, rtol=1e-5, msg=msg)
                    torch.testing.assert_close(o.double(), e, atol=atol, rtol=1e-5, msg=msg)
        # The ranks' losses differ (each rank owns different rows): the comparison is not vacuous.
        # Checked on the largest case: with one or five rows a rank's fp32 loss can round to exactly
        # 0 on both ranks when s (up to 100) times the positive's margin passes ~17.
        if b == max(c[0] for c in CASES):
            assert per_rank[0]["cases"][i]["torch"][0] != per_rank[1]["cases"][i]["torch"][0]
