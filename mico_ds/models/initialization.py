"""Weight initialization that survives ZeRO-3 partitioning at construction time.

``deepspeed.zero.Init`` partitions a module's own parameters as soon as that module's ``__init__``
returns, leaving empty shards behind. An initializer that a parent applies afterwards (timm's
``VisionTransformer.init_weights``, transformers' ``post_init``) then writes into empty tensors and
silently leaves the framework default in place, so the ZeRO-3 model differs from the one the same
seed builds without ZeRO. The fix used here: every ``nn.Linear`` / ``nn.Embedding`` built inside
:func:`leaf_init` initializes itself in its own ``__init__`` (through ``reset_parameters``, which
``__init__`` calls), and parameters created directly by our modules are initialized in the
``__init__`` of the module that owns them. Nothing in this file imports DeepSpeed.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn


def init_normal_(t: torch.Tensor, std: float, truncated: bool = False) -> torch.Tensor:
    """Normal(0, std) fill; ``truncated`` cuts at +-2 std (the timm/BERT convention)."""
    if truncated:
        return nn.init.trunc_normal_(t, mean=0.0, std=std, a=-2.0 * std, b=2.0 * std)
    return nn.init.normal_(t, mean=0.0, std=std)


@contextmanager
def leaf_init(std: float, truncated: bool = False) -> Iterator[None]:
    """Within the block, ``nn.Linear`` and ``nn.Embedding`` initialize themselves to N(0, std).

    Linear biases become zero and an embedding's ``padding_idx`` row zero (what timm's and
    transformers' post-hoc initializers do), but inside the leaf's own ``__init__``, before any
    ZeRO-3 partitioning. Other leaves (conv, norms) keep their PyTorch defaults.
    """
    orig_linear = nn.Linear.reset_parameters
    orig_embedding = nn.Embedding.reset_parameters

    def linear_reset(self: nn.Linear) -> None:
        init_normal_(self.weight, std, truncated)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def embedding_reset(self: nn.Embedding) -> None:
        init_normal_(self.weight, std, truncated)
        if self.padding_idx is not None:
            with torch.no_grad():
                self.weight[self.padding_idx].fill_(0)

    nn.Linear.reset_parameters = linear_reset  # type: ignore[method-assign]
    nn.Embedding.reset_parameters = embedding_reset  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Linear.reset_parameters = orig_linear  # type: ignore[method-assign]
        nn.Embedding.reset_parameters = orig_embedding  # type: ignore[method-assign]
