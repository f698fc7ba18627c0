"""The random streams of one training forward pass (caption masking, hard-negative mining).

Each draw comes from its own generator seeded by (train.seed, optimizer step, micro-batch, rank,
stream): a run is reproducible, a resumed run draws what the uninterrupted one would have, and ranks
and objectives draw independently.
"""

from __future__ import annotations

import enum

import numpy as np
import torch


class RandomStream(enum.IntEnum):
    """Which objective a generator serves."""

    MATCHING = 1  # hard-negative mining (MiCo Eq. 5)
    GENERATION = 2  # caption masking (MiCo Eq. 6)


def step_generator(
    seed: int, step: int, micro: int, rank: int, stream: RandomStream, device: torch.device | str
) -> torch.Generator:
    """A generator on ``device`` seeded from ``(seed, step, micro, rank, stream)``."""
    key = [int(seed), int(step), int(micro), int(rank), int(stream)]
    value = int(np.random.SeedSequence(key).generate_state(1, dtype=np.uint64)[0])
    return torch.Generator(device=device).manual_seed(value)
