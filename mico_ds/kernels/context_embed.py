"""Context embeddings of the multimodal context (MiCo Eq. 1 and 3), behind one function.

    out[b, l] = x[b, l] + E_C[ctx_idx[l]] + E_M[mod_idx[l]] + E_Pos[pos_idx[l]] (+ E_Sam[src_idx[b, l]])

Shapes: x (B, L, D); ctx_idx, mod_idx, pos_idx (L,) int64 (the same for every sample of a batch,
since batches are homogeneous in modalities); src_idx (B, L) int64 or None; tables (rows, D).
The pure-PyTorch reference below is the CPU path and the test oracle for the fused kernel.

The fused path (``_triton_context_embed``) reads x once and writes out once in the forward; its
backward passes dout through as dx and reduces dout over the batch into fp32 table gradients in the
same single pass (the shared per-position indices make dE_C, dE_M, dE_Pos sums over B of dout rows).
"""

from __future__ import annotations

from typing import Any

import torch

from mico_ds.kernels._backend import load_triton_module, use_triton


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


class _FusedContextEmbed(torch.autograd.Function):
    """Triton forward (one pass over x) and backward (one pass over dout, fp32 table-grad reduction)."""

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        ctx_idx: torch.Tensor,
        mod_idx: torch.Tensor,
        pos_idx: torch.Tensor,
        e_ctx: torch.Tensor,
        e_mod: torch.Tensor,
        e_pos: torch.Tensor,
        src_idx: torch.Tensor | None,
        e_sam: torch.Tensor | None,
    ) -> torch.Tensor:
        tk = load_triton_module("_triton_context_embed")
        idx = [i.contiguous() for i in (ctx_idx, mod_idx, pos_idx)]
        src = src_idx.contiguous() if src_idx is not None else None
        tables = [t.contiguous() for t in (e_ctx, e_mod, e_pos)]
        sam = e_sam.contiguous() if e_sam is not None else None
        out = tk.context_embed_fwd(x.contiguous(), *idx, *tables, src, sam)
        ctx.save_for_backward(*idx, src)
        ctx.tables = [(t.shape[0], t.dtype) if t is not None else (0, None) for t in (*tables, sam)]
        return out

    @staticmethod
    def backward(ctx: Any, dout: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        tk = load_triton_module("_triton_context_embed")
        ctx_idx, mod_idx, pos_idx, src_idx = ctx.saved_tensors
        n = ctx.needs_input_grad
        need = (n[4], n[5], n[6], n[8] and src_idx is not None)
        grads: tuple[torch.Tensor | None, ...] = (None,) * 4
        if any(need):
            rows = tuple(r for r, _ in ctx.tables)
            grads = tk.context_embed_bwd_tables(
                dout.contiguous(), ctx_idx, mod_idx, pos_idx, src_idx, rows, need
            )
        g_ctx, g_mod, g_pos, g_sam = (
            g.to(dt) if g is not None else None for g, (_, dt) in zip(grads, ctx.tables)
        )
        dx = dout if n[0] else None  # d out / d x is the identity
        return dx, None, None, None, g_ctx, g_mod, g_pos, None, g_sam


def _check_shapes(
    x: torch.Tensor,
    ctx_idx: torch.Tensor,
    mod_idx: torch.Tensor,
    pos_idx: torch.Tensor,
    tables: dict[str, torch.Tensor],
    src_idx: torch.Tensor | None,
    e_sam: torch.Tensor | None,
) -> None:
    if x.ndim != 3:
        raise ValueError(f"context_embed: x must be (B, L, D), got shape {tuple(x.shape)}")
    B, L, D = x.shape
    for name, idx in (("ctx_idx", ctx_idx), ("mod_idx", mod_idx), ("pos_idx", pos_idx)):
        if idx.shape != (L,):
            raise ValueError(f"context_embed: {name} must be (L,)=({L},), got {tuple(idx.shape)}")
    for name, t in tables.items():
        if t.ndim != 2 or t.shape[1] != D:
            raise ValueError(f"context_embed: table {name} must be (rows, {D}), got {tuple(t.shape)}")
    if (src_idx is None) != (e_sam is None) and src_idx is not None:
        raise ValueError("context_embed: src_idx given without the E_Sam table (e_sam=None)")
    if src_idx is not None and src_idx.shape != (B, L):
        raise ValueError(f"context_embed: src_idx must be (B, L)=({B}, {L}), got {tuple(src_idx.shape)}")


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
    "triton" on CPU tensors runs in Triton's interpreter and needs ``TRITON_INTERPRET=1`` (tests).
    Activations fp32 or bf16, tables fp32 or bf16; the fused path adds in fp32 and rounds once, and
    accumulates table gradients in fp32 before casting them to each table's dtype. Indices are not
    range-checked on the fused path (that would cost a host sync).
    """
    tables = {"e_ctx": e_ctx, "e_mod": e_mod, "e_pos": e_pos}
    if e_sam is not None:
        tables["e_sam"] = e_sam
    _check_shapes(x, ctx_idx, mod_idx, pos_idx, tables, src_idx, e_sam)
    if use_triton(impl, x.device, "context_embed"):
        if src_idx is None:
            e_sam = None  # a table without indices contributes nothing (as in the reference)
        return _FusedContextEmbed.apply(x, ctx_idx, mod_idx, pos_idx, e_ctx, e_mod, e_pos, src_idx, e_sam)
    return context_embed_reference(x, ctx_idx, mod_idx, pos_idx, e_ctx, e_mod, e_pos, src_idx, e_sam)
