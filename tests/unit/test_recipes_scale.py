"""The real-size recipes: built on the meta device (no memory), parameter counts against the published
figures, the paper's batch sizes and schedule, ZeRO-3 settings checked against the installed DeepSpeed,
and every GPU DeepSpeed JSON driving a real engine for two steps on one CPU rank."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mico_ds.config import RunConfig, find_recipe, load_config
from mico_ds.data.read.mixture import step_counts
from mico_ds.data.schema import SpecialTokens
from mico_ds.distributed.ds_config import find_ds_config, offloads_optimizer, resolve_ds_config
from mico_ds.models.mico import MiCoModel
from tests.helpers.ranks import run_ranks

# Llama-2's tokenizer (32000 pieces) plus the <pad> and <mask> our tokenizer adds.
LLAMA2_SPECIAL = SpecialTokens(vocab_size=32002, pad_id=32000, bos_id=1, eos_id=2, mask_id=32001)

# Published parameter counts: ViT-B/16 86M (Dosovitskiy et al. 2021, Table 1); ViT-L/14 304M (CLIP
# ViT-L/14 image tower, Radford et al. 2021 / EVA-CLIP tables; "0.30B"); ViT-g/14 1.011B (Zhai et al.
# 2022, Table 2: 1011M); Llama-2-7B 6.74B (6,738,415,616, Touvron et al. 2023 / the HF checkpoint);
# TinyLlama-1.1B 1.10B (1,100,048,384, Zhang et al. 2024 / the HF checkpoint).
RECIPES = {
    "vitb_tinyllama_8gpu": {"vision": 86e6, "text": 1.100e9, "world": 8, "steps": 200_000},
    "vitl_llama2_7b_32gpu": {"vision": 304e6, "text": 6.74e9, "world": 32, "steps": 300_000},
    "vitg_llama2_7b_64gpu": {"vision": 1.011e9, "text": 6.74e9, "world": 64, "steps": 300_000},
}
# appendix B.2: per-corpus GLOBAL batch sizes and steps (of 300k)
PAPER_BATCH = {"vast27m": 2048, "valor1m": 1024, "wavcaps_cc4m_webvid": 1024}
PAPER_STEPS = {"vast27m": 160_000, "valor1m": 70_000, "wavcaps_cc4m_webvid": 70_000}

# Every stage3_* key DeepSpeed 0.19 knows (zero/config.py aliases), the deprecated fp16 one excluded.
STAGE3_KEYS = {
    "stage3_prefetch_bucket_size", "stage3_param_persistence_threshold", "stage3_model_persistence_threshold",
    "stage3_max_live_parameters", "stage3_max_reuse_distance", "stage3_gather_16bit_weights_on_model_save",
    "stage3_module_granularity_threshold", "stage3_use_all_reduce_for_fetch_params",
    "stage3_allgather_sequential",
}  # fmt: skip
GPU_DS_CONFIGS = ["zero3_bf16_1b.json", "zero3_bf16_7b.json", "zero3_bf16_7b_offload.json"]


def _meta_model(cfg: RunConfig) -> MiCoModel:
    # The pretrained directories are placeholders here; the architecture is the recipe's sizes (a real
    # directory's config.json must match them: text_branch.pretrained_llama_config checks it).
    cfg.model.vision.pretrained = cfg.model.text.pretrained = None
    with torch.device("meta"):
        return MiCoModel.from_run_config(cfg, LLAMA2_SPECIAL)


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_builds_on_meta_with_published_parameter_counts(recipe: str) -> None:
    ref = RECIPES[recipe]
    model = _meta_model(load_config(recipe))
    assert all(p.is_meta for p in model.parameters())
    enc = model.encoder
    # the ViT proper (what the published figures count): everything but the extra modality tokenizers
    extra = sum(p.numel() for t in ("normal", "depth", "audio") for p in enc.tokenizers[t].parameters())
    vit = sum(p.numel() for p in enc.parameters()) - extra
    # the Llama proper: the text branch without the 2 rows our tokenizer adds to embeddings and head
    text = sum(p.numel() for p in model.text.parameters()) - 2 * 2 * model.text.hidden_size
    assert vit == pytest.approx(ref["vision"], rel=0.01), vit
    assert text == pytest.approx(ref["text"], rel=0.01), text
    if "llama2_7b" in recipe:
        assert text == 6_738_415_616  # exactly the released Llama-2-7B
    # SDPA in both branches and activation checkpointing on
    assert model.text.llm.config._attn_implementation == "sdpa"
    assert all(blk.attn.fused_attn for blk in enc.blocks)  # timm's F.scaled_dot_product_attention path
    assert enc.grad_checkpointing and model.text.llm.is_gradient_checkpointing


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_paper_batches_steps_and_schedule(recipe: str) -> None:
    ref = RECIPES[recipe]
    cfg = load_config(recipe)
    world = cfg.launch["nodes"] * cfg.launch["gpus_per_node"]
    assert world == ref["world"]
    cfg.data.resolve_batch_sizes(world, cfg.optim.grad_accum)  # per-rank sizes from the global batches
    for c in cfg.data.corpora:
        if c.name in PAPER_BATCH:
            assert c.batch_size * cfg.optim.grad_accum * world == PAPER_BATCH[c.name], c.name
    counts = dict(zip([c.name for c in cfg.data.corpora], step_counts(cfg.data.corpora, cfg.train.max_steps)))
    assert sum(counts.values()) == cfg.train.max_steps == ref["steps"]
    if ref["steps"] == 300_000:
        assert {k: counts[k] for k in PAPER_STEPS} == PAPER_STEPS
    else:  # the same shares of a shorter run
        for k, v in PAPER_STEPS.items():
            assert counts[k] == pytest.approx(v * ref["steps"] / 300_000, abs=1)
    assert cfg.optim.lr == 1e-4 and cfg.optim.schedule == "linear" and cfg.optim.min_lr_ratio == 0.0
    assert cfg.train.precision == "bf16"
    # the batch factors resolve for 64 ranks (and the recipe's own world size)
    for w in (64, world):
        ds = resolve_ds_config(cfg, w)
        micro = max(c.batch_size for c in cfg.data.corpora)
        assert ds["train_batch_size"] == micro * cfg.optim.grad_accum * w
        assert ds["bf16"]["enabled"] is True and ds["zero_optimization"]["stage"] == 3


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_recipe_opens_with_its_command(recipe: str) -> None:
    head = find_recipe(recipe).read_text().splitlines()[:8]
    assert head[0].startswith("#")
    text = "\n".join(head)
    assert "sbatch -N" in text and "launch/slurm_pretrain.sh" in text and f"--recipe {recipe}" in text


@pytest.mark.parametrize("name", GPU_DS_CONFIGS)
def test_gpu_ds_configs_set_every_stage3_key(name: str) -> None:
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    raw = json.loads(find_ds_config(name).read_text())
    z = raw["zero_optimization"]
    assert set(z) >= STAGE3_KEYS, sorted(STAGE3_KEYS - set(z))
    assert not [k for k in raw if k.startswith("stage3_")]
    # the installed DeepSpeed validates the names and values (its config models forbid unknown keys)
    parsed = DeepSpeedZeroConfig(**z)
    assert parsed.stage == 3 and parsed.overlap_comm and parsed.contiguous_gradients
    assert parsed.prefetch_bucket_size == z["stage3_prefetch_bucket_size"]
    assert raw["bf16"]["enabled"] == "auto"  # train.precision decides (bf16 in the GPU recipes, below)
    assert offloads_optimizer(raw) == ("offload" in name)
    if "offload" in name:
        assert z["offload_param"]["device"] == "cpu" and z["offload_optimizer"]["device"] == "cpu"
    with pytest.raises(Exception, match="stage3_prefetch_bucket_sizee"):
        DeepSpeedZeroConfig(**{**z, "stage3_prefetch_bucket_sizee": 1})


def _engine_worker(rank: int, name: str) -> list[float]:
    """Two steps of a real ZeRO-3 engine with this JSON (bf16, overlap_comm, buckets) on a CPU rank."""
    import deepspeed

    from mico_ds.distributed.engine import make_optimizer

    cfg = load_config("debug", [f"train.ds_config={name}", "train.precision=bf16"])
    ds = resolve_ds_config(cfg, 1)
    with deepspeed.zero.Init(config_dict_or_path=ds):
        model = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.GELU(), torch.nn.Linear(64, 4))
    groups = [{"params": list(model.parameters()), "weight_decay": 0.0}]
    engine, *_ = deepspeed.initialize(model=model, optimizer=make_optimizer(groups, cfg, ds), config=ds)
    losses = []
    for step in range(2):
        x = torch.randn(
            ds["train_micro_batch_size_per_gpu"], 16, generator=torch.Generator().manual_seed(step)
        )
        loss = engine(x.to(torch.bfloat16)).float().square().mean()
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("name", [n for n in GPU_DS_CONFIGS if "offload" not in n])
def test_gpu_ds_configs_drive_a_real_engine(name: str, tmp_path: Path) -> None:
    # (the offload variant needs DeepSpeed's CPU Adam op, a C++ build of minutes on first use; it was
    # run by hand: docs/scale.md)
    (losses,) = run_ranks(_engine_worker, 1, tmp_path, name)
    assert len(losses) == 2 and all(map(torch.isfinite, torch.tensor(losses)))
