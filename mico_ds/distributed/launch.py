"""Launcher conventions: whether this process was started by a launcher, and how to start one.

The DeepSpeed launcher is run as ``sys.executable -m deepspeed.launcher.runner`` (not the ``deepspeed``
script by name), so a command started as ``/path/to/venv/bin/python -m mico_ds.train`` works without
that environment's ``bin/`` on ``PATH``.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
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


def exit_now(code: int = 1) -> None:
    """Flush what was logged and leave without the interpreter's shutdown.

    After a failure that shutdown can hang (joining data workers while peers wait in collectives).
    After a clean distributed run it can abort: ZeRO-3's hooks keep the engine, and through its
    parameters the process groups, reachable until interpreter finalization, where the Gloo worker
    threads are torn down in no fixed order ("terminate called without an active exception",
    pytorch/pytorch#190489). The data workers go first: orphaned, they would run on until their
    parent check notices (seconds)."""
    for child in multiprocessing.active_children():
        with contextlib.suppress(Exception):
            child.kill()
    with contextlib.suppress(Exception):
        logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)
