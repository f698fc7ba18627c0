"""The fine-tuning recipes of MiCo appendix B.3 (``mico_ds/recipes/ft_*.yaml``, docs/finetune_recipes.md):
one per B.3 row, each loading strictly, accepted by its task, its batch resolving on 8 GPUs, and its
learning rate, global batch, steps, resolution, frames and clips those of the table below, written
from B.3 by hand (a wrong edit of a recipe fails here)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from fractions import Fraction
from math import ceil
from pathlib import Path

import pytest

from mico_ds import tasks
from mico_ds.config import find_recipe, list_recipes, load_config
from mico_ds.distributed.ds_config import resolve_ds_config

REPO = Path(__file__).resolve().parents[2]
DOC = REPO / "docs" / "finetune_recipes.md"
PRETRAIN = "vitg_llama2_7b_64gpu"  # the pretraining recipe whose run the fine-tunes start from (--init)
WORLD = 8
PATCH = 14  # ViT-g/14: image sides are multiples of 14


@dataclass(frozen=True)
class Row:
    """One B.3 row, and the training entries one of its epochs passes over (captions or questions)."""

    task: str
    lr: float
    batch: int  # global
    epochs: str  # exact decimal (3.6 x 180,000 / 64 is 10,125, not 10,126)
    entries: int  # training captions / questions (docs/finetune_recipes.md, "What an epoch is")
    test_items: int  # items of the test split the evaluation must cover
    res: int | None = None  # B.3's resolution
    frames: tuple[int, int] | None = None  # (train, test)
    clips: int | None = None  # audio clips, train = test in every B.3 row
    scst: bool = False  # self-critical training (task.scst.enabled), B.3's "MSCOCO(SCST)"
    after: str | None = None  # the recipe whose run --init reads (a second stage); None: the pretraining's


# fmt: off
B3: dict[str, Row] = {
    # retrieval
    "ft_msrvtt_ret":    Row("retrieval", 2e-5, 64, "3.6", 180_000, 1000, 224, (8, 16)),
    "ft_vatex_ret":     Row("retrieval", 2e-5, 64, "2.5", 259_910, 1500, 224, (8, 16)),
    "ft_youcook2_ret":  Row("retrieval", 3e-5, 64, "30", 10_337, 3492, 224, (8, 16)),
    "ft_valor32k_ret":  Row("retrieval", 2e-5, 64, "10", 25_000, 3500, 224, (8, 8)),
    "ft_didemo_ret":    Row("retrieval", 2e-5, 64, "40", 8_394, 1003, 224, (8, 32), 2),
    "ft_anet_ret":      Row("retrieval", 2e-5, 64, "20", 10_009, 4917, 224, (8, 32), 2),
    "ft_coco_ret":      Row("retrieval", 1e-5, 256, "5", 566_747, 5000, 384),
    "ft_flickr_ret":    Row("retrieval", 1e-5, 256, "5", 145_000, 1000, 384),
    "ft_audiocaps_ret": Row("retrieval", 2e-5, 64, "10", 49_838, 975, clips=1),
    "ft_clotho_ret":    Row("retrieval", 2e-5, 64, "10", 19_195, 1045, clips=3),
    # captioning
    "ft_coco_cap":      Row("captioning", 1e-5, 64, "5", 566_747, 5000, 480),
    "ft_coco_cap_scst": Row("captioning", 2.5e-6, 64, "2.5", 566_747, 5000, 480,
                            scst=True, after="ft_coco_cap"),
    "ft_msrvtt_cap":    Row("captioning", 2e-5, 128, "10", 130_260, 2990, 224, (8, 8)),
    "ft_youcook2_cap":  Row("captioning", 3e-5, 64, "30", 10_337, 3492, 224, (8, 16)),
    "ft_valor32k_cap":  Row("captioning", 1e-5, 64, "10", 25_000, 3500, 224, (8, 12)),
    "ft_audiocaps_cap": Row("captioning", 2e-5, 64, "10", 49_838, 975, clips=1),
    "ft_clotho_cap":    Row("captioning", 2e-5, 64, "10", 19_195, 1045, clips=3),
    # question answering
    "ft_msvd_qa":       Row("qa", 1e-5, 64, "10", 30_933, 520, 224, (8, 14)),
    "ft_tgif_qa":       Row("qa", 2e-5, 64, "10", 39_392, 13_691, 224, (4, 4)),
    "ft_vqav2_qa":      Row("qa", 2e-5, 128, "20", 443_757, 40_504, 384),
    "ft_msrvtt_qa":     Row("qa", 2e-5, 64, "4.5", 158_581, 2990, 224, (8, 8), 1),
    "ft_music_avqa_qa": Row("qa", 2e-5, 64, "20", 32_087, 6399, 224, (8, 8), 2),
    "ft_anet_qa":       Row("qa", 2e-5, 64, "10", 32_000, 800, 224, (8, 16), 2),
}
# fmt: on
EVAL_SIZE = {"retrieval": "max_samples", "captioning": "caption_samples", "qa": "qa_samples"}
NAMES = sorted(B3)


def steps(row: Row) -> int:
    return ceil(Fraction(row.epochs) * row.entries / row.batch)


def test_one_recipe_per_b3_row() -> None:
    assert sorted(r for r in list_recipes() if r.startswith("ft_")) == NAMES


@pytest.mark.parametrize("name", NAMES)
def test_recipe_loads_strictly_passes_its_task_and_resolves_on_8_gpus(name: str) -> None:
    row = B3[name]
    cfg = load_config(name)  # strict: an unknown key anywhere raises
    assert cfg.name == name and cfg.task.name == row.task
    tasks.get(cfg.task.name).check(cfg)
    assert cfg.eval.tasks == [row.task]
    assert cfg.launch["nodes"] * cfg.launch["gpus_per_node"] == WORLD
    cfg.data.resolve_batch_sizes(WORLD, cfg.optim.grad_accum)
    (corpus,) = cfg.data.corpora
    assert corpus.batch_size * cfg.optim.grad_accum * WORLD == row.batch
    ds = resolve_ds_config(cfg, WORLD)
    assert ds["train_batch_size"] == row.batch and ds["zero_optimization"]["stage"] == 3
    assert ds["bf16"]["enabled"] is True


@pytest.mark.parametrize("name", NAMES)
def test_recipe_has_the_b3_settings(name: str) -> None:
    row, cfg = B3[name], load_config(name)
    assert cfg.optim.lr == row.lr
    assert cfg.data.corpora[0].global_batch_size == row.batch
    assert cfg.train.max_steps == steps(row)
    if row.res is not None:
        assert cfg.inputs.image_size == PATCH * (row.res // PATCH)  # B.3's patch grid on the /14 ViT
    if row.frames is not None:
        assert (cfg.inputs.num_frames, cfg.inputs.eval_num_frames) == row.frames
        assert "video" in cfg.data.corpora[0].modalities
    if row.clips is not None:
        assert cfg.inputs.num_clips == row.clips
    mods = set(cfg.data.corpora[0].modalities)
    if row.clips is not None or (row.res is None and row.frames is None):
        assert "audio" in mods
    if row.res is not None and row.frames is None:
        assert mods == {"image"}
    assert cfg.data.val_modalities == cfg.data.corpora[0].modalities
    assert cfg.task.scst.enabled is row.scst


@pytest.mark.parametrize("name", [n for n in NAMES if B3[n].after])
def test_second_stage_is_its_first_stage_but_for_its_b3_settings(name: str) -> None:
    # B.3's MSCOCO(SCST) row: the cross-entropy stage's recipe (model, data, splits, evaluation), its own
    # learning rate and length, SCST with ScstConfig's defaults (B.3 gives no other SCST setting)
    from dataclasses import asdict, replace

    from mico_ds.config.scst_section import ScstConfig

    cfg, first = load_config(name), load_config(B3[name].after)
    assert cfg.task.scst == ScstConfig(enabled=True)
    own = replace(
        first,
        name=cfg.name,
        task=replace(first.task, scst=cfg.task.scst),
        optim=replace(first.optim, lr=cfg.optim.lr, warmup_steps=cfg.optim.warmup_steps),
        train=replace(first.train, max_steps=cfg.train.max_steps, eval_every=cfg.train.eval_every,
                      save_every=cfg.train.save_every),
    )  # fmt: skip
    assert asdict(cfg) == asdict(own)


@pytest.mark.parametrize("name", NAMES)
def test_recipe_fine_tunes_the_pretrained_model(name: str) -> None:
    row, cfg, pre = B3[name], load_config(name), load_config(PRETRAIN)
    # the pretraining recipe's model (the checkpoint comes from --init); only the context table may grow
    # to hold B.3's test frames
    assert cfg.model.vision == pre.model.vision and cfg.model.text == pre.model.text
    assert cfg.model.embed_dim == pre.model.embed_dim and cfg.data.tokenizer == pre.data.tokenizer
    ctx, pre_ctx = cfg.model.context, pre.model.context
    assert (ctx.tokens_per_frame, ctx.max_positions, ctx.fusion_layers) == (
        pre_ctx.tokens_per_frame, pre_ctx.max_positions, pre_ctx.fusion_layers)  # fmt: skip
    frames = max(cfg.inputs.num_frames, cfg.inputs.eval_num_frames or 0) if row.frames else 1
    assert frames * ctx.tokens_per_frame <= ctx.max_context_len
    assert ctx.max_context_len in (pre_ctx.max_context_len, 160)
    if ctx.max_context_len != pre_ctx.max_context_len:
        assert frames * ctx.tokens_per_frame > pre_ctx.max_context_len  # grown only where it must
    # objectives of the task
    o = cfg.objectives
    if row.task == "retrieval":
        assert (o.contrastive_weight, o.matching_weight, o.generation_weight) == (1.0, 1.0, 0.0)
    else:
        assert (o.contrastive_weight, o.matching_weight, o.generation_weight) == (0.0, 0.0, 1.0)
    # what B.3 leaves open: the pretraining recipe's optimizer, warmup 10% of the steps
    assert (cfg.optim.weight_decay, cfg.optim.betas, cfg.optim.schedule, cfg.optim.grad_clip) == (
        pre.optim.weight_decay, pre.optim.betas, pre.optim.schedule, pre.optim.grad_clip)  # fmt: skip
    assert cfg.optim.warmup_steps == ceil(cfg.train.max_steps / 10)
    # val / test splits, the best checkpoint kept, about five evaluations, a checkpoint at each
    assert cfg.data.val_shards and cfg.data.test_shards
    assert cfg.checkpoint.keep_best and cfg.checkpoint.best_metric is None
    assert 4 <= cfg.train.max_steps / cfg.train.eval_every <= 5
    assert cfg.train.save_every == cfg.train.eval_every
    assert getattr(cfg.eval, EVAL_SIZE[row.task]) == row.test_items  # the whole test split


@pytest.mark.parametrize("name", NAMES)
def test_recipe_opens_with_its_commands(name: str) -> None:
    from mico_ds.data.write.formats import available

    lines = find_recipe(name).read_text().splitlines()
    head = lines[: lines.index(next(x for x in lines if not x.startswith("#")))]
    assert head and head[0].startswith("# ")
    text = "\n".join(head)
    assert re.search(
        rf"^#   deepspeed --num_gpus {WORLD} --module mico_ds\.train --recipe {name} --init \S+ "
        rf"--run-dir runs/{name}$", text, re.M)  # fmt: skip
    init = re.search(r"^#   deepspeed .* --init (\S+) ", text, re.M).group(1)
    row = B3[name]
    # a second stage starts from its first stage's run (that recipe's --run-dir), the others from pretraining
    assert init == (f"runs/{row.after}" if row.after else "/shared/runs/vitg_llama2_7b")
    formats = re.findall(r"^#   python tools/make_shards\.py --format (\S+) .*--out \S+$", text, re.M)
    assert formats and set(formats) <= set(available()), formats
    assert f"{row.entries:,}" in text  # the split size the steps come from, and where it comes from
    assert f"= {steps(row):,}" in text


def test_docs_table_has_every_recipe_with_its_steps() -> None:
    rows = {m.group(1): m.group(0) for m in re.finditer(r"^\| `(ft_\w+)` \|.*$", DOC.read_text(), re.M)}
    assert sorted(rows) == NAMES
    for name in NAMES:
        row = B3[name]
        cells = [c.strip() for c in rows[name].strip("|").split("|")]
        assert f"{steps(row):,}" in cells and f"{row.entries:,}" in " ".join(cells), rows[name]
