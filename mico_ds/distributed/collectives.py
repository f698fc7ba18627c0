"""Every collective of mico_ds lives here (docs/architecture.md, "Where each part lives").

The model, losses and data code call these functions; they degrade to the identity when no
process group is initialized, so the library runs in a single process without DeepSpeed.
"""

from __future__ import annotations

import datetime
import os
from typing import Any

import torch
import torch.distributed as dist

# torch 2.14 renamed all_gather_into_tensor (the old name warns); same signature.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_initialized() else int(os.environ.get("RANK", 0))


def get_world_size() -> int:
    return dist.get_world_size() if is_initialized() else int(os.environ.get("WORLD_SIZE", 1))


def get_local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", 0))


def is_main_process() -> bool:
    return get_rank() == 0


def barrier() -> None:
    if is_initialized():
        dist.barrier()


def init_process_group_from_env(backend: str, timeout_s: float) -> None:
    """Initialize torch.distributed from RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT (torchrun style)."""
    if is_initialized():
        return
    dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s))


def destroy() -> None:
    """Destroy every process group, releasing DeepSpeed's own references to them too.

    ``deepspeed.utils.groups`` keeps a clone of WORLD that ``dist.destroy_process_group`` cannot
    free; its Gloo worker threads then outlive ``main`` and are joined during interpreter
    finalization, which can abort the process ("terminate called without an active exception",
    pytorch/pytorch#190489). DeepSpeed's own teardown drops those references.
    """
    if not is_initialized():
        return
    import sys

    ds_comm = sys.modules.get("deepspeed.comm")  # only where DeepSpeed already set itself up
    if ds_comm is not None and ds_comm.is_initialized():
        ds_comm.destroy_process_group()
    else:
        dist.destroy_process_group()


class _AllGatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sums the incoming gradients and returns this rank's slice.

    Each rank's loss depends on every rank's features, so the gradient of a gathered slice is the
    sum over ranks of d(loss_r)/d(slice): an all_reduce(SUM) of the gathered gradient, then the
    local slice. This is what OpenCLIP's ``gather_with_grad`` does with ``torch.distributed.nn``.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:  # x: (b, ...)
        world = dist.get_world_size()
        out = torch.empty((world * x.shape[0], *x.shape[1:]), dtype=x.dtype, device=x.device)
        _all_gather_single(out, x.contiguous())
        ctx.b = x.shape[0]
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        r = dist.get_rank()
        return grad[r * ctx.b : (r + 1) * ctx.b]


def all_gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` (b, ...) from all ranks along dim 0 -> (world*b, ...), differentiable.

    All ranks must pass the same shape. Rank r's rows are at [r*b, (r+1)*b).
    """
    if not is_initialized() or get_world_size() == 1:
        return x
    return _AllGatherWithGrad.apply(x)


@torch.no_grad()
def all_gather_no_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` from all ranks along dim 0 without a gradient path."""
    if not is_initialized() or get_world_size() == 1:
        return x
    out = torch.empty((get_world_size() * x.shape[0], *x.shape[1:]), dtype=x.dtype, device=x.device)
    _all_gather_single(out, x.contiguous())
    return out


@torch.no_grad()
def all_gather_variable(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` from all ranks along dim 0 when ranks hold different row counts."""
    if not is_initialized() or get_world_size() == 1:
        return x
    n = torch.tensor([x.shape[0]], device=x.device)
    sizes = [torch.zeros_like(n) for _ in range(get_world_size())]
    dist.all_gather(sizes, n)
    sizes_i = [int(s.item()) for s in sizes]
    pad = torch.zeros((max(sizes_i), *x.shape[1:]), dtype=x.dtype, device=x.device)
    pad[: x.shape[0]] = x
    parts = [torch.empty_like(pad) for _ in sizes_i]
    dist.all_gather(parts, pad)
    return torch.cat([p[:s] for p, s in zip(parts, sizes_i)], dim=0)


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over ranks (not differentiable); returns a new tensor."""
    x = x.detach().clone()
    if is_initialized() and get_world_size() > 1:
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x


def dist_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean of a tensor over ranks (for logging)."""
    return all_reduce_sum(x) / get_world_size()


def dist_max(x: torch.Tensor) -> torch.Tensor:
    """Maximum of a tensor over ranks."""
    x = x.detach().clone()
    if is_initialized() and get_world_size() > 1:
        dist.all_reduce(x, op=dist.ReduceOp.MAX)
    return x


def any_rank(flag: bool, device: torch.device | str = "cpu") -> bool:
    """True on every rank when ``flag`` is true on at least one rank (one small all_reduce)."""
    t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=device)
    return bool(dist_max(t).item())


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Send a picklable object from ``src`` to every rank."""
    if not is_initialized() or get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_object(obj: Any) -> list[Any]:
    """Gather one picklable object per rank onto every rank."""
    if not is_initialized() or get_world_size() == 1:
        return [obj]
    out: list[Any] = [None] * get_world_size()
    dist.all_gather_object(out, obj)
    return out


class Pending:
    """A collective in flight; ``wait()`` blocks until it is done and returns its result tensor."""

    def __init__(self, tensor: torch.Tensor, work: Any = None) -> None:
        self._tensor = tensor
        self._work = work

    def wait(self) -> torch.Tensor:
        if self._work is not None:
            self._work.wait()  # on NCCL: orders the current stream after the collective
            self._work = None
        return self._tensor


def all_gather_chunks_async(x: torch.Tensor) -> list[Pending]:
    """Start gathering ``x`` (same shape on every rank) as one broadcast per source rank.

    Returns one ``Pending`` per rank (element k yields rank k's tensor; this rank's entry is ``x``
    itself, ready at once), so a caller can compute on the chunks already arrived while the others
    are in flight (a per-chunk all-gather). Every rank issues the broadcasts in rank order. Not
    differentiable; with one process, ``[Pending(x)]``.
    """
    if not is_initialized() or get_world_size() == 1:
        return [Pending(x)]
    x = x.contiguous()
    out: list[Pending] = []
    for src in range(get_world_size()):
        buf = x if src == get_rank() else torch.empty_like(x)
        work = dist.broadcast(buf, src=src, async_op=True)
        out.append(Pending(buf, work) if src != get_rank() else Pending(x, work))
    return out


def reduce_sum_async(x: torch.Tensor, dst: int) -> Pending:
    """Start summing ``x`` over ranks into rank ``dst``; ``wait()`` gives the sum on ``dst``.

    ``x`` (contiguous) is the collective's buffer, reduced in place: pass a scratch tensor, whose
    content on ranks other than ``dst`` is undefined afterwards. Issued in the same order on every
    rank, one per destination, this is a reduce-scatter whose pieces can overlap with the compute of
    the next piece. With one process, ``Pending(x)``.
    """
    if not is_initialized() or get_world_size() == 1:
        return Pending(x)
    if not x.is_contiguous():
        raise ValueError(f"reduce_sum_async needs a contiguous buffer, got strides {x.stride()}")
    return Pending(x, dist.reduce(x, dst=dst, op=dist.ReduceOp.SUM, async_op=True))
