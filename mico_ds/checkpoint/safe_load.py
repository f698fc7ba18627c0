"""Loading checkpoints that may come from elsewhere without running what their pickles name.

``torch.load(weights_only=False)`` executes any callable a pickle references (a checkpoint copied
from another cluster, downloaded, or tampered with can run code on every rank). Every checkpoint file
mico_ds reads goes through :func:`load` (``weights_only=True`` plus an explicit allow-list of the
few non-tensor types DeepSpeed and mico_ds store), and every file DeepSpeed's own loaders read
(``engine.load_checkpoint``, ``zero_to_fp32``, ``ds_to_universal``, which call ``torch.load`` with
``weights_only=False`` themselves) is first checked by :func:`verify_tree`: the globals its pickle
references are listed without unpickling anything (``torch.serialization.
get_unsafe_globals_in_checkpoint`` reads ``data.pkl`` only, not the tensor storages) and must all be
on the allow-list. docs/operations.md, "Checkpoints from elsewhere".
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

# What DeepSpeed 0.19 and mico_ds put in checkpoints beyond what weights_only allows by default
# (tensors, containers, torch.Size, OrderedDict): DeepSpeed's loss scaler, ZeRO stage enum and
# parameter-slice addresses in the optimizer states, numpy's RNG state arrays in mico_ds's client state.
ALLOWED_GLOBALS: frozenset[str] = frozenset(
    {
        "deepspeed.runtime.fp16.loss_scaler.LossScaler",
        "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
        "deepspeed.runtime.zero.config.ZeroStageEnum",
        "deepspeed.utils.tensor_fragment.fragment_address",  # ZeRO-1/2 and bf16: param_slice_mappings
        "numpy.ndarray",
        "numpy.dtype",
        "numpy._core.multiarray._reconstruct",
        "numpy.core.multiarray._reconstruct",
        "numpy.dtypes.UInt32DType",
        "numpy.dtypes.Float64DType",
        "numpy.dtypes.Int64DType",
        "numpy.dtypes.Float32DType",
    }
)


class UntrustedCheckpointError(RuntimeError):
    """A checkpoint file whose pickle references something outside :data:`ALLOWED_GLOBALS`."""


def pickle_globals(path: str | Path) -> list[str]:
    """The globals ``path``'s pickle references beyond weights_only's defaults (nothing is run)."""
    try:
        return list(torch.serialization.get_unsafe_globals_in_checkpoint(str(path)))
    except Exception as e:  # not a zip-format torch file: it cannot be checked, so it is not loaded
        raise UntrustedCheckpointError(
            f"{path}: cannot list what its pickle references ({type(e).__name__}: {e}); only zip-format "
            "torch files (torch.save's default since 1.6) are loaded"
        ) from e


def verify(path: str | Path) -> list[str]:
    """Raise :class:`UntrustedCheckpointError` naming ``path`` and the globals outside the allow-list;
    return the (allowed) globals it references."""
    names = pickle_globals(path)
    bad = sorted(set(names) - ALLOWED_GLOBALS)
    if bad:
        raise UntrustedCheckpointError(
            f"{path}: refused to load: its pickle references {', '.join(bad)}, outside the types "
            "DeepSpeed and mico_ds store (mico_ds/checkpoint/safe_load.py ALLOWED_GLOBALS); unpickling "
            "it could run code. If the file is yours and a new DeepSpeed version stores a new type, add "
            "that type to ALLOWED_GLOBALS"
        )
    return names


def verify_tree(root: str | Path, patterns: Iterable[str] = ("*.pt",)) -> int:
    """:func:`verify` every file under ``root`` matching ``patterns``; returns how many were checked."""
    n = 0
    for pattern in patterns:
        for f in sorted(Path(root).rglob(pattern)):
            verify(f)
            n += 1
    return n


@functools.cache
def _resolve(name: str) -> Any:
    """The object ``name`` names, or None where this install lacks it (numpy 1's module paths)."""
    module, _, attr = name.rpartition(".")
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError):
        return None


def load(path: str | Path, **kwargs: Any) -> Any:
    """``torch.load(path, weights_only=True, **kwargs)`` with the allow-listed types the file uses."""
    # numpy's dtype classes are built by a reduce, not named as globals: allowed with numpy itself.
    names = set(verify(path)) | {n for n in ALLOWED_GLOBALS if n.startswith("numpy.dtypes.")}
    allowed = [obj for obj in map(_resolve, sorted(names)) if obj is not None]
    with torch.serialization.safe_globals(allowed):
        return torch.load(path, weights_only=True, **kwargs)
