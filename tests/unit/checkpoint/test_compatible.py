"""The resume check of CheckpointManager: which config changes break exact continuation."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest

from mico_ds.checkpoint.manager import CheckpointManager
from mico_ds.config import load_config, to_dict


def _check(old: dict, new: dict, world: int = 2, allow: bool = False) -> None:
    me = SimpleNamespace(world=world, rank=0)
    CheckpointManager._check_compatible(me, {"config": old, "world_size": 2}, new, allow)  # type: ignore[arg-type]


def test_a_key_added_since_the_checkpoint_compares_as_its_default() -> None:
    new = to_dict(load_config("debug"))
    old = copy.deepcopy(new)
    for c in old["data"]["corpora"]:
        del c["resampled"]  # written before data.corpora[].resampled existed
    del old["data"]["shard_retries"]
    _check(old, new)


def test_a_changed_exactness_key_is_refused_and_named() -> None:
    new = to_dict(load_config("debug"))
    old = copy.deepcopy(new)
    old["data"]["corpora"][0]["resampled"] = True
    with pytest.raises(ValueError, match=r"changed \['data.corpora'\]"):
        _check(old, new)
    _check(old, new, allow=True)
    with pytest.raises(ValueError, match=r"world_size \(2 -> 4\)"):
        _check(copy.deepcopy(new), new, world=4)


def test_an_old_config_that_no_longer_parses_is_an_error() -> None:
    new = to_dict(load_config("debug"))
    old = copy.deepcopy(new)
    old["data"]["no_such_key"] = 1
    with pytest.raises(ValueError, match="no_such_key"):
        _check(old, new)
