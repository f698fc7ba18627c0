"""Bad data never stops a run: what cannot be used is skipped and counted per reason.

:class:`SkipSample` is what a decoder raises for an unusable sample (its ``reason`` is the counter);
:class:`SkipStats` counts samples seen and skipped, keeps a few example keys per reason, and enforces
``data.max_skip_rate``. A decoder's unexpected exception is the reason :data:`DECODE_ERROR`, its
examples carrying the exception (a bug in our code then stops the run at the skip-rate bound, with the
exception named, rather than the first worker that meets it).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

EXAMPLES_PER_REASON = 3
DECODE_ERROR = "decode_error"  # anything else a decoder raised for one sample
DETAIL_CHARS = 200  # of an example's detail: enough for the exception type and its message


class SkipSample(Exception):
    """A sample that cannot be used; ``reason`` is the counter it is accounted under."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclass
class SkipStats:
    """Samples seen and skipped per reason, with a few example keys per reason."""

    seen: int = 0
    skipped: Counter = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)

    def add(self, reason: str, key: str, n: int = 1, detail: str = "") -> None:
        """Count ``n`` skips of ``reason``; ``detail`` (if any) is kept with the example key."""
        self.skipped[reason] += n
        ex = self.examples.setdefault(reason, [])
        if detail:
            key = f"{key} ({detail[:DETAIL_CHARS]})"
        if len(ex) < EXAMPLES_PER_REASON and key not in ex:
            ex.append(key)

    def merge(self, seen: int, skipped: dict[str, int], examples: dict[str, list[str]]) -> None:
        self.seen += seen
        for r, n in skipped.items():
            self.skipped[r] += n
        for r, keys in examples.items():
            ex = self.examples.setdefault(r, [])
            ex += [k for k in keys if k not in ex][: EXAMPLES_PER_REASON - len(ex)]

    @property
    def total_skipped(self) -> int:
        return sum(self.skipped.values())

    def check(self, corpus: str, max_skip_rate: float, min_samples: int) -> None:
        """Raise when the skip rate passes the bound (after ``min_samples`` seen)."""
        if self.seen >= max(1, min_samples) and self.total_skipped / self.seen > max_skip_rate:
            raise ValueError(
                f"corpus {corpus!r}: {self.total_skipped} of {self.seen} samples skipped "
                f"({self.total_skipped / self.seen:.1%} > data.max_skip_rate={max_skip_rate:.1%}); "
                f"by reason {dict(self.skipped)}; example keys {self.examples}"
            )

    def as_dict(self) -> dict:
        return {"seen": self.seen, "skipped": dict(self.skipped), "examples": dict(self.examples)}
