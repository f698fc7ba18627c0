"""Learning-rate schedule, parameter groups and checkpoint retention (no process group needed)."""

from __future__ import annotations

import math

import pytest
import torch

from mico_ds.checkpoint import read_latest, select_to_delete, tag_for, write_latest
from mico_ds.checkpoint.layout import read_best, write_best
from mico_ds.config import load_config
from mico_ds.optim import lr_lambda, param_groups


def test_warmup_then_linear_decay_to_min():
    cfg = load_config("debug", ["train.max_steps=110", "optim.warmup_steps=10", "optim.min_lr_ratio=0.1"])
    f = lr_lambda(cfg.optim, cfg.train.max_steps)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.1 + 0.9 * 0.5)
    assert f(110) == pytest.approx(0.1) and f(500) == pytest.approx(0.1)


def test_cosine_schedule_midpoint():
    cfg = load_config("debug", ["train.max_steps=20", "optim.warmup_steps=0", "optim.schedule=cosine"])
    f = lr_lambda(cfg.optim, cfg.train.max_steps)
    assert f(10) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))
    with pytest.raises(ValueError, match="schedule"):
        cfg = load_config("debug", ["optim.schedule=step", "optim.warmup_steps=0"])
        lr_lambda(cfg.optim, cfg.train.max_steps)(1)


class _Toy(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = torch.nn.Linear(4, 4)
        self.text = torch.nn.Linear(4, 4)
        self.scale = torch.nn.Parameter(torch.zeros(()))


def test_param_groups_decay_matrices_only_and_branch_scales():
    cfg = load_config("debug", ["optim.vision_lr_scale=0.1", "optim.weight_decay=0.3", "optim.lr=1.0"])
    m = _Toy()
    groups = param_groups(m, cfg.optim)
    by_param = {id(p): g for g in groups for p in g["params"]}
    assert by_param[id(m.encoder.weight)]["weight_decay"] == 0.3
    assert by_param[id(m.encoder.weight)]["lr"] == pytest.approx(0.1)
    assert by_param[id(m.encoder.bias)]["weight_decay"] == 0.0
    assert by_param[id(m.text.weight)]["lr"] == pytest.approx(1.0)
    assert by_param[id(m.scale)]["weight_decay"] == 0.0
    assert sum(len(g["params"]) for g in groups) == 5


def test_param_groups_use_ds_shape_of_partitioned_params():
    m = _Toy()
    m.text.weight.data = torch.zeros(8)  # what a ZeRO-3 partition looks like locally: flat
    m.text.weight.ds_shape = torch.Size([4, 4])
    groups = param_groups(m, load_config("debug", ["optim.weight_decay=0.5"]).optim)
    g = next(g for g in groups if any(p is m.text.weight for p in g["params"]))
    assert g["weight_decay"] == 0.5


def test_zero_scale_freezes_branch():
    m = _Toy()
    groups = param_groups(m, load_config("debug", ["optim.text_lr_scale=0"]).optim)
    assert not m.text.weight.requires_grad
    assert all(p is not m.text.weight for g in groups for p in g["params"])


def test_retention_keeps_last_k_and_every_mth():
    tags = [tag_for(s) for s in (100, 200, 300, 400, 500, 600)]
    assert select_to_delete(tags, tag_for(600), keep_last=2, keep_every=300) == [
        tag_for(100),
        tag_for(200),
        tag_for(400),
    ]
    # a save in progress (newer than latest) is never touched, and latest is always kept
    assert tag_for(700) not in select_to_delete(tags + [tag_for(700)], tag_for(600), 1, 0)
    assert select_to_delete(tags, None, 1, 0) == []
    # checkpoint.keep_best: the tag best.json names is kept too
    assert select_to_delete(tags, tag_for(600), 1, 0, protect=[tag_for(200)]) == [
        tag_for(s) for s in (100, 300, 400, 500)
    ]


def test_best_record_round_trips_and_names_a_bad_file(tmp_path):
    assert read_best(tmp_path) is None
    write_best(tmp_path, {"tag": "step00000002", "step": 2, "metric": "retrieval/t2k_r1", "value": 12.5})
    assert read_best(tmp_path)["tag"] == "step00000002"
    (tmp_path / "best.json").write_text("{not json")
    with pytest.raises(ValueError, match="best.json is not JSON"):
        read_best(tmp_path)


def test_latest_is_replaced_atomically(tmp_path):
    write_latest(tmp_path, "step00000001")
    write_latest(tmp_path, "step00000002")
    assert read_latest(tmp_path) == "step00000002"
    assert [p.name for p in tmp_path.iterdir()] == ["latest"]
