"""Triton kernels of the fused context embeddings (MiCo Eq. 1 and 3); see ``context_embed.py``.

Imported lazily: ``import triton`` and ``@triton.jit`` run only when the fused path is asked for.
Triton 3.x reads ``TRITON_INTERPRET`` when ``@triton.jit`` decorates a function, i.e. when this module
is first imported; ``INTERPRETED`` records which mode the kernels below were built in.

Layout: x, out, dout (B, L, D) contiguous; ctx/mod/pos indices (L,); src indices (B, L); tables
(rows, D) contiguous. One program owns a (BLOCK_L positions x BLOCK_D channels) tile and walks the
batch, so the shared table rows are read once per tile instead of once per sample (forward) and the
table gradients are reduced over the batch in registers before one atomic add per tile (backward).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton import knobs

INTERPRETED: bool = bool(knobs.runtime.interpret)

# E_Sam gradients are reduced per tile with a one-hot matmul when the table has at most this many
# rows (MiCo uses a handful of sources); larger tables fall back to one atomic add per (b, l) row.
MAX_ONEHOT_SAM_ROWS = 64


@triton.jit
def _context_embed_fwd_kernel(
    x_ptr,
    out_ptr,
    ctx_idx_ptr,
    mod_idx_ptr,
    pos_idx_ptr,
    e_ctx_ptr,
    e_mod_ptr,
    e_pos_ptr,
    src_idx_ptr,
    e_sam_ptr,
    B,
    L,
    D,
    stride_b,
    HAS_SAM: tl.constexpr,
    BLOCK_L: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid_l = tl.program_id(0)
    pid_d = tl.program_id(1)
    offs_l = pid_l * BLOCK_L + tl.arange(0, BLOCK_L)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_l = offs_l < L
    mask = mask_l[:, None] & (offs_d < D)[None, :]
    col = offs_d[None, :]
    ci = tl.load(ctx_idx_ptr + offs_l, mask=mask_l, other=0).to(tl.int64)
    mi = tl.load(mod_idx_ptr + offs_l, mask=mask_l, other=0).to(tl.int64)
    pi = tl.load(pos_idx_ptr + offs_l, mask=mask_l, other=0).to(tl.int64)
    # Shared (L, D) part of the embedding, summed once in fp32 and reused for every sample.
    emb = tl.load(e_ctx_ptr + ci[:, None] * D + col, mask=mask, other=0.0).to(tl.float32)
    emb += tl.load(e_mod_ptr + mi[:, None] * D + col, mask=mask, other=0.0).to(tl.float32)
    emb += tl.load(e_pos_ptr + pi[:, None] * D + col, mask=mask, other=0.0).to(tl.float32)
    tile = offs_l[:, None].to(tl.int64) * D + col
    # Walk the batch by advancing 64-bit pointers (B*L*D may exceed 2**31 elements).
    x_p = x_ptr + tile
    out_p = out_ptr + tile
    src_p = src_idx_ptr + offs_l
    for _ in range(B):
        y = tl.load(x_p, mask=mask, other=0.0).to(tl.float32) + emb
        if HAS_SAM:
            si = tl.load(src_p, mask=mask_l, other=0).to(tl.int64)
            y += tl.load(e_sam_ptr + si[:, None] * D + col, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_p, y.to(out_ptr.dtype.element_ty), mask=mask)
        x_p += stride_b
        out_p += stride_b
        src_p += L


@triton.jit
def _context_embed_bwd_kernel(
    dout_ptr,
    ctx_idx_ptr,
    mod_idx_ptr,
    pos_idx_ptr,
    src_idx_ptr,
    g_ctx_ptr,
    g_mod_ptr,
    g_pos_ptr,
    g_sam_ptr,
    B,
    L,
    D,
    stride_b,
    N_SAM,
    NEED_CTX: tl.constexpr,
    NEED_MOD: tl.constexpr,
    NEED_POS: tl.constexpr,
    NEED_SAM: tl.constexpr,
    SAM_ONEHOT: tl.constexpr,
    SAM_ROWS_PAD: tl.constexpr,
    BLOCK_L: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid_l = tl.program_id(0)
    pid_d = tl.program_id(1)
    offs_l = pid_l * BLOCK_L + tl.arange(0, BLOCK_L)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_l = offs_l < L
    mask_d = offs_d < D
    mask = mask_l[:, None] & mask_d[None, :]
    col = offs_d[None, :]
    tile = offs_l[:, None].to(tl.int64) * D + col
    acc = tl.zeros((BLOCK_L, BLOCK_D), dtype=tl.float32)  # sum over the batch of dout[:, l, d]
    if SAM_ONEHOT:
        rows = tl.arange(0, SAM_ROWS_PAD)
        acc_sam = tl.zeros((SAM_ROWS_PAD, BLOCK_D), dtype=tl.float32)
    dout_p = dout_ptr + tile
    src_p = src_idx_ptr + offs_l
    for _ in range(B):
        g = tl.load(dout_p, mask=mask, other=0.0).to(tl.float32)
        dout_p += stride_b
        acc += g
        if NEED_SAM:
            si = tl.load(src_p, mask=mask_l, other=-1).to(tl.int64)
            src_p += L
            if SAM_ONEHOT:
                # (rows, BLOCK_L) one-hot of the source ids times (BLOCK_L, BLOCK_D) gradient rows:
                # a per-tile scatter-add without atomics; masked positions carry id -1 (no row).
                onehot = (rows[:, None] == si[None, :]).to(tl.float32)
                acc_sam += tl.dot(onehot, g, input_precision="ieee")
            else:
                tl.atomic_add(g_sam_ptr + si[:, None] * D + col, g, mask=mask)
    if NEED_SAM and SAM_ONEHOT:
        sam_mask = (rows < N_SAM)[:, None] & mask_d[None, :]
        tl.atomic_add(g_sam_ptr + rows[:, None].to(tl.int64) * D + col, acc_sam, mask=sam_mask)
    # Several positions may share a table row (E_M has one row per modality), hence atomics.
    if NEED_CTX:
        ci = tl.load(ctx_idx_ptr + offs_l, mask=mask_l, other=0).to(tl.int64)
        tl.atomic_add(g_ctx_ptr + ci[:, None] * D + col, acc, mask=mask)
    if NEED_MOD:
        mi = tl.load(mod_idx_ptr + offs_l, mask=mask_l, other=0).to(tl.int64)
        tl.atomic_add(g_mod_ptr + mi[:, None] * D + col, acc, mask=mask)
    if NEED_POS:
        pi = tl.load(pos_idx_ptr + offs_l, mask=mask_l, other=0).to(tl.int64)
        tl.atomic_add(g_pos_ptr + pi[:, None] * D + col, acc, mask=mask)


def _blocks(L: int, D: int) -> tuple[int, int]:
    block_d = min(256, triton.next_power_of_2(D))
    block_l = 16  # tl.dot (one-hot E_Sam reduction) needs >= 16 along the reduced axis
    return block_l, block_d


def context_embed_fwd(
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
    """out = x + E_C[ctx] + E_M[mod] + E_Pos[pos] (+ E_Sam[src]); all inputs contiguous."""
    B, L, D = x.shape
    out = torch.empty_like(x)
    block_l, block_d = _blocks(L, D)
    grid = (triton.cdiv(L, block_l), triton.cdiv(D, block_d))
    has_sam = src_idx is not None
    _context_embed_fwd_kernel[grid](
        x,
        out,
        ctx_idx,
        mod_idx,
        pos_idx,
        e_ctx,
        e_mod,
        e_pos,
        src_idx if has_sam else ctx_idx,  # unused pointer when HAS_SAM is false
        e_sam if has_sam else e_ctx,
        B,
        L,
        D,
        L * D,
        HAS_SAM=has_sam,
        BLOCK_L=block_l,
        BLOCK_D=block_d,
    )
    return out


def context_embed_bwd_tables(
    dout: torch.Tensor,
    ctx_idx: torch.Tensor,
    mod_idx: torch.Tensor,
    pos_idx: torch.Tensor,
    src_idx: torch.Tensor | None,
    table_rows: tuple[int, int, int, int],
    need: tuple[bool, bool, bool, bool],
) -> tuple[torch.Tensor | None, ...]:
    """fp32 gradients of (E_C, E_M, E_Pos, E_Sam) from one pass over ``dout`` (None where not needed)."""
    B, L, D = dout.shape
    grads = [
        torch.zeros((rows, D), dtype=torch.float32, device=dout.device) if n else None
        for rows, n in zip(table_rows, need)
    ]
    dummy = torch.empty((1,), dtype=torch.float32, device=dout.device)
    need_sam = need[3] and src_idx is not None
    n_sam = table_rows[3]
    onehot = n_sam <= MAX_ONEHOT_SAM_ROWS
    block_l, block_d = _blocks(L, D)
    grid = (triton.cdiv(L, block_l), triton.cdiv(D, block_d))
    _context_embed_bwd_kernel[grid](
        dout,
        ctx_idx,
        mod_idx,
        pos_idx,
        src_idx if src_idx is not None else ctx_idx,
        *[g if g is not None else dummy for g in grads],
        B,
        L,
        D,
        L * D,
        n_sam,
        NEED_CTX=need[0],
        NEED_MOD=need[1],
        NEED_POS=need[2],
        NEED_SAM=need_sam,
        SAM_ONEHOT=onehot,
        SAM_ROWS_PAD=max(16, triton.next_power_of_2(max(n_sam, 1))),
        BLOCK_L=block_l,
        BLOCK_D=block_d,
    )
    return tuple(grads)
