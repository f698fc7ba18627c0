"""Fused normalization layers, swapped into a built model from outside it (``model.norm_impl``).

The model code builds timm ``LayerNorm`` (ViT, context fusion) and transformers ``LlamaRMSNorm``
(text branch) as their authors wrote them; :func:`swap_norms` replaces each by an adapter that owns
the *same* ``weight``/``bias`` Parameter objects under the same names, so state-dict keys, ZeRO-3
partitions (``ds_shape``, ``ds_id``) and pretrained loading are untouched. Implementations:

* ``apex``: NVIDIA apex's fused CUDA kernels (``fused_layer_norm_affine``, ``fused_rms_norm_affine``:
  one kernel forward, one backward, fp32 statistics). CUDA only; apex is built from source, never
  installed from PyPI (the PyPI ``apex`` is an unrelated package).
* ``torch``: PyTorch's own fused ops. LayerNorm already calls ``F.layer_norm`` (one kernel) and is
  kept; RMSNorm becomes ``F.rms_norm`` on the fp32 upcast, which is bitwise what ``LlamaRMSNorm``
  computes on CPU (tested) with one kernel instead of five on CUDA.
* ``auto``: ``apex`` on CUDA when apex imports, else ``torch``.
"""

from __future__ import annotations

import functools
import importlib
from collections import Counter

import torch
import torch.nn.functional as F
from torch import nn

NORM_IMPLS = ("auto", "apex", "torch")


APEX_NORM_MODULES = ("apex.normalization.fused_layer_norm", "fused_layer_norm_cuda")
APEX_ADAM_MODULES = ("apex.optimizers", "amp_C")


@functools.cache
def apex_import_error(modules: tuple[str, ...] = APEX_NORM_MODULES) -> str | None:
    """None when every module imports, else the reason (cached).

    apex's Python modules import without its CUDA extensions (they load them at the first call), so
    the extension itself (``fused_layer_norm_cuda``, ``amp_C``) is part of the check.
    """
    for name in modules:
        try:
            importlib.import_module(name)
        except Exception as e:  # ImportError, or a broken build raising anything at import
            return f"{name}: {type(e).__name__}: {e}"
    return None


def resolve_norm_impl(impl: str, cuda: bool, apex_error: str | None) -> str:
    """``model.norm_impl`` -> "apex" | "torch" for a run on CUDA (``cuda``) or not.

    ``apex_error`` is :func:`apex_import_error`'s answer (an argument, so the choice is testable
    anywhere); "apex" is an error where it cannot run, naming why.
    """
    if impl not in NORM_IMPLS:
        raise ValueError(f"model.norm_impl must be one of {'|'.join(NORM_IMPLS)}, got {impl!r}")
    if impl == "auto":
        return "apex" if cuda and apex_error is None else "torch"
    if impl == "apex":
        if apex_error is not None:
            raise RuntimeError(
                f"model.norm_impl=apex but apex's fused norms cannot be imported ({apex_error}); build "
                "NVIDIA apex from source with --cuda_ext (github.com/NVIDIA/apex), or use auto|torch"
            )
        if not cuda:
            raise RuntimeError("model.norm_impl=apex needs CUDA (apex's fused norms are CUDA kernels)")
    return impl


def _true_shape(p: torch.Tensor) -> tuple[int, ...]:
    """A parameter's full shape, also when ZeRO-3 has partitioned it (its ``.shape`` is then (0,))."""
    return tuple(getattr(p, "ds_shape", p.shape))


class ApexLayerNorm(nn.Module):
    """``nn.LayerNorm`` semantics on apex's fused kernel, with the original module's parameters."""

    def __init__(self, ln: nn.LayerNorm) -> None:
        super().__init__()
        self.normalized_shape = tuple(ln.normalized_shape)
        self.eps = ln.eps
        self.weight, self.bias = ln.weight, ln.bias  # the same Parameter objects (or None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from apex.normalization.fused_layer_norm import fused_layer_norm, fused_layer_norm_affine

        if self.weight is None:
            return fused_layer_norm(x, self.normalized_shape, self.eps)
        return fused_layer_norm_affine(x, self.weight, self.bias, self.normalized_shape, self.eps)

    def extra_repr(self) -> str:
        return f"{self.normalized_shape}, eps={self.eps}, impl=apex"


class FusedRMSNorm(nn.Module):
    """``LlamaRMSNorm`` semantics (fp32 statistics, output in the input dtype times the weight) on one
    fused kernel: apex's or PyTorch's ``F.rms_norm``."""

    def __init__(self, weight: nn.Parameter, eps: float, impl: str) -> None:
        super().__init__()
        if impl not in ("apex", "torch"):
            raise ValueError(f"FusedRMSNorm: impl must be apex|torch, got {impl!r}")
        self.weight, self.eps, self.impl = weight, eps, impl
        self.normalized_shape = _true_shape(weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.impl == "apex":
            from apex.normalization.fused_layer_norm import (
                fused_rms_norm_affine,
                mixed_dtype_fused_rms_norm_affine,
            )

            fn = fused_rms_norm_affine if x.dtype == self.weight.dtype else mixed_dtype_fused_rms_norm_affine
            return fn(x, self.weight, self.normalized_shape, self.eps)
        y = F.rms_norm(x.float(), self.normalized_shape, eps=self.eps)
        return self.weight * y.to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.normalized_shape}, eps={self.eps}, impl={self.impl}"


def _rms_norm_eps(m: nn.Module) -> float | None:
    """The epsilon of an RMSNorm module this swap knows (transformers' Llama / torch's), else None."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    if isinstance(m, LlamaRMSNorm):
        return float(m.variance_epsilon)
    if isinstance(m, nn.RMSNorm) and m.weight is not None:
        return float(m.eps if m.eps is not None else torch.finfo(torch.float32).eps)
    return None


def swap_norms(model: nn.Module, impl: str) -> dict[str, int]:
    """Replace the norms of ``model`` in place by the ``impl`` ("apex" | "torch") kernels.

    Returns counts by what each norm became, e.g. ``{"LayerNorm->apex": 83, "RMSNorm->torch": 45}``
    (``"LayerNorm kept"``: already PyTorch's fused ``F.layer_norm``).
    """
    if impl not in ("apex", "torch"):
        raise ValueError(f"swap_norms: impl must be apex|torch (resolve 'auto' first), got {impl!r}")
    counts: Counter[str] = Counter()
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, (ApexLayerNorm, FusedRMSNorm)):
                raise ValueError(f"swap_norms: {type(child).__name__} {name!r} is already swapped")
            eps = _rms_norm_eps(child)
            if eps is not None:
                setattr(parent, name, FusedRMSNorm(child.weight, eps, impl))
                counts[f"RMSNorm->{impl}"] += 1
            elif isinstance(child, nn.LayerNorm):
                if impl == "apex":
                    setattr(parent, name, ApexLayerNorm(child))
                    counts["LayerNorm->apex"] += 1
                else:
                    counts["LayerNorm kept"] += 1
    return dict(counts)
