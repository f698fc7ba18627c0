"""model.norm_impl / optim.impl: the auto resolution, and the norm swap on a real MiCo model (CPU).

The apex kernels themselves run in tests/gpu/test_apex_norms.py, where apex and CUDA exist.
"""

from __future__ import annotations

import copy

import pytest
import torch
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from mico_ds.kernels.norms import (
    FusedRMSNorm,
    apex_import_error,
    resolve_norm_impl,
    swap_norms,
)
from mico_ds.models.mico import MiCoModel
from mico_ds.optim import resolve_optim_impl
from tests.helpers.tiny import make_random_batch, make_tiny_config, make_tiny_special

APEX_MISSING = "apex.normalization.fused_layer_norm: ModuleNotFoundError: No module named 'apex'"


@pytest.mark.parametrize(
    ("impl", "cuda", "apex_error", "want"),
    [
        ("auto", True, None, "apex"),
        ("auto", True, APEX_MISSING, "torch"),
        ("auto", False, None, "torch"),
        ("auto", False, APEX_MISSING, "torch"),
        ("torch", True, None, "torch"),
        ("apex", True, None, "apex"),
    ],
)
def test_norm_impl_resolution(impl: str, cuda: bool, apex_error: str | None, want: str) -> None:
    assert resolve_norm_impl(impl, cuda, apex_error) == want


def test_norm_impl_apex_where_it_cannot_run_names_why() -> None:
    with pytest.raises(RuntimeError, match="No module named 'apex'.*--cuda_ext"):
        resolve_norm_impl("apex", True, APEX_MISSING)
    with pytest.raises(RuntimeError, match="needs CUDA"):
        resolve_norm_impl("apex", False, None)
    with pytest.raises(ValueError, match="auto|apex|torch.*'fused'"):
        resolve_norm_impl("fused", True, None)


def test_apex_probe_reports_this_machine() -> None:
    # No apex here (it is never installed from PyPI): the probe names the missing module.
    err = apex_import_error()
    try:
        import fused_layer_norm_cuda  # noqa: F401

        assert err is None
    except ImportError:
        assert err is not None and ("apex" in err or "fused_layer_norm_cuda" in err)


@pytest.mark.parametrize(
    ("impl", "cuda", "apex_error", "offload", "want"),
    [
        ("auto", True, None, False, "apex"),
        ("auto", True, "amp_C: ModuleNotFoundError", False, "torch"),
        ("auto", False, None, False, "torch"),
        ("auto", True, None, True, "deepspeed_cpu"),
        ("torch", False, None, True, "deepspeed_cpu"),
        ("deepspeed", True, "x", False, "deepspeed"),
    ],
)
def test_optim_impl_resolution(
    impl: str, cuda: bool, apex_error: str | None, offload: bool, want: str
) -> None:
    assert resolve_optim_impl(impl, cuda, apex_error, offload) == want


def test_optim_impl_errors() -> None:
    with pytest.raises(RuntimeError, match="amp_C"):
        resolve_optim_impl("apex", True, "amp_C: ModuleNotFoundError", False)
    with pytest.raises(RuntimeError, match="needs CUDA"):
        resolve_optim_impl("deepspeed", False, None, False)
    with pytest.raises(ValueError, match="offloaded"):
        resolve_optim_impl("apex", True, None, True)


def _model() -> MiCoModel:
    torch.manual_seed(0)
    model = MiCoModel.from_run_config(make_tiny_config(), make_tiny_special())
    model.objective_impl = "naive"
    return model


def test_torch_swap_keeps_parameters_keys_and_every_bit() -> None:
    ref = _model().train()
    model = copy.deepcopy(ref)
    params_before = dict(model.named_parameters())
    keys_before = list(model.state_dict())
    n_rms = sum(isinstance(m, LlamaRMSNorm) for m in model.modules())
    n_ln = sum(isinstance(m, torch.nn.LayerNorm) for m in model.modules())
    assert n_rms == 2 * 2 + 1 and n_ln > 0  # 2 per decoder layer, 2 layers, + the final norm

    counts = swap_norms(model, "torch")

    assert counts == {"RMSNorm->torch": n_rms, "LayerNorm kept": n_ln}
    assert not any(isinstance(m, LlamaRMSNorm) for m in model.modules())
    assert sum(isinstance(m, FusedRMSNorm) for m in model.modules()) == n_rms
    assert list(model.state_dict()) == keys_before
    after = dict(model.named_parameters())
    assert after.keys() == params_before.keys()
    assert all(after[k] is params_before[k] for k in after)  # the same Parameter objects

    batch = make_random_batch(make_tiny_config(), ["image", "audio"], batch_size=4, seed=3, joined=True)
    out_ref, _ = ref(batch, step=1)
    out, _ = model(batch, step=1)
    for k in out_ref:
        assert torch.equal(out[k], out_ref[k]), k
    out_ref["loss"].backward()
    out["loss"].backward()
    ref_grads = dict(ref.named_parameters())
    for name, p in model.named_parameters():
        g_ref = ref_grads[name].grad
        assert (p.grad is None) == (g_ref is None), name
        if p.grad is not None:
            assert torch.equal(p.grad, g_ref), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_rmsnorm_matches_llama_rmsnorm(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(0)
    ref = LlamaRMSNorm(48, eps=1e-6).to(dtype)
    ref.weight.data.copy_(torch.randn(48, generator=g))
    x = torch.randn(3, 7, 48, generator=g).to(dtype)
    fused = FusedRMSNorm(ref.weight, 1e-6, "torch")
    assert fused(x).dtype == ref(x).dtype
    assert torch.equal(fused(x), ref(x))


def test_swapping_twice_is_an_error() -> None:
    model = _model()
    swap_norms(model, "torch")
    with pytest.raises(ValueError, match="already swapped"):
        swap_norms(model, "torch")
    with pytest.raises(ValueError, match="resolve 'auto' first"):
        swap_norms(_model(), "auto")
