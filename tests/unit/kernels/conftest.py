"""Kernel tests run the Triton kernels in Triton's CPU interpreter when there is no GPU
(TRITON_INTERPRET=1 is set by tests/conftest.py before anything imports Triton)."""

from __future__ import annotations

import pytest
import torch

from tests.helpers.seeds import fresh_seed

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def triton_device() -> str:
    """Device for impl='triton' tests; skips (with the reason) only if Triton cannot run at all here."""
    from mico_ds.kernels._backend import interpret_requested, load_triton_module, triton_import_error

    err = triton_import_error()
    if err is not None:
        pytest.skip(f"triton cannot be imported here: {err}")
    if DEVICE == "cpu" and not interpret_requested():
        pytest.skip("no GPU and TRITON_INTERPRET is not 1 (set to 0 by the caller)")
    try:
        load_triton_module("_triton_context_embed")
        load_triton_module("_triton_contrastive")
    except RuntimeError as e:  # imported earlier in the other mode by something outside these tests
        pytest.skip(str(e))
    return DEVICE


@pytest.fixture
def rng() -> torch.Generator:
    return torch.Generator().manual_seed(fresh_seed())
