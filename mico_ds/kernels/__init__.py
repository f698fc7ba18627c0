"""Fused ops (docs/architecture.md, "Where each part lives"): each has a pure-PyTorch reference that is
the CPU path and the test oracle.

Triton is imported lazily by the fused paths only, so this package imports without a working Triton.
"""

from mico_ds.kernels._backend import interpret_requested, triton_import_error
from mico_ds.kernels.context_embed import context_embed, context_embed_reference
from mico_ds.kernels.contrastive import contrastive_loss_tiled, sample_hard_negatives_tiled

__all__ = [
    "context_embed",
    "context_embed_reference",
    "contrastive_loss_tiled",
    "interpret_requested",
    "sample_hard_negatives_tiled",
    "triton_import_error",
]
