"""Which kernel implementation runs: Triton (compiled on CUDA, interpreted on CPU) or PyTorch.

Triton is imported only from here and from the ``_triton_*`` modules, and only when a fused path is
asked for, so ``mico_ds.kernels`` imports (and its PyTorch paths run) without a working Triton.
"""

from __future__ import annotations

import functools
import importlib
import os
from types import ModuleType

import torch

IMPLS = ("auto", "triton", "torch")
_TRUE = ("1", "true", "on", "yes")


def interpret_requested() -> bool:
    """True when ``TRITON_INTERPRET`` asks Triton to run kernels in its CPU interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in _TRUE


@functools.cache
def triton_import_error() -> str | None:
    """None when ``import triton`` works, else the reason (cached: the answer cannot change)."""
    try:
        importlib.import_module("triton")
    except Exception as e:  # ImportError, or a broken install raising anything at import
        return f"{type(e).__name__}: {e}"
    return None


def use_triton(impl: str, device: torch.device, op: str) -> bool:
    """Resolve ``impl`` ("auto" | "triton" | "torch") for tensors on ``device``; raise if impossible.

    "auto" picks Triton on CUDA when it imports; "triton" insists, and on CPU needs TRITON_INTERPRET=1.
    """
    if impl not in IMPLS:
        raise ValueError(f"{op}: impl must be one of {'|'.join(IMPLS)}, got {impl!r}")
    if impl == "torch":
        return False
    err = triton_import_error()
    if impl == "auto":
        return device.type == "cuda" and err is None
    if err is not None:
        raise RuntimeError(f"{op}: impl='triton' but triton cannot be imported ({err}); use impl='torch'")
    if device.type != "cuda" and not interpret_requested():
        raise RuntimeError(
            f"{op}: impl='triton' needs CUDA tensors (got device {device}) or TRITON_INTERPRET=1 to run "
            "the kernels in Triton's CPU interpreter; use impl='torch' on CPU"
        )
    return True


def load_triton_module(name: str) -> ModuleType:
    """Import ``mico_ds.kernels.<name>`` and check it was built in the mode the env asks for now.

    Triton 3.x fixes interpreted-vs-compiled when ``@triton.jit`` runs (module import), so setting
    TRITON_INTERPRET after the first import has no effect; say so instead of failing obscurely.
    """
    mod = importlib.import_module(f"mico_ds.kernels.{name}")
    if interpret_requested() != mod.INTERPRETED:
        raise RuntimeError(
            f"mico_ds.kernels.{name} was imported with TRITON_INTERPRET={'1' if mod.INTERPRETED else '0'} "
            f"but it is now {os.environ.get('TRITON_INTERPRET')!r}; set TRITON_INTERPRET before the first "
            "fused-kernel call of the process"
        )
    return mod
