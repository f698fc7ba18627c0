"""Heads a downstream task adds to MiCoModel, built only when the run's task needs them.

Each head initializes its own parameters in its own ``__init__`` (ZeRO-3 safe, see
``mico_ds/models/initialization.py``).
"""

from __future__ import annotations

import torch
from torch import nn

from mico_ds.models.initialization import leaf_init


class ClassificationHead(nn.Module):
    """``task.name=classification`` (MiCo Table 10): one linear layer on the pooled feature z, the
    context output the contrastive branch projects (``proj_z``'s input). No norm in front: z already
    leaves the context's final LayerNorm."""

    def __init__(self, in_dim: int, num_classes: int, std: float = 0.02) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"task.classification.num_classes must be >= 2, got {num_classes}")
        with leaf_init(std=std, truncated=True):  # DeiT's head: truncated normal(0.02), zero bias
            self.fc = nn.Linear(in_dim, num_classes)

    def forward(self, z_BD: torch.Tensor) -> torch.Tensor:  # (B, D) -> (B, C) logits
        return self.fc(z_BD)
