"""Launcher conventions: whether this process was started by a launcher, and how to start one.

The DeepSpeed launcher is run as ``sys.executable -m deepspeed.launcher.runner`` (not the ``deepspeed``
script by name), so a command started as ``/path/to/venv/bin/python -m mico_ds.train`` works without
that environment's ``bin/`` on ``PATH``.
"""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import Sequence

LAUNCHER_ENV = ("RANK", "LOCAL_RANK", "OMPI_COMM_WORLD_RANK")


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` now (for a local rendezvous)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def launched() -> bool:
    """True inside a process started by a launcher (deepspeed, torchrun, mpirun)."""
    return any(k in os.environ for k in LAUNCHER_ENV)


def deepspeed_command(
    nproc: int, module: str, args: Sequence[str], master_port: int | None = None, python: str | None = None
) -> list[str]:
    """The command that runs ``python -m <module> <args>`` on ``nproc`` local ranks under DeepSpeed's
    launcher (``--no_local_rank``: ranks read LOCAL_RANK from the environment)."""
    return [
        python or sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(nproc),
        "--master_port", str(master_port or free_port()), "--no_local_rank", "--module", module, *args,
    ]  # fmt: skip
