"""How the model is spread over ranks: the process group and every collective (``collectives``), the
DeepSpeed engine (``engine``, ``ds_config``), the ZeRO halves of checkpoints (``zero_checkpoint``,
``zero_load``) and the launcher conventions (``launch``).

This package and ``mico_ds.train`` are the only places that import DeepSpeed or ``torch.distributed``;
``from mico_ds import distributed as mdist`` gives the collectives.
"""

from mico_ds.distributed.collectives import (
    Pending,
    all_gather_chunks_async,
    all_gather_no_grad,
    all_gather_object,
    all_gather_variable,
    all_gather_with_grad,
    all_reduce_sum,
    any_rank,
    barrier,
    broadcast_object,
    destroy,
    dist_max,
    dist_mean,
    get_local_rank,
    get_rank,
    get_world_size,
    init_process_group_from_env,
    is_initialized,
    is_main_process,
    reduce_sum_async,
)

__all__ = [
    "Pending",
    "all_gather_chunks_async",
    "all_gather_no_grad",
    "all_gather_object",
    "all_gather_variable",
    "all_gather_with_grad",
    "all_reduce_sum",
    "any_rank",
    "barrier",
    "broadcast_object",
    "destroy",
    "dist_max",
    "dist_mean",
    "get_local_rank",
    "get_rank",
    "get_world_size",
    "init_process_group_from_env",
    "is_initialized",
    "is_main_process",
    "reduce_sum_async",
]
