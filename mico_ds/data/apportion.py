"""Integer shares of a total in proportion to weights: Hamilton's largest-remainder method.

Used by the corpus schedule (steps per corpus, MiCo appendix B.2) and by the nested stratified subsets
(samples per category, MiCo appendix Algorithm 2).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def largest_remainder(
    total: int, weights: Sequence[float] | np.ndarray, caps: Sequence[int] | np.ndarray | None = None
) -> np.ndarray:
    """Integer counts summing to ``total`` in proportion to ``weights``, each at most its cap.

    Each count is floor(ideal) or floor(ideal) + 1 (clipped by its cap); the leftover units go to the
    largest remainders among entries still below their cap, ties to the lower index, so the result
    is deterministic. A zero total or zero weights give zeros.

    Raises:
        ValueError: the caps sum to less than ``total``.
    """
    w = np.asarray(weights, dtype=np.float64)
    if total <= 0 or w.sum() <= 0:
        return np.zeros(len(w), dtype=np.int64)
    cap = np.full(len(w), total, dtype=np.int64) if caps is None else np.asarray(caps, dtype=np.int64)
    if int(cap.sum()) < total:
        raise ValueError(f"caps {cap.tolist()} sum below the total {total}")
    ideal = total * w / w.sum()
    counts = np.minimum(np.floor(ideal).astype(np.int64), cap)
    left = total - int(counts.sum())
    order = np.lexsort((np.arange(len(ideal)), -(ideal - np.floor(ideal))))
    for i in order:
        if left == 0:
            break
        if counts[i] < cap[i]:
            counts[i] += 1
            left -= 1
    for i in order:  # the floor of some entry was clipped by its cap: fill anywhere there is room
        if left == 0:
            break
        take = min(int(cap[i] - counts[i]), left)
        counts[i] += take
        left -= take
    return counts
