"""What the command-line tools share: byte sizes, and the error convention (``prog: error: ...`` on
stderr, exit status 2)."""

from __future__ import annotations

import re
import sys

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?)B?\s*$", re.IGNORECASE)


def parse_size(text: str | int) -> int:
    """``"5GB"`` -> 5_000_000_000, ``"500MiB"`` -> 524_288_000, ``123`` -> 123 (bytes).

    Decimal units as Hugging Face's ``max_shard_size``; ``KiB``/``MiB``/``GiB`` are binary.
    """
    if isinstance(text, int):
        return text
    m = _SIZE_RE.match(text)
    if not m:
        raise ValueError(f"not a size: {text!r} (use e.g. 5GB, 500MB, 2GiB or a number of bytes)")
    value, unit, binary = float(m.group(1)), m.group(2).upper(), bool(m.group(3))
    power = "KMGT".find(unit) + 1 if unit else 0
    return int(value * (1024 if binary else 1000) ** power)


def fail(prog: str, message: object) -> int:
    """Print ``prog: error: message`` to stderr; returns the exit status 2."""
    print(f"{prog}: error: {message}", file=sys.stderr)
    return 2
