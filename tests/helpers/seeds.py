"""Fresh random inputs for the kernel tests, reproducible from the printed seed."""

from __future__ import annotations

import os


def fresh_seed() -> int:
    """A new seed every run (fresh inputs), printed so a failure can be replayed."""
    seed = int.from_bytes(os.urandom(4), "little")
    print(f"seed={seed}")
    return seed
