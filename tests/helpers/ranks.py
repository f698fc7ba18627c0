"""Run a function on N real gloo ranks (torch.multiprocessing.spawn, free port) and collect results."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.multiprocessing as mp

from mico_ds.distributed.launch import exit_now, free_port


def _entry(rank: int, world: int, port: int, fn: Callable[..., Any], out_dir: str, args: tuple) -> None:
    import torch.distributed as dist

    from mico_ds import distributed as mdist

    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
    )
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.save(fn(rank, *args), Path(out_dir) / f"rank{rank}.pt")
    finally:
        mdist.destroy()
    exit_now(0)  # without the interpreter's teardown of live Gloo groups (distributed/launch.py)


def run_ranks(fn: Callable[..., Any], world: int, out_dir: Path, *args: Any) -> list[Any]:
    """Call ``fn(rank, *args)`` on ``world`` gloo ranks; returns each rank's (torch.save-able) result.

    ``fn`` must be a module-level function (it is pickled into the spawned processes).
    """
    mp.spawn(_entry, args=(world, free_port(), fn, str(out_dir), args), nprocs=world, join=True)
    return [torch.load(Path(out_dir) / f"rank{r}.pt", weights_only=False) for r in range(world)]
