"""Checkpoint files load with weights_only=True and an allow-list; a pickle that names anything else is
refused before anything in it runs (mico_ds/checkpoint/safe_load.py)."""

from __future__ import annotations

import pathlib
import random

import numpy as np
import pytest
import torch

from mico_ds.checkpoint import safe_load
from mico_ds.checkpoint.client import load_client


class _Runs:
    """Unpickling this calls ``Path.touch(marker)``: a stand-in for any code a pickle can run."""

    def __init__(self, marker: pathlib.Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


def test_rng_and_tensors_round_trip(tmp_path: pathlib.Path) -> None:
    state = {"step": 3, "rng": {"python": random.getstate(), "numpy": np.random.get_state(),
                                "torch": torch.get_rng_state()}, "w": torch.arange(5.0)}  # fmt: skip
    f = tmp_path / "rank0.pt"
    torch.save(state, f)
    got = safe_load.load(f)
    assert got["step"] == 3 and torch.equal(got["w"], state["w"])
    assert torch.equal(got["rng"]["torch"], state["rng"]["torch"])
    np_got, np_want = got["rng"]["numpy"], state["rng"]["numpy"]
    assert np_got[0] == np_want[0] and np.array_equal(np_got[1], np_want[1]) and np_got[2:] == np_want[2:]


def test_code_in_a_pickle_is_refused_before_it_runs(tmp_path: pathlib.Path) -> None:
    marker = tmp_path / "ran"
    f = tmp_path / "ckpt" / "step00000001" / "client" / "rank0.pt"
    f.parent.mkdir(parents=True)
    torch.save({"step": 1, "payload": _Runs(marker)}, f)
    for call in (lambda: safe_load.load(f), lambda: safe_load.verify_tree(tmp_path / "ckpt"),
                 lambda: load_client(tmp_path / "ckpt", "step00000001", 0)):  # fmt: skip
        with pytest.raises(safe_load.UntrustedCheckpointError, match=r"rank0\.pt: refused.*pathlib"):
            call()
    assert not marker.exists()
    # what plain torch.load(weights_only=False) would have done with it
    torch.load(f, weights_only=False)
    assert marker.exists()


def test_a_file_that_cannot_be_checked_is_not_loaded(tmp_path: pathlib.Path) -> None:
    f = tmp_path / "legacy.pt"
    torch.save({"w": torch.ones(2)}, f, _use_new_zipfile_serialization=False)
    with pytest.raises(safe_load.UntrustedCheckpointError, match="legacy.pt: cannot list"):
        safe_load.load(f)


def test_allow_list_names_exist() -> None:
    # A renamed class in a new DeepSpeed/numpy would silently stop matching: each name must resolve
    # (numpy 1's module path is the one allowed exception on numpy 2, and the reverse).
    missing = [n for n in safe_load.ALLOWED_GLOBALS if safe_load._resolve(n) is None]
    assert set(missing) <= {"numpy.core.multiarray._reconstruct", "numpy._core.multiarray._reconstruct"}, (
        missing
    )
