"""Fused context embeddings (MiCo Eq. 1 and 3) against the eager reference and an fp64 oracle."""

from __future__ import annotations

import pytest
import torch

from mico_ds.kernels import context_embed, context_embed_reference

# (B, L, D, rows of E_C, E_M, E_Pos, E_Sam): odd sizes, sizes past one block (BLOCK_L=16,
# BLOCK_D<=256), B=1, and an E_Sam larger than the one-hot reduction handles (atomic fallback).
SHAPES = [
    (1, 1, 1, 1, 1, 1, 1),
    (2, 37, 45, 5, 2, 40, 3),
    (3, 16, 256, 16, 3, 16, 8),
    (2, 19, 300, 7, 4, 25, 100),
]
F32 = torch.float32
DTYPES = [(torch.float32, torch.float32), (torch.bfloat16, torch.float32), (torch.bfloat16, torch.bfloat16)]


def _inputs(shape, x_dtype, t_dtype, with_sam, g, device):
    B, L, D, n_ctx, n_mod, n_pos, n_sam = shape
    x = torch.randn(B, L, D, generator=g).to(device, x_dtype).requires_grad_()
    # Indices with repeats (several positions per E_M row, random E_Pos rows) to exercise the
    # scatter-add of the table gradients.
    idx = [torch.randint(0, n, (L,), generator=g).to(device) for n in (n_ctx, n_mod, n_pos)]
    rows = (n_ctx, n_mod, n_pos, n_sam)
    tables = [torch.randn(n, D, generator=g).to(device, t_dtype).requires_grad_() for n in rows]
    src = torch.randint(0, n_sam, (B, L), generator=g).to(device) if with_sam else None
    return x, idx, tables[:3], src, tables[3] if with_sam else None


def _oracle(x, idx, tables, src, e_sam):
    """fp64 forward and analytic gradients (independent of autograd): dE[r] = sum of dout rows -> r."""
    B, L, D = x.shape
    out = x.double() + sum(t.double()[i] for t, i in zip(tables, idx))
    if src is not None:
        out = out + e_sam.double()[src]
    return out


def _oracle_grads(dout, idx, tables, src, e_sam):
    d = dout.double()
    per_pos = d.sum(0)  # (L, D): ctx/mod/pos indices are shared by the batch
    grads = [torch.zeros_like(t, dtype=torch.float64).index_add_(0, i, per_pos) for t, i in zip(tables, idx)]
    if src is not None:
        g_sam = torch.zeros_like(e_sam, dtype=torch.float64)
        grads.append(g_sam.index_add_(0, src.reshape(-1), d.flatten(0, 1)))
    return grads


def _tol(dtype: torch.dtype, magnitude: float = 1.0) -> dict:
    # bf16 keeps 8 bits of mantissa: one rounding of a value of this magnitude is ~ 2**-8 relative.
    if dtype == torch.bfloat16:
        return dict(atol=2**-7 * magnitude, rtol=2**-7)
    return dict(atol=1e-5 * magnitude, rtol=1e-5)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s[:3])))
@pytest.mark.parametrize("dtypes", DTYPES, ids=lambda d: f"{str(d[0])[6:]}-{str(d[1])[6:]}")
@pytest.mark.parametrize("with_sam", [False, True], ids=["nosam", "sam"])
def test_fused_matches_reference_and_fp64(shape, dtypes, with_sam, rng, triton_device):
    x_dtype, t_dtype = dtypes
    x, idx, tables, src, e_sam = _inputs(shape, x_dtype, t_dtype, with_sam, rng, triton_device)
    params = [x, *tables] + ([e_sam] if with_sam else [])
    out = context_embed(x, *idx, *tables, src, e_sam, impl="triton")
    ref = context_embed_reference(x, *idx, *tables, src, e_sam)
    assert out.dtype == x_dtype and out.shape == x.shape
    exact = _oracle(x, idx, tables, src, e_sam)
    # The fused path adds in fp32 and rounds once: within one rounding of the exact sum.
    torch.testing.assert_close(out.double(), exact, **_tol(x_dtype, 4.0))
    torch.testing.assert_close(out.float(), ref.float(), **_tol(x_dtype, 8.0))

    dout = torch.randn(x.shape, generator=rng).to(triton_device, x_dtype)
    grads = torch.autograd.grad(out, params, dout)
    ref_grads = torch.autograd.grad(ref, params, dout)
    exact_grads = _oracle_grads(dout, idx, tables, src, e_sam)
    assert torch.equal(grads[0], dout)  # d out / d x is the identity
    B = x.shape[0]
    names = ("e_ctx", "e_mod", "e_pos", "e_sam")
    for name, g, rg, eg, p in zip(names, grads[1:], ref_grads[1:], exact_grads, params[1:]):
        assert g.dtype == p.dtype, name
        # A table row sums up to B*L gradient rows of unit scale: scale the tolerance with that.
        mag = float((B * x.shape[1]) ** 0.5) + 1.0
        # fp32 accumulation then one cast to the table dtype.
        torch.testing.assert_close(g.double(), eg, **_tol(t_dtype, mag), msg=name)
        # The reference accumulates in the table dtype (and, for bf16 x, from bf16 dout).
        ref_dtype = t_dtype if x_dtype == F32 else torch.bfloat16
        torch.testing.assert_close(g.float(), rg.float(), **_tol(ref_dtype, 4 * mag), msg=name)


def test_frozen_tables_and_no_input_grad(rng, triton_device):
    x, idx, tables, src, e_sam = _inputs((2, 20, 33, 4, 2, 20, 3), F32, F32, True, rng, triton_device)
    tables[1].requires_grad_(False)  # a frozen E_M: no gradient computed or returned for it
    x = x.detach()
    out = context_embed(x, *idx, *tables, src, e_sam, impl="triton")
    ref = context_embed_reference(x, *idx, *tables, src, e_sam)
    params = [tables[0], tables[2], e_sam]
    g = torch.autograd.grad(out.square().sum(), params)
    rg = torch.autograd.grad(ref.square().sum(), params)
    for a, b in zip(g, rg):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-5)


def test_auto_and_torch_use_the_reference_on_cpu(rng):
    x, idx, tables, src, e_sam = _inputs((2, 9, 13, 3, 2, 9, 2), F32, F32, True, rng, "cpu")
    ref = context_embed_reference(x, *idx, *tables, src, e_sam)
    for impl in ("auto", "torch"):
        assert torch.equal(context_embed(x, *idx, *tables, src, e_sam, impl=impl), ref)


def test_triton_on_cpu_without_interpreter_is_a_clear_error(rng, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    x, idx, tables, src, e_sam = _inputs((1, 4, 8, 2, 2, 4, 2), F32, F32, False, rng, "cpu")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        context_embed(x, *idx, *tables, impl="triton")


def test_bad_arguments_raise_value_errors(rng):
    x, idx, tables, src, e_sam = _inputs((2, 6, 8, 2, 2, 6, 2), F32, F32, True, rng, "cpu")
    with pytest.raises(ValueError, match="impl"):
        context_embed(x, *idx, *tables, impl="cuda")
    with pytest.raises(ValueError, match="pos_idx"):
        context_embed(x, idx[0], idx[1], idx[2][:3], *tables)
    with pytest.raises(ValueError, match="e_mod"):
        context_embed(x, *idx, tables[0], tables[1][:, :5], tables[2])
    with pytest.raises(ValueError, match="src_idx must be"):
        context_embed(x, *idx, *tables, src[:1], e_sam)
    with pytest.raises(ValueError, match="E_Sam"):
        context_embed(x, *idx, *tables, src, None)
    with pytest.raises(ValueError, match=r"\(B, L, D\)"):
        context_embed(x[0], *idx, *tables)
