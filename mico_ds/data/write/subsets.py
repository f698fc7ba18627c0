"""Nested stratified subsets of a corpus (MiCo appendix, "Dataset Split", Algorithm 2), and the
per-sample records they are drawn from (``tools/split_subsets.py``)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mico_ds.data import schema
from mico_ds.data.apportion import largest_remainder
from mico_ds.data.io import expand_urls, iter_tar_samples, member_modalities


def scan_shards(shards: str | Path | Sequence[str | Path]) -> list[dict[str, Any]]:
    """One record per sample of the shards: ``{"key", "category", "modalities", "shard"}``.

    The category comes from the json member (None when there is none, e.g. img2dataset txt shards).
    """
    records = []
    for shard in expand_urls(shards):
        for key, members in iter_tar_samples(shard):
            category = None
            if schema.JSON_EXT in members:
                try:
                    category = json.loads(members[schema.JSON_EXT]).get("category")
                except (json.JSONDecodeError, AttributeError) as e:
                    raise ValueError(f"{shard}: sample {key!r} has an invalid json member: {e}") from e
            records.append(
                {
                    "key": key,
                    "category": category,
                    "modalities": member_modalities(members),
                    "shard": str(shard),
                }
            )
    return records


def resolve_sizes(sizes: Sequence[int | float], total: int) -> list[int]:
    """Subset sizes as counts: Python floats are fractions of ``total`` in (0, 1], ints are counts."""
    if not sizes:
        raise ValueError("no subset sizes given")
    if all(isinstance(s, float) for s in sizes):
        if not all(0 < s <= 1 for s in sizes):
            raise ValueError(f"fractional subset sizes must be in (0, 1], got {list(sizes)}")
        counts = [max(1, round(s * total)) for s in sizes]
    elif all(isinstance(s, int) for s in sizes):
        if not all(s >= 1 for s in sizes):
            raise ValueError(f"subset counts must be >= 1, got {list(sizes)}")
        counts = [int(s) for s in sizes]
    else:
        raise ValueError(f"subset sizes {list(sizes)} mix fractions and counts")
    too_big = [c for c in counts if c > total]
    if too_big:
        raise ValueError(f"subset sizes {too_big} exceed the {total} samples available")
    return counts


def nested_stratified_subsets(
    categories: Sequence[str], sizes: Sequence[int], seed: int = 42
) -> list[np.ndarray]:
    """Nested subsets stratified by category (MiCo appendix, "Dataset Split", Algorithm 2).

    Algorithm 2 draws each subset with sklearn's stratified ``train_test_split``; drawing them
    independently does not make the 1M subset part of the 10M one. Here every category's samples are
    shuffled once (seeded) and each subset takes a prefix of every category's order, so each subset
    lies inside the next. Per-category counts come from largest-remainder rounding of
    size * n_c / N, computed from the largest subset down with each count capped by the count of the
    next larger subset (plain Hamilton rounding is not monotone in the size - the Alabama paradox).

    Args:
        categories: the category of every sample (index i = sample i).
        sizes: subset sizes as counts (any order; each <= len(categories)).
        seed: shuffling seed.

    Returns:
        For each entry of ``sizes`` (same order), the sorted sample indices of that subset.
    """
    n = len(categories)
    if any(not 1 <= s <= n for s in sizes):
        raise ValueError(f"subset sizes {list(sizes)} must be in [1, {n}]")
    names, inverse = np.unique(np.asarray(categories, dtype=object).astype(str), return_inverse=True)
    counts = np.bincount(inverse, minlength=len(names))
    rng = np.random.default_rng(seed)
    members = [rng.permutation(np.flatnonzero(inverse == c)) for c in range(len(names))]
    order = sorted(range(len(sizes)), key=lambda i: -sizes[i])
    quotas: dict[int, np.ndarray] = {}
    caps = counts.astype(np.int64)
    for i in order:
        caps = largest_remainder(int(sizes[i]), counts.astype(np.float64), caps)
        quotas[i] = caps
    return [np.sort(np.concatenate([m[:q] for m, q in zip(members, quotas[i])])) for i in range(len(sizes))]
