"""Every recipe and every ds_configs/*.json loads and validates for world sizes 1, 2 and 64 (the ft_*
fine-tuning recipes at their 8)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from mico_ds.config import (
    RunConfig,
    config_from_dict,
    find_recipe,
    help_text,
    list_recipes,
    load_config,
    to_dict,
)
from mico_ds.distributed.ds_config import find_ds_config, list_ds_configs, resolve_ds_config

DS_CONFIGS = list_ds_configs()


def test_there_are_recipes_and_ds_configs():
    assert {"demo", "debug"} <= set(list_recipes())
    assert "zero3_cpu.json" in DS_CONFIGS


# The B.3 fine-tunes (ft_*) are 8-GPU recipes whose batch factors tests/unit/test_finetune_recipes.py
# checks: each resolves here once, at its 8 ranks; every other recipe at 1, 2 and 64.
RECIPE_WORLDS = [
    (recipe, world)
    for recipe in list_recipes()
    for world in ([8] if recipe.startswith("ft_") else [1, 2, 64])
]


@pytest.mark.parametrize("recipe, world", RECIPE_WORLDS)
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


def test_the_demo_tunes_its_rerank_weight_on_a_split_as_large_as_the_reported_one():
    # the rerank is harder in a larger gallery: a weight tuned on fewer items than val overweights
    # the matching head (docs/benchmarks.md, "Matching and the fused rerank")
    cfg = load_config("demo")
    e = cfg.eval
    assert e.rerank_tune_shards and e.rerank_tune_shards != cfg.data.val_shards
    assert e.rerank_tune_samples == e.max_samples == cfg.demo.num_val <= cfg.demo.num_tune
    assert cfg.objectives.matching_form == "listwise" and cfg.objectives.matching_negatives > 1


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


def test_a_choice_outside_its_literal_names_file_key_value_and_choices():
    with pytest.raises(ValueError) as e:
        load_config("debug", ["train.precision=fp16"])
    msg = str(e.value)
    assert "debug.yaml" in msg and "train.precision" in msg and "'fp16'" in msg
    assert "['auto', 'bf16', 'fp32']" in msg
    with pytest.raises(ValueError, match=r"optim\.schedule: unknown value 'step'"):
        load_config("debug", ["optim.schedule=step"])
    with pytest.raises(ValueError, match=r"eval\.tasks\[0\]: unknown value 'translation'"):
        load_config("debug", ["eval.tasks=[translation]"])
    with pytest.raises(ValueError, match="kernels"):  # a direct construction is checked too
        from mico_ds.config import ModelConfig

        ModelConfig(kernels="cuda")


def test_includes_merge_under_the_recipe_and_name_what_is_wrong(tmp_path: Path):
    (tmp_path / "frag").mkdir()
    (tmp_path / "frag" / "small_text.yaml").write_text(
        "model:\n  text:\n    hidden_size: 48\n    num_layers: 3\n"
    )
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "include: [debug.yaml, frag/small_text.yaml]\nname: r\nmodel:\n  text:\n    num_layers: 1\n"
    )
    (tmp_path / "debug.yaml").write_text(find_recipe("debug").read_text())  # next to the recipe
    cfg = load_config(str(recipe))
    base = load_config("debug")
    assert cfg.name == "r" and cfg.model.text.hidden_size == 48  # the fragment over the base
    assert cfg.model.text.num_layers == 1  # the recipe over its includes
    assert cfg.model.text.num_heads == base.model.text.num_heads  # mappings merge key by key
    assert [c.name for c in cfg.data.corpora] == [c.name for c in base.data.corpora]  # lists come whole
    recipe.write_text("include: [frag/nope.yaml]\n")
    with pytest.raises(ValueError, match=r"r\.yaml: include 'frag/nope\.yaml' not found"):
        load_config(str(recipe))
    recipe.write_text("include: [r.yaml]\n")
    with pytest.raises(ValueError, match="include cycle"):
        load_config(str(recipe))


def test_the_scale_recipes_share_their_fragments():
    from mico_ds.config import read_recipe

    for name in ("vitl_llama2_7b_32gpu", "vitg_llama2_7b_64gpu"):
        raw = yaml.safe_load(find_recipe(name).read_text())
        assert raw["include"] == ["base/mico_pretrain.yaml", "models/llama2_7b.yaml"]
        assert "corpora" not in raw.get("data", {}) and "text" not in raw.get("model", {})
        assert read_recipe(find_recipe(name))["model"]["text"]["hidden_size"] == 4096
    assert "base/mico_pretrain" not in list_recipes()  # fragments are not recipes


def test_global_batch_gives_the_per_rank_batch_or_names_every_factor():
    cfg = load_config("vitg_llama2_7b_64gpu")
    vast = cfg.data.corpora[0]
    assert vast.global_batch_size == 2048 and vast.batch_size is None
    cfg.data.resolve_batch_sizes(64, 1)
    assert vast.batch_size == 32
    cfg.data.resolve_batch_sizes(8, 2)
    assert vast.batch_size == 128
    with pytest.raises(ValueError) as e:
        cfg.data.resolve_batch_sizes(24, 1)
    for part in ("global_batch_size=2048", "world_size=24", "optim.grad_accum=1"):
        assert part in str(e.value)


def test_precision_has_one_owner(tmp_path: Path):
    cfg = load_config("debug", ["train.precision=bf16"])
    assert resolve_ds_config(cfg, 2)["bf16"]["enabled"] is True  # "auto" in the JSON, filled from the recipe
    assert resolve_ds_config(load_config("debug", ["train.precision=fp32"]), 2)["bf16"]["enabled"] is False
    ds = tmp_path / "bf16.json"
    ds.write_text(json.dumps({"bf16": {"enabled": True}, "zero_optimization": {"stage": 3}}))
    with pytest.raises(ValueError, match=r"bf16\.enabled=true disagrees with train\.precision='fp32'"):
        resolve_ds_config(load_config("debug", [f"train.ds_config={ds}", "train.precision=fp32"]), 2)
    for name in DS_CONFIGS:  # every shipped JSON leaves precision to the recipe
        assert (
            json.loads(find_ds_config(name).read_text()).get("bf16", {}).get("enabled", "auto") == "auto"
        ), name
