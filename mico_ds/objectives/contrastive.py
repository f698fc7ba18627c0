"""Omni-modal contrastive loss (MiCo Eq. 4): symmetric InfoNCE over the global batch.

Each rank holds b local pairs (v_z_i, v_t_i). Features are all-gathered across ranks WITH gradients;
the local rows are scored against all global columns and the positive of local row i is global
column rank*b + i:

    loss = 0.5 * ( CE(tau * v_z_local @ v_t_all^T, labels) + CE(tau * v_t_local @ v_z_all^T, labels) )

with CE averaged over the b local rows. This is exactly OpenCLIP's
``ClipLoss(local_loss=True, gather_with_grad=True)``: each rank's loss is the mean over its own rows,
DeepSpeed averages gradients over ranks, and the gathered-feature backward (all-reduce of the
gathered gradient) makes the result the gradient of the global-mean loss. Eq. 4 writes sums over
the batch; the mean only rescales the learning rate. All ranks must hold the same b.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mico_ds.distributed import all_gather_with_grad, get_rank

# "naive" materializes the (b, world*b) similarities (the reference); "torch" / "triton" are the tiled
# kernels of mico_ds.kernels.contrastive; "auto" (model.kernels): Triton on CUDA, tiled PyTorch elsewhere.
IMPLS = ("naive", "torch", "triton")


def resolve_impl(impl: str, device: torch.device) -> str:
    """The implementation the contrastive loss and the hard-negative mining run for tensors on
    ``device``: ``impl`` itself, or for "auto" Triton on CUDA and tiled PyTorch elsewhere."""
    if impl == "auto":
        return "triton" if device.type == "cuda" else "torch"
    if impl not in IMPLS:
        raise ValueError(f"objective implementation must be auto or one of {IMPLS}, got {impl!r}")
    return impl


def contrastive_loss(
    v_z: torch.Tensor,
    v_t: torch.Tensor,
    logit_scale: torch.Tensor,
    impl: str = "naive",
    tile: int = 1024,
) -> torch.Tensor:
    """Symmetric InfoNCE of this rank's rows against the all-gathered batch (MiCo Eq. 4).

    Args:
        v_z: (b, E) L2-normalized knowledge features of this rank.
        v_t: (b, E) L2-normalized text features of this rank (row i pairs with v_z row i).
        logit_scale: () the inverse temperature, already exp'ed and clamped.
        impl: "naive" materializes the (b, world*b) logits here; "torch" / "triton" delegate to the
            tiled kernel in ``mico_ds.kernels.contrastive`` (same semantics, no full logits); "auto":
            see :func:`resolve_impl`.
        tile: tile size of the tiled kernel.

    Returns:
        () loss, mean over the local rows of 0.5 * (CE z->t + CE t->z).
    """
    impl = resolve_impl(impl, v_z.device)
    if v_z.ndim != 2 or v_z.shape != v_t.shape:
        raise ValueError(f"v_z {tuple(v_z.shape)} and v_t {tuple(v_t.shape)} must both be (b, E)")
    if impl != "naive":
        from mico_ds.kernels.contrastive import contrastive_loss_tiled

        return contrastive_loss_tiled(v_z, v_t, logit_scale, tile=tile, impl=impl)
    b = v_z.shape[0]
    z_all = all_gather_with_grad(v_z)  # (world*b, E)
    t_all = all_gather_with_grad(v_t)
    labels = torch.arange(b, device=v_z.device) + get_rank() * b
    dtype = torch.promote_types(v_z.dtype, torch.float32)  # softmax in fp32 (or fp64) at least
    logits_z2t = (logit_scale * v_z @ t_all.T).to(dtype)  # (b, world*b)
    logits_t2z = (logit_scale * v_t @ z_all.T).to(dtype)
    return 0.5 * (F.cross_entropy(logits_z2t, labels) + F.cross_entropy(logits_t2z, labels))


@torch.no_grad()
def in_batch_top1(q_local: torch.Tensor, k_global: torch.Tensor, rank: int, tile: int = 4096) -> torch.Tensor:
    """Fraction of local queries whose best global key is their own pair (global column rank*b + i).

    The argmax runs over ``tile`` columns at a time, so the (b, N) similarities are never held whole;
    ties go to the lowest column, as with one ``argmax`` over the full row.
    """
    b = q_local.shape[0]
    target = torch.arange(b, device=q_local.device) + rank * b
    best = torch.full((b,), float("-inf"), dtype=torch.float32, device=q_local.device)
    best_idx = torch.zeros((b,), dtype=torch.long, device=q_local.device)
    for c0 in range(0, k_global.shape[0], tile):
        tile_max, tile_arg = (q_local.float() @ k_global[c0 : c0 + tile].float().T).max(dim=1)
        better = tile_max > best
        best = torch.where(better, tile_max, best)
        best_idx = torch.where(better, tile_arg + c0, best_idx)
    return (best_idx == target).float().mean()
