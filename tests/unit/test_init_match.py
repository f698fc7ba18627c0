"""``--init``'s comparison of a checkpoint with the model (mico_ds.distributed.init_load), one process."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from mico_ds.distributed.init_load import init_from, match_keys


class Net(nn.Module):
    def __init__(self, out: int = 4) -> None:
        super().__init__()
        self.body = nn.Linear(3, 5)
        self.head = nn.Linear(5, out)


def test_loaded_added_and_unused_keys_are_listed(tmp_path: Path):
    src = Net()
    sd = {k: v for k, v in src.state_dict().items() if not k.startswith("head.")}
    sd["old_head.weight"] = torch.zeros(2, 5)
    save_file(sd, str(tmp_path / "model.safetensors"))
    dst = Net()
    report = init_from(dst, str(tmp_path / "model.safetensors"), zero3=False)
    assert report.kind == "state_dict"
    assert report.loaded == ["body.weight", "body.bias"]
    assert report.added == ["head.weight", "head.bias"]
    assert report.unused == ["old_head.weight"]
    assert torch.equal(dst.body.weight, src.body.weight) and not torch.equal(dst.head.weight, src.head.weight)


def test_a_tensor_that_does_not_fit_is_named_with_both_shapes(tmp_path: Path):
    save_file(Net(out=4).state_dict(), str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match=r"head\.weight: checkpoint \(4, 5\), model \(6, 5\)") as e:
        init_from(Net(out=6), str(tmp_path / "model.safetensors"), zero3=False)
    assert "head.bias: checkpoint (4,), model (6,)" in str(e.value)
    assert "body" not in str(e.value)  # only the misfits are named


def test_no_name_in_common_is_an_error():
    with pytest.raises(ValueError, match="no tensor name in common"):
        match_keys({"a.weight": (2,)}, {"b.weight": (2,)}, "--init x")


def test_a_missing_path_is_named(tmp_path: Path):
    with pytest.raises(ValueError, match="--init .*gone"):
        init_from(Net(), str(tmp_path / "gone"), zero3=False)
