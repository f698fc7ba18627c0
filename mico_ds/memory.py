"""This process's memory, read from ``/proc/self/status`` (Linux): the current and peak resident set,
and a sampler thread for the peak of a block of work (what the converters and benchmarks report)."""

from __future__ import annotations

import threading
from collections.abc import Iterable
from pathlib import Path

STATUS_KEYS = ("VmRSS", "RssAnon", "RssFile", "VmHWM")


def proc_status(keys: Iterable[str] = STATUS_KEYS) -> dict[str, int]:
    """The ``/proc/self/status`` figures ``keys`` in bytes ({} where there is no /proc)."""
    want, out = set(keys), {}
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            k, _, v = line.partition(":")
            if k in want:
                out[k] = int(v.split()[0]) * 1024
    except OSError:  # not Linux
        pass
    return out


def proc_status_bytes(key: str) -> int:
    """One ``/proc/self/status`` figure in bytes: VmRSS, resident now; VmHWM, the peak since the last
    :func:`reset_peak_rss`."""
    value = proc_status((key,)).get(key)
    if value is None:
        raise RuntimeError(f"{key} not in /proc/self/status")
    return value


def reset_peak_rss() -> None:
    """Reset this process's VmHWM to its current resident set (``clear_refs`` 5, Linux), so that the
    next VmHWM is the peak of what follows."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


class PeakMemory:
    """Samples this process's resident memory every 20 ms in a thread; ``peak`` after the block."""

    def __init__(self) -> None:
        self.peak = {"VmRSS": 0, "RssAnon": 0, "RssFile": 0, "VmHWM": 0}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        for k, v in proc_status(("VmRSS", "RssAnon", "RssFile")).items():
            self.peak[k] = max(self.peak[k], v)

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            self._sample()

    def __enter__(self) -> PeakMemory:
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()
        self.peak["VmHWM"] = proc_status(("VmHWM",)).get("VmHWM", 0)
