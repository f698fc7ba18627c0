"""Memory-efficient omni-modal contrastive loss (MiCo Eq. 4) over all-gathered features.

Semantics are exactly those of ``open_clip.loss.ClipLoss(local_loss=True, gather_with_grad=True)``:
with this rank's L2-normalized features z, t (b, E), the features Z, T (N, E) gathered from all W
ranks (N = W*b, rank r's rows at [r*b, (r+1)*b)), s = logit_scale and g(i) = r*b + i,

    loss = 1/2 mean_i [lse_j(s <z_i, T_j>) - s <z_i, t_i>] + 1/2 mean_i [lse_j(s <t_i, Z_j>) - s <t_i, z_i>]

(the positive logit s <z_i, T_g(i)> is s <z_i, t_i> since T_g(i) is t_i). The b x N logits are never
materialized: the forward streams over column tiles keeping only the per-row log-sum-exp of both
directions; the backward recomputes each tile, P = exp(logits - lse), and turns it into gradients of
the local features, of the gathered features and of s. Gradients of gathered rows go back to their
owning rank as a sum over ranks (what ``all_gather_with_grad``'s backward does: all_reduce(SUM), then
the local slice), here as one reduce per owning rank, started as soon as that chunk is done.

Communication is per rank-chunk: the forward starts one broadcast per source rank and computes on
its own chunk, then on each other chunk as it arrives; the backward walks the chunks in rank order
(the same order on every rank, as collectives must be issued) and starts the reduce of chunk k while
computing chunk k+1. Extra memory: one (b, tile) fp32 logits tile, reused; the (b, E) gradients of the
local features; one (2, b, E) buffer per chunk in flight to its owner (none with one rank: the column
gradients are accumulated into the local ones). The PyTorch path applies s and -lse inside the GEMMs
(``alpha``, the addend), so it makes no scaled copies of the features and no per-chunk accumulators.
The gathered features themselves, O(N x E), are kept for the backward exactly as ClipLoss keeps them.

Two implementations of the per-chunk work: PyTorch tiles (CPU path; fp32 math, ``tile`` columns at a
time) and Triton kernels (``_triton_contrastive``: fused logits/online-LSE forward and fused
recompute backward, flash-attention style; ``tile`` is unused there, on-chip blocks bound the memory).
"""

from __future__ import annotations

from typing import Any

import torch

from mico_ds import distributed as mdist
from mico_ds.kernels._backend import load_triton_module, use_triton

# ---------------------------------------------------------------------------------------------
# PyTorch tiled blocks: q (b, E) fp32 rows against the rows of one gathered chunk k_rows (n, E).


def _tile_buffer(b: int, n_max: int, tile: int, device: torch.device) -> torch.Tensor:
    """One flat fp32 buffer for a (b, tile) logits tile, reused by every tile (no per-tile allocation)."""
    return torch.empty(b * min(tile, n_max), dtype=torch.float32, device=device)


def _lse_block_torch(
    q: torch.Tensor, s: float, k_rows: torch.Tensor, tile: int, buf: torch.Tensor
) -> torch.Tensor:
    """(b,) log-sum-exp over the chunk's columns of s q k_rows^T, ``tile`` columns at a time.

    s is applied by the GEMM (``alpha``), so no scaled copy of q is made.
    """
    b = q.shape[0]
    lse = torch.full((b,), float("-inf"), dtype=torch.float32, device=q.device)
    for c0 in range(0, k_rows.shape[0], tile):
        kt = k_rows[c0 : c0 + tile].float()
        logits = buf[: b * kt.shape[0]].view(b, kt.shape[0]).addmm_(q, kt.T, beta=0, alpha=s)  # (b, tile)
        m = logits.amax(dim=1)  # finite: the logits are
        tile_lse = logits.sub_(m[:, None]).exp_().sum(dim=1).log_().add_(m)
        lse = torch.logaddexp(lse, tile_lse)
    return lse


def _bwd_block_torch(
    q: torch.Tensor,
    s: float,
    k_rows: torch.Tensor,
    lse: torch.Tensor,
    tile: int,
    cs: float,
    dq: torch.Tensor,
    dk: torch.Tensor,
    dk_beta: float,
    buf: torch.Tensor,
) -> None:
    """Gradients of ``coef * sum_i lse_i`` restricted to this chunk's columns, cs = coef * s.

    With P = exp(s q k^T - lse) (the softmax rows, recomputed tile by tile; -lse enters the GEMM as
    its addend, so one elementwise pass remains): dq += cs P k (accumulated in place) and
    dk = dk_beta * dk + cs P^T q. Per tile: one GEMM for P, one exp pass, two GEMMs for the gradients.
    """
    b = q.shape[0]
    neg_lse = lse.neg()[:, None]
    for c0 in range(0, k_rows.shape[0], tile):
        kt = k_rows[c0 : c0 + tile].float()
        p = torch.addmm(neg_lse, q, kt.T, alpha=s, out=buf[: b * kt.shape[0]].view(b, kt.shape[0]))
        p.exp_()  # (b, tile) softmax rows, in place
        dq.addmm_(p, kt, alpha=cs)
        dk[c0 : c0 + tile].addmm_(p.T, q, beta=dk_beta, alpha=cs)


# ---------------------------------------------------------------------------------------------


class _ContrastiveLSE(torch.autograd.Function):
    """1/2 mean_i lse_j(s <z_i, T_j>) + 1/2 mean_i lse_j(s <t_i, Z_j>), gathered and tiled.

    The positive-logit term of Eq. 4 is added outside with plain autograd (it is local: s <z_i, t_i>).
    """

    @staticmethod
    def forward(
        ctx: Any, z: torch.Tensor, t: torch.Tensor, s: torch.Tensor, tile: int, triton: bool
    ) -> torch.Tensor:
        b, E = z.shape
        world, rank = mdist.get_world_size(), mdist.get_rank()
        pending: list[mdist.Pending] = []  # with one rank the only chunk is (z, t) itself: no copy
        if world > 1:
            # One broadcast per source rank of [z | t] (b, 2E); this rank's chunk is ready at once.
            pending = mdist.all_gather_chunks_async(torch.cat([z.detach(), t.detach()], dim=1))
        s32 = s.detach().float()
        tk = load_triton_module("_triton_contrastive") if triton else None
        zq, tq = (z.detach(), t.detach()) if triton else (z.detach().float(), t.detach().float())
        s_f = None if triton else float(s32)  # the PyTorch GEMMs take s as alpha (a host sync)
        lse_zt = torch.full((b,), float("-inf"), dtype=torch.float32, device=z.device)
        lse_tz = torch.full_like(lse_zt, float("-inf"))
        chunks: list[tuple[torch.Tensor, torch.Tensor]] = [None] * world  # type: ignore[list-item]
        buf: torch.Tensor | None = None
        for step in range(world):
            k = (rank + step) % world  # own chunk first, then the others as they arrive
            if world == 1:
                Zk, Tk = z.detach(), t.detach()
            else:
                packed = pending[k].wait()
                Zk, Tk = packed[:, :E], packed[:, E:]
            chunks[k] = (Zk, Tk)
            if tk is not None:
                lse_zt = torch.logaddexp(lse_zt, tk.lse_block(zq, Tk, s32))
                lse_tz = torch.logaddexp(lse_tz, tk.lse_block(tq, Zk, s32))
            else:
                if buf is None:
                    buf = _tile_buffer(b, Zk.shape[0], tile, z.device)
                lse_zt = torch.logaddexp(lse_zt, _lse_block_torch(zq, s_f, Tk, tile, buf))
                lse_tz = torch.logaddexp(lse_tz, _lse_block_torch(tq, s_f, Zk, tile, buf))
        ctx.save_for_backward(z, t, s, lse_zt, lse_tz)
        ctx.chunks, ctx.tile, ctx.triton = chunks, tile, triton
        return 0.5 * (lse_zt.mean() + lse_tz.mean())

    @staticmethod
    def backward(ctx: Any, gout: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        z, t, s, lse_zt, lse_tz = ctx.saved_tensors
        chunks: list[tuple[torch.Tensor, torch.Tensor]] = ctx.chunks
        b, E = z.shape
        rank = mdist.get_rank()
        s32 = s.detach().float()
        coef = (0.5 / b) * gout.float()  # d loss / d lse_i (a tensor: no host sync)
        tk = load_triton_module("_triton_contrastive") if ctx.triton else None
        zq, tq = (z.detach(), t.detach()) if tk is not None else (z.detach().float(), t.detach().float())
        dz = torch.zeros((b, E), dtype=torch.float32, device=z.device)
        dt = torch.zeros_like(dz)
        ds = torch.zeros((), dtype=torch.float32, device=z.device)
        world = len(chunks)
        if tk is None:
            s_f = float(s32)  # the GEMMs take s and coef * s as alpha (host syncs, once per backward)
            cs = float(coef) * s_f
            buf = _tile_buffer(b, chunks[0][0].shape[0], ctx.tile, z.device)
        reduces: list[mdist.Pending] = []
        for k, (Zk, Tk) in enumerate(chunks):  # rank order everywhere: reduces are issued identically
            if tk is None and world == 1:
                # The only chunk is (z, t) itself: its column gradients are this rank's, accumulated
                # straight into dz / dt (no buffer for a reduce).
                _bwd_block_torch(zq, s_f, Tk, lse_zt, ctx.tile, cs, dz, dt, 1.0, buf)
                _bwd_block_torch(tq, s_f, Zk, lse_tz, ctx.tile, cs, dt, dz, 1.0, buf)
                continue
            # [dZ_k ; dT_k] (2, n, E): rank k owns chunk k and receives the sum over ranks of it.
            packed = torch.empty((2, Zk.shape[0], E), dtype=torch.float32, device=z.device)
            if tk is not None:
                dq1, packed[1], ds1 = tk.bwd_block(zq, Tk, s32, lse_zt, coef)
                dq2, packed[0], ds2 = tk.bwd_block(tq, Zk, s32, lse_tz, coef)
                dz += dq1
                dt += dq2
                ds += ds1 + ds2
                del dq1, dq2
            else:
                _bwd_block_torch(zq, s_f, Tk, lse_zt, ctx.tile, cs, dz, packed[1], 0.0, buf)
                _bwd_block_torch(tq, s_f, Zk, lse_tz, ctx.tile, cs, dt, packed[0], 0.0, buf)
            reduces.append(mdist.reduce_sum_async(packed, dst=k))
            del packed
        if tk is None:
            # ds = coef sum_i <q_i, (P k)_i> over both directions = (<z, dz> + <t, dt>) / s while dz, dt
            # hold only the row gradients; with one rank they also hold the column gradients, which
            # contribute exactly as much again (<z, cs P_tz^T t> = <t, cs P_tz z>).
            dots = torch.dot(zq.reshape(-1), dz.view(-1)) + torch.dot(tq.reshape(-1), dt.view(-1))
            ds = dots / (s32 * (2 if world == 1 else 1))
        if reduces:
            mine = [p.wait() for p in reduces][rank]
            dz += mine[0]
            dt += mine[1]
        ctx.chunks = None
        return dz.to(z.dtype), dt.to(t.dtype), ds.to(s.dtype), None, None


def _check_features(v_z: torch.Tensor, v_t: torch.Tensor, logit_scale: torch.Tensor, tile: int) -> None:
    if v_z.ndim != 2 or v_z.shape != v_t.shape:
        raise ValueError(
            f"contrastive_loss_tiled: v_z and v_t must both be (b, E), got {tuple(v_z.shape)} "
            f"and {tuple(v_t.shape)}"
        )
    if v_z.dtype != v_t.dtype:
        raise ValueError(f"contrastive_loss_tiled: v_z is {v_z.dtype} but v_t is {v_t.dtype}")
    if logit_scale.numel() != 1:
        raise ValueError(
            f"contrastive_loss_tiled: logit_scale must hold one value, got shape {tuple(logit_scale.shape)}"
        )
    if tile < 1:
        raise ValueError(f"contrastive_loss_tiled: tile must be >= 1, got {tile}")


def contrastive_loss_tiled(
    v_z: torch.Tensor,
    v_t: torch.Tensor,
    logit_scale: torch.Tensor | float,
    tile: int = 1024,
    impl: str = "torch",
) -> torch.Tensor:
    """MiCo Eq. 4 over the features of all ranks, without materializing the (b, N) logits.

    Args:
        v_z: (b, E) this rank's L2-normalized omni-modal features (fp32 or bf16). Every rank must
            pass the same b.
        v_t: (b, E) this rank's L2-normalized text features, same dtype.
        logit_scale: one-element tensor (or a float) s multiplying the cosine similarities (the exponentiated
            learnable temperature, as ``ClipLoss`` takes it); it may require grad.
        tile: global columns per PyTorch tile (extra memory ~ a few b x tile fp32 buffers).
        impl: "torch" (tiled PyTorch, any device) | "triton" (fused kernels; CPU only under
            TRITON_INTERPRET=1) | "auto" (Triton on CUDA, PyTorch elsewhere).

    Returns:
        The fp32 scalar loss of this rank, equal to ``ClipLoss(local_loss=True, gather_with_grad=True)``
        (its gradients w.r.t. v_z, v_t include the other ranks' losses, as with gather-with-grad).
    """
    logit_scale = torch.as_tensor(logit_scale, device=v_z.device)
    _check_features(v_z, v_t, logit_scale, tile)
    triton = use_triton(impl, v_z.device, "contrastive_loss_tiled")
    s = logit_scale.reshape(())
    lse_term = _ContrastiveLSE.apply(v_z, v_t, s, tile, triton)
    positive = (v_z.float() * v_t.float()).sum(dim=1)  # <z_i, t_i>, shared by both directions
    return lse_term - s.float() * positive.mean()


@torch.no_grad()
def sample_hard_negatives_tiled(
    q_local: torch.Tensor,
    k_global: torch.Tensor,
    logit_scale: torch.Tensor | float,
    positive_idx: torch.Tensor,
    generator: torch.Generator | None = None,
    tile: int = 1024,
    num: int = 1,
    q_groups: torch.Tensor | None = None,
    k_groups: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``num`` indices per row drawn without replacement from softmax_j(s <q_i, k_j>) over the allowed j.

    Gumbel-top-k over column tiles with a running top-``num``: the ``num`` largest
    s <q_i, k_j> + G_ij, G iid Gumbel(0, 1), are a draw without replacement from the softmax (the
    successive-sampling law), and they can be kept tile by tile, so the (b, N) matrix is never
    materialized. No host sync. Banned: each row's positive, and with groups every j that shares a
    group id with row i in any column (a duplicate caption, another clip of the same video).

    Args:
        q_local: (b, E) this rank's query features.
        k_global: (N, E) candidate features of the global batch (N >= num + 1).
        logit_scale: one-element tensor (or a float) s.
        positive_idx: (b,) int64 column of each row's positive, never drawn.
        generator: random generator on q_local's device (None: the default one).
        tile: columns per tile.
        num: draws per row.
        q_groups, k_groups: (b, G) and (N, G) int64 group ids, or None.

    Returns:
        (idx, valid): (b, num) int64 indices into k_global, never a row's positive, and (b, num) bool,
        False where a row had fewer than ``num`` allowed candidates and a banned one filled the slot.
    """
    if q_local.ndim != 2 or k_global.ndim != 2 or q_local.shape[1] != k_global.shape[1]:
        raise ValueError(
            f"sample_hard_negatives_tiled: q_local (b, E) and k_global (N, E) must share E, got "
            f"{tuple(q_local.shape)} and {tuple(k_global.shape)}"
        )
    b, n = q_local.shape[0], k_global.shape[0]
    if n < num + 1:
        raise ValueError(
            f"sample_hard_negatives_tiled: need >= {num + 1} candidates (one is the positive), N={n}"
        )
    if positive_idx.shape != (b,):
        raise ValueError(
            f"sample_hard_negatives_tiled: positive_idx must be ({b},), got {tuple(positive_idx.shape)}"
        )
    if tile < 1:
        raise ValueError(f"sample_hard_negatives_tiled: tile must be >= 1, got {tile}")
    if (q_groups is None) != (k_groups is None):
        raise ValueError("sample_hard_negatives_tiled: give both q_groups and k_groups, or neither")
    q = q_local.float()
    s = torch.as_tensor(logit_scale, device=q.device).detach().float().reshape(())
    pos = positive_idx.to(device=q.device, dtype=torch.long)
    best = torch.full((b, num), float("-inf"), dtype=torch.float32, device=q.device)
    best_idx = torch.zeros((b, num), dtype=torch.long, device=q.device)
    for c0 in range(0, n, tile):
        kt = k_global[c0 : c0 + tile].float()
        scores = torch.mm(q, kt.T).mul_(s)  # (b, tile)
        # + Gumbel(0, 1) = - log(Exp(1)); drawn in place to keep one (b, tile) buffer.
        noise = torch.empty_like(scores).exponential_(generator=generator).log_()
        scores.sub_(noise)
        del noise
        if q_groups is not None:
            same = (q_groups[:, None, :] == k_groups[None, c0 : c0 + kt.shape[0], :]).any(-1)
            # Below every allowed score, above the positive: fills a slot only when nothing else can.
            scores.masked_fill_(same, -BANNED)
        # Exclude each row's positive when it falls in this tile (scatter of -inf, no boolean indexing).
        local = pos - c0
        inside = (local >= 0) & (local < kt.shape[0])
        col = local.clamp(0, kt.shape[0] - 1)[:, None]
        keep = scores.gather(1, col)
        scores.scatter_(1, col, torch.where(inside[:, None], float("-inf"), keep))
        both = torch.cat([best, scores], dim=1)
        both_idx = torch.cat([best_idx, torch.arange(c0, c0 + kt.shape[0], device=q.device).expand(b, -1)], 1)
        best, arg = both.topk(num, dim=1)
        best_idx = both_idx.gather(1, arg)
    return best_idx, best > -BANNED / 2


# A finite score for banned candidates, far below any s <q, k> + Gumbel noise (|s| <= 100, |<q,k>| <= 1).
BANNED = 1e30
