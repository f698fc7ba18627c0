"""Small heads on top of the two branches: projections, matching head, LLM prefix projector, temperature.

Every head initializes its own parameters in its own ``__init__`` (ZeRO-3 safe, see
``mico_ds/models/initialization.py``).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from mico_ds.models.initialization import leaf_init


def mlp(in_dim: int, hidden_dim: int, out_dim: int, std: float = 0.02) -> nn.Sequential:
    """Linear -> GELU -> Linear, truncated-normal(std) weights, zero biases."""
    with leaf_init(std=std, truncated=True):
        return nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, out_dim))


class ProjectionHead(nn.Module):
    """MLP into the shared contrastive space (MiCo appendix B.1: "projected ... using MLPs").

    Output is NOT normalized; callers L2-normalize (the model does, before Eq. 4)."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.net = mlp(in_dim, in_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, in) -> (B, out)
        return self.net(x)


class MatchHead(nn.Module):
    """Binary matching head (MiCo Eq. 5): an MLP from the LLM hidden state to one logit."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.net = mlp(hidden, hidden, 1)

    def forward(self, h: torch.Tensor) -> torch.Tensor:  # (N, H) -> (N,)
        return self.net(h).squeeze(-1)


class SamplingEmbedding(nn.Module):
    """E_Sam of MiCo Eq. 3 on the text side: one learned vector per source corpus, zero at start, added
    to the text features of the tokens that came from that corpus (row 0: text from one corpus)."""

    def __init__(self, num_sources: int, hidden: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(num_sources, hidden))

    def forward(self, source_BL: torch.Tensor) -> torch.Tensor:  # (B, L) int64 -> (B, L, H)
        return nn.functional.embedding(source_BL, self.weight)


class PrefixProjector(nn.Module):
    """Fused context tokens (width D) -> LLM prefix embeddings (Llama hidden size), LLaVA-style MLP."""

    def __init__(self, in_dim: int, llm_hidden: int) -> None:
        super().__init__()
        self.net = mlp(in_dim, llm_hidden, llm_hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, P, D) -> (B, P, H)
        return self.net(x)


class LogitScale(nn.Module):
    """Learnable inverse temperature tau of MiCo Eq. 4, log-parameterized (as CLIP).

    ``forward()`` returns exp(log_scale) clamped to ``max_scale``. The clamp lives in the forward
    pass so that nothing ever edits the (possibly ZeRO-partitioned) parameter in place.
    """

    def __init__(self, init_temperature: float, max_scale: float) -> None:
        super().__init__()
        if init_temperature <= 0 or max_scale <= 0:
            raise ValueError(
                f"objectives.init_temperature={init_temperature} and objectives.max_logit_scale={max_scale} "
                "must be > 0"
            )
        self.max_log = math.log(max_scale)
        # Shape (1,), not (): ZeRO-3's zero.Init cannot broadcast/partition 0-dim parameters.
        self.log_scale = nn.Parameter(torch.full((1,), math.log(1.0 / init_temperature)))

    def forward(self) -> torch.Tensor:  # () scalar
        return self.log_scale.clamp(max=self.max_log).exp().squeeze(0)
