"""Every recipe and every ds_configs/*.json loads and validates for world sizes 1, 2 and 64."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mico_ds.config import RunConfig, config_from_dict, help_text, list_recipes, load_config, to_dict
from mico_ds.distributed.ds_config import find_ds_config, list_ds_configs, resolve_ds_config

DS_CONFIGS = list_ds_configs()


def test_there_are_recipes_and_ds_configs():
    assert {"demo", "debug"} <= set(list_recipes())
    assert "zero3_cpu.json" in DS_CONFIGS


@pytest.mark.parametrize("recipe", list_recipes())
@pytest.mark.parametrize("world", [1, 2, 64])
def test_recipe_resolves(recipe: str, world: int):
    cfg = load_config(recipe)
    ds = resolve_ds_config(cfg, world)
    micro = max(c.batch_size for c in cfg.data.corpora)
    assert ds["train_micro_batch_size_per_gpu"] == micro
    assert ds["train_batch_size"] == micro * cfg.optim.grad_accum * world
    # the resolved config round-trips through its plain form (what config.yaml holds)
    assert to_dict(config_from_dict(to_dict(cfg))) == to_dict(cfg)


@pytest.mark.parametrize("ds_name", DS_CONFIGS)
@pytest.mark.parametrize("world", [1, 2, 64])
def test_every_ds_config_resolves(ds_name: str, world: int):
    cfg = load_config("debug", [f"train.ds_config={ds_name}"])
    ds = resolve_ds_config(cfg, world)
    assert all(v != "auto" for v in (ds["train_batch_size"], ds["gradient_accumulation_steps"]))
    assert ds["bf16"]["enabled"] in (True, False)
    raw = json.loads(find_ds_config(ds_name).read_text())
    assert not [k for k in raw if k.startswith("stage3_")], "stage3_* keys belong in zero_optimization"


def test_unknown_key_is_an_error_naming_it():
    with pytest.raises(ValueError, match=r"optim: unknown key\(s\) \['lrr'\]"):
        load_config("debug", ["optim.lrr=1"])
    with pytest.raises(ValueError, match="nope"):
        load_config("debug", ["nope.x=1"])


def test_overrides_are_typed():
    cfg = load_config("debug", ["--optim.lr=3e-4", "train.max_steps=7", "model.vision.width=48"])
    assert cfg.optim.lr == pytest.approx(3e-4) and isinstance(cfg.optim.lr, float)
    assert cfg.train.max_steps == 7 and cfg.model.vision.width == 48
    with pytest.raises(ValueError, match="expected int"):
        load_config("debug", ["train.max_steps=many"])


def test_an_integer_part_of_an_override_indexes_a_list():
    base = load_config("demo")
    cfg = load_config("demo", ["--data.corpora.4.weight=1", "--data.corpora.0.batch_size=8"])
    assert [c.name for c in cfg.data.corpora] == [c.name for c in base.data.corpora]
    assert cfg.data.corpora[4].name == "joined" and cfg.data.corpora[4].weight == 1.0
    assert cfg.data.corpora[0].batch_size == 8 and base.data.corpora[0].batch_size != 8
    for bad in ("data.corpora.5.weight=1", "data.corpora.joined.weight=1"):
        with pytest.raises(ValueError, match=r"data\.corpora is a list of 5"):
            load_config("demo", [bad])
    with pytest.raises(ValueError, match="unknown"):  # the keys under an index are still checked
        load_config("demo", ["data.corpora.0.wieght=1"])


def test_bad_modality_and_join_are_rejected():
    with pytest.raises(ValueError, match="unknown"):
        config_from_dict({"data": {"corpora": [{"name": "a", "modalities": ["smell"]}]}})
    with pytest.raises(ValueError, match="joined_from names unknown"):
        config_from_dict({"data": {"corpora": [{"name": "a", "joined_from": ["b"]}]}})


def test_batch_mismatch_names_every_factor(tmp_path: Path):
    ds = tmp_path / "bad.json"
    ds.write_text(json.dumps({"train_batch_size": 100, "zero_optimization": {"stage": 3}}))
    cfg = load_config("debug", [f"train.ds_config={ds}"])
    with pytest.raises(ValueError) as e:
        resolve_ds_config(cfg, 64)
    msg = str(e.value)
    for part in (
        "train_batch_size=100",
        "train_micro_batch_size_per_gpu=4",
        "gradient_accumulation_steps=1",
        "world_size=64",
    ):
        assert part in msg


def test_misplaced_stage3_key_is_rejected(tmp_path: Path):
    ds = tmp_path / "bad.json"
    ds.write_text(json.dumps({"stage3_prefetch_bucket_size": 1, "zero_optimization": {"stage": 3}}))
    with pytest.raises(ValueError, match="inside zero_optimization"):
        resolve_ds_config(load_config("debug", [f"train.ds_config={ds}"]), 2)


def test_help_text_documents_every_section():
    text = help_text()
    for f in RunConfig.__dataclass_fields__:
        if f not in ("name", "launch"):
            assert f"[{f}]" in text
    assert "--optim.lr=" in text and "Peak learning rate" in text
