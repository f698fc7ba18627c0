"""Triton kernels of the tiled contrastive loss (MiCo Eq. 4); see ``contrastive.py``.

Flash-attention-style, without a value matrix: per block of local rows q (BLOCK_M, E) against the
rows k (n, E) of one gathered chunk,
  * ``lse_block``: logits s q k^T computed block by block on chip, reduced with an online
    log-sum-exp, written as one fp32 number per row;
  * ``bwd_block``: recompute the logits, G = coef * exp(s q k^T - lse); dq = s G k and the row sums of
    G * q k^T (for ds) in a row-block kernel, dk = s G^T q in a column-block kernel (two kernels
    instead of atomics, so the result is deterministic).
Neither kernel writes a logits tile to memory. Block sizes are fixed and untuned (no GPU was
available when they were written); the full feature width is held on chip in the backward, padded
to a power of two (E=1024 -> BLOCK 16 x 1024 per operand).

Imported lazily; ``INTERPRETED`` records whether ``@triton.jit`` ran under TRITON_INTERPRET=1.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton import knobs

INTERPRETED: bool = bool(knobs.runtime.interpret)


@triton.jit
def _dot(a, b, PREC: tl.constexpr, UPCAST: tl.constexpr):
    """a @ b with fp32 accumulation. UPCAST (interpreter with bf16 operands only): triton 3.8's
    interpreter multiplies bf16 tensors as their uint16 storage, so the operands, already rounded
    to bf16, are widened to fp32 first; bf16 x bf16 products are exact in fp32, so this matches the
    tensor-core result up to summation order."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b, input_precision=PREC)


@triton.jit
def _lse_fwd_kernel(
    q_ptr,
    k_ptr,
    s_ptr,
    lse_ptr,
    M,
    N,
    E,
    stride_q,
    stride_k,
    PREC: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_E: tl.constexpr,
):
    pid = tl.program_id(0)
    offs_m = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    s = tl.load(s_ptr).to(tl.float32)
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for e0 in range(0, E, BLOCK_E):
            offs_e = e0 + tl.arange(0, BLOCK_E)
            mask_e = offs_e < E
            q = tl.load(
                q_ptr + offs_m[:, None].to(tl.int64) * stride_q + offs_e[None, :],
                mask=mask_m[:, None] & mask_e[None, :],
                other=0.0,
            )
            k = tl.load(
                k_ptr + offs_n[:, None].to(tl.int64) * stride_k + offs_e[None, :],
                mask=mask_n[:, None] & mask_e[None, :],
                other=0.0,
            )
            acc += _dot(q, tl.trans(k), PREC, UPCAST)
        logits = tl.where(mask_n[None, :], acc * s, float("-inf"))
        # Online log-sum-exp: every tile has a valid column, so m_new is finite after the first.
        m_new = tl.maximum(m_i, tl.max(logits, axis=1))
        l_i = l_i * tl.exp(m_i - m_new) + tl.sum(tl.exp(logits - m_new[:, None]), axis=1)
        m_i = m_new
    tl.store(lse_ptr + offs_m, m_i + tl.log(l_i), mask=mask_m)


@triton.jit
def _bwd_dq_kernel(
    q_ptr,
    k_ptr,
    s_ptr,
    lse_ptr,
    coef_ptr,
    dq_ptr,
    ds_ptr,
    M,
    N,
    E,
    stride_q,
    stride_k,
    PREC: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    E_PAD: tl.constexpr,
):
    pid = tl.program_id(0)
    offs_m = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_e = tl.arange(0, E_PAD)
    mask_m = offs_m < M
    mask_e = offs_e < E
    s = tl.load(s_ptr).to(tl.float32)
    coef = tl.load(coef_ptr).to(tl.float32)
    q = tl.load(
        q_ptr + offs_m[:, None].to(tl.int64) * stride_q + offs_e[None, :],
        mask=mask_m[:, None] & mask_e[None, :],
        other=0.0,
    )
    lse = tl.load(lse_ptr + offs_m, mask=mask_m, other=0.0)
    dq = tl.zeros((BLOCK_M, E_PAD), dtype=tl.float32)
    ds_rows = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        k = tl.load(
            k_ptr + offs_n[:, None].to(tl.int64) * stride_k + offs_e[None, :],
            mask=mask_n[:, None] & mask_e[None, :],
            other=0.0,
        )
        raw = _dot(q, tl.trans(k), PREC, UPCAST)  # (BLOCK_M, BLOCK_N) <q_i, k_j>
        g = tl.exp(raw * s - lse[:, None]) * coef
        g = tl.where(mask_m[:, None] & mask_n[None, :], g, 0.0)
        ds_rows += tl.sum(g * raw, axis=1)
        dq += _dot(g.to(k.dtype), k, PREC, UPCAST)
    tl.store(
        dq_ptr + offs_m[:, None].to(tl.int64) * E + offs_e[None, :],
        dq * s,
        mask=mask_m[:, None] & mask_e[None, :],
    )
    tl.store(ds_ptr + offs_m, ds_rows, mask=mask_m)


@triton.jit
def _bwd_dk_kernel(
    q_ptr,
    k_ptr,
    s_ptr,
    lse_ptr,
    coef_ptr,
    dk_ptr,
    M,
    N,
    E,
    stride_q,
    stride_k,
    PREC: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    E_PAD: tl.constexpr,
):
    pid = tl.program_id(0)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_e = tl.arange(0, E_PAD)
    mask_n = offs_n < N
    mask_e = offs_e < E
    s = tl.load(s_ptr).to(tl.float32)
    coef = tl.load(coef_ptr).to(tl.float32)
    k = tl.load(
        k_ptr + offs_n[:, None].to(tl.int64) * stride_k + offs_e[None, :],
        mask=mask_n[:, None] & mask_e[None, :],
        other=0.0,
    )
    dk = tl.zeros((BLOCK_N, E_PAD), dtype=tl.float32)
    for m0 in range(0, M, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        mask_m = offs_m < M
        q = tl.load(
            q_ptr + offs_m[:, None].to(tl.int64) * stride_q + offs_e[None, :],
            mask=mask_m[:, None] & mask_e[None, :],
            other=0.0,
        )
        lse = tl.load(lse_ptr + offs_m, mask=mask_m, other=0.0)
        raw = _dot(q, tl.trans(k), PREC, UPCAST)
        g = tl.exp(raw * s - lse[:, None]) * coef
        g = tl.where(mask_m[:, None] & mask_n[None, :], g, 0.0)
        dk += _dot(tl.trans(g).to(q.dtype), q, PREC, UPCAST)
    tl.store(
        dk_ptr + offs_n[:, None].to(tl.int64) * E + offs_e[None, :],
        dk * s,
        mask=mask_n[:, None] & mask_e[None, :],
    )


def _prec(x: torch.Tensor) -> str:
    # fp32 features: exact fp32 products (TF32 would cost ~1e-3 relative on logits scaled by s ~ 100).
    return "ieee" if x.dtype == torch.float32 else "tf32"


def _upcast(x: torch.Tensor) -> bool:
    return INTERPRETED and x.dtype != torch.float32


def _rows(x: torch.Tensor) -> torch.Tensor:
    """Rows with unit stride along E (a column slice of the packed [Z | T] chunk keeps its row stride)."""
    return x if x.stride(1) == 1 else x.contiguous()


def _bwd_blocks(E: int) -> tuple[int, int, int, int]:
    e_pad = max(16, triton.next_power_of_2(E))
    block = 32 if e_pad <= 256 else 16  # the backward holds (block x E_PAD) operands on chip
    return block, block, e_pad, 4 if e_pad <= 256 else 8


def lse_block(q: torch.Tensor, k_rows: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """(M,) fp32 log-sum-exp over rows j of k_rows of s <q_i, k_j>; q (M, E), k_rows (N, E)."""
    q, k_rows = _rows(q), _rows(k_rows.to(q.dtype))
    M, E = q.shape
    lse = torch.empty((M,), dtype=torch.float32, device=q.device)
    block_m, block_n = 64, 64
    block_e = min(64, max(16, triton.next_power_of_2(E)))
    _lse_fwd_kernel[(triton.cdiv(M, block_m),)](
        q,
        k_rows,
        s.reshape(1),
        lse,
        M,
        k_rows.shape[0],
        E,
        q.stride(0),
        k_rows.stride(0),
        PREC=_prec(q),
        UPCAST=_upcast(q),
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_E=block_e,
    )
    return lse


def bwd_block(
    q: torch.Tensor, k_rows: torch.Tensor, s: torch.Tensor, lse: torch.Tensor, coef: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of coef * sum_i lse_i over this chunk: (dq (M, E), dk (N, E), ds ()) in fp32."""
    q, k_rows = _rows(q), _rows(k_rows.to(q.dtype))
    M, E = q.shape
    N = k_rows.shape[0]
    block_m, block_n, e_pad, warps = _bwd_blocks(E)
    dq = torch.empty((M, E), dtype=torch.float32, device=q.device)
    dk = torch.empty((N, E), dtype=torch.float32, device=q.device)
    ds_rows = torch.empty((M,), dtype=torch.float32, device=q.device)
    s1, c1, lse = s.reshape(1), coef.reshape(1).float(), lse.contiguous()
    common = dict(
        PREC=_prec(q), UPCAST=_upcast(q), BLOCK_M=block_m, BLOCK_N=block_n, E_PAD=e_pad, num_warps=warps
    )
    _bwd_dq_kernel[(triton.cdiv(M, block_m),)](
        q, k_rows, s1, lse, c1, dq, ds_rows, M, N, E, q.stride(0), k_rows.stride(0), **common
    )
    _bwd_dk_kernel[(triton.cdiv(N, block_n),)](
        q, k_rows, s1, lse, c1, dk, M, N, E, q.stride(0), k_rows.stride(0), **common
    )
    return dq, dk, ds_rows.sum()
