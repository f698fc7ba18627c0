"""Fused norms on CUDA (model.norm_impl): PyTorch's F.rms_norm everywhere, NVIDIA apex's kernels
where apex is installed (built from source; skipped elsewhere), against the modules they replace."""

from __future__ import annotations

import pytest
import torch
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from mico_ds.kernels.norms import ApexLayerNorm, FusedRMSNorm, apex_import_error, resolve_norm_impl

needs_apex = pytest.mark.skipif(apex_import_error() is not None, reason=f"apex: {apex_import_error()}")
DTYPES = [torch.float32, torch.bfloat16]


def _tol(dtype: torch.dtype) -> dict:
    return dict(atol=2e-2, rtol=2e-2) if dtype == torch.bfloat16 else dict(atol=1e-5, rtol=1e-5)


def _fwd_bwd(module: torch.nn.Module, x: torch.Tensor, dout: torch.Tensor) -> list[torch.Tensor]:
    x = x.detach().requires_grad_()
    y = module(x)
    y.backward(dout)
    grads = [x.grad] + [p.grad for p in module.parameters()]
    for p in module.parameters():
        p.grad = None
    return [y.detach(), *grads]


def _rms_pair(dtype: torch.dtype, impl: str, D: int = 4096):
    ref = LlamaRMSNorm(D, eps=1e-5).cuda().to(dtype)
    with torch.no_grad():
        ref.weight.normal_()
    return ref, FusedRMSNorm(ref.weight, 1e-5, impl)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("impl", ["torch", pytest.param("apex", marks=needs_apex)])
def test_rmsnorm_matches_llama(dtype: torch.dtype, impl: str) -> None:
    ref, fused = _rms_pair(dtype, impl)
    x = torch.randn(4, 333, 4096, device="cuda", dtype=dtype)
    dout = torch.randn_like(x)
    want = _fwd_bwd(ref, x, dout)
    got = _fwd_bwd(fused, x, dout)  # the same Parameter: its gradient was reset in between
    for name, g, w in zip(["out", "dx", "dweight"], got, want):
        torch.testing.assert_close(g.float(), w.float(), **_tol(dtype), msg=name)


@needs_apex
@pytest.mark.parametrize("dtype", DTYPES)
def test_apex_layernorm_matches_torch(dtype: torch.dtype) -> None:
    ref = torch.nn.LayerNorm(1408, eps=1e-6).cuda().to(dtype)
    with torch.no_grad():
        ref.weight.normal_()
        ref.bias.normal_()
    x = torch.randn(8, 257, 1408, device="cuda", dtype=dtype)
    dout = torch.randn_like(x)
    want = _fwd_bwd(ref, x, dout)
    got = _fwd_bwd(ApexLayerNorm(ref), x, dout)
    for name, g, w in zip(["out", "dx", "dweight", "dbias"], got, want):
        torch.testing.assert_close(g.float(), w.float(), **_tol(dtype), msg=name)


def test_auto_resolution_on_this_gpu() -> None:
    want = "apex" if apex_import_error() is None else "torch"
    assert resolve_norm_impl("auto", torch.cuda.is_available(), apex_import_error()) == want
