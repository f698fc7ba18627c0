"""The one owner of checkpoints: run directories, tags, ``latest``, save and resume
(:class:`CheckpointManager`), the one locator (:func:`locate`) and run-config reader
(:func:`read_run_config`), mico_ds' client state, the manifest of sizes and checksums every
checkpoint carries (``mico_ds.checkpoint.manifest``), and weight formats of other projects as adapters
(``mico_ds.checkpoint.formats``). The DeepSpeed halves (ZeRO partitions, consolidation, universal
checkpoints) are ``mico_ds.distributed.zero_checkpoint``. Evaluation and tools read checkpoints
through this package, never through the trainer."""

from mico_ds.checkpoint.client import load_client, merge_data_states, rng_preserved, rng_state, set_rng_state
from mico_ds.checkpoint.layout import (
    CHECKPOINTS,
    CONFIG_FILE,
    MANIFEST_FILE,
    TAG_RE,
    UNIVERSAL_MARKER,
    Location,
    describe,
    is_partitioned,
    is_universal,
    list_tags,
    load_meta,
    locate,
    read_latest,
    read_run_config,
    run_config_file,
    select_to_delete,
    tag_for,
    write_latest,
)
from mico_ds.checkpoint.manager import EXACTNESS_KEYS, CheckpointManager, Resumed
from mico_ds.checkpoint.saving import CheckpointSaveError

__all__ = [
    "CHECKPOINTS",
    "CONFIG_FILE",
    "EXACTNESS_KEYS",
    "MANIFEST_FILE",
    "TAG_RE",
    "UNIVERSAL_MARKER",
    "CheckpointManager",
    "CheckpointSaveError",
    "Location",
    "Resumed",
    "describe",
    "is_partitioned",
    "is_universal",
    "list_tags",
    "load_client",
    "load_meta",
    "locate",
    "merge_data_states",
    "read_latest",
    "read_run_config",
    "rng_preserved",
    "rng_state",
    "run_config_file",
    "select_to_delete",
    "set_rng_state",
    "tag_for",
    "write_latest",
]
