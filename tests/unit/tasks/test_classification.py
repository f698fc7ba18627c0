"""The classification task (mico_ds/tasks/classification.py, MiCo Table 10): labels read from real
``make_shards --format imagefolder | labels-csv`` shards, the config section and the task's refusals,
the loss against timm's, seeded mixup / CutMix / SpecAugment, top-1 / top-5 against a hand count, the
evaluation runner end to end, and a short CPU training that learns a separable 3-class problem."""

from __future__ import annotations

import csv
import json
import shlex
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from timm.data.mixup import mixup_target
from timm.loss import SoftTargetCrossEntropy

from mico_ds import tasks
from mico_ds.cli import make_shards
from mico_ds.config import DataConfig, InputConfig, help_text, load_config
from mico_ds.config.task_sections import ClassificationConfig
from mico_ds.data import schema
from mico_ds.data.io import expand_urls
from mico_ds.data.read.mixture import build_train_loader
from mico_ds.data.read.plan import StreamPlan
from mico_ds.data.read.skips import SkipSample
from mico_ds.data.read.stream import ShardStream, StreamSpec
from mico_ds.data.write import media
from mico_ds.eval.classification import evaluate_classification, read_labels
from mico_ds.eval.runner import format_results, run_evaluation
from mico_ds.models.mico import MiCoModel
from mico_ds.objectives.classification import (
    LABELS,
    ClassificationStream,
    apply_mix,
    band_masks,
    class_logits,
    draw_mix,
    soft_targets,
    spec_augment,
)
from mico_ds.objectives.seeding import step_generator
from mico_ds.tasks.classification import LABEL_OUT_OF_RANGE, NO_LABEL, ClassificationSamples
from tests.helpers.doc_commands import REPO, commands
from tests.helpers.tiny import make_random_batch, make_tiny_config, make_tiny_special

INPUTS = InputConfig(image_size=32, num_frames=2, mel_bins=16, clip_frames=32, num_clips=1)
COLOURS = {"cat": (200, 40, 40), "dog": (40, 200, 40), "eel": (40, 40, 200)}  # classes.json: sorted
OFF = ["objectives.contrastive_weight=0", "objectives.matching_weight=0", "objectives.generation_weight=0"]
CLS = ["task.name=classification", "task.classification.num_classes=3", "eval.tasks=[classification]"]


def write_imagefolder(root: Path, per_class: int = 2) -> None:
    rng = np.random.default_rng(0)
    for name, rgb in COLOURS.items():
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            img = np.clip(np.array(rgb) + rng.integers(-20, 20, (24, 24, 3)), 0, 255).astype(np.uint8)
            (root / name / f"{name}{i}.jpg").write_bytes(media.encode_jpeg(img))


def make(fmt: str, out: Path, root: Path, *ann: Path) -> None:
    files = ["--annotations", *map(str, ann)] if ann else []
    args = ["--format", fmt, *files, "--media-root", str(root), "--out", str(out), "--samples-per-shard", "2",
            "--workers", "1", "--quiet", "--max-skip", "0"]  # fmt: skip
    assert make_shards.main(args) == 0


@pytest.fixture(scope="module")
def imagefolder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("cls")
    write_imagefolder(tmp / "train")
    make("imagefolder", tmp / "shards", tmp / "train")
    return tmp / "shards"


def stream(urls: list[str], modalities: tuple[str, ...], task: ClassificationSamples, train: bool = True):
    spec = StreamSpec(
        corpus="c", plan=StreamPlan(urls=tuple(urls), num_streams=1, shuffle=False, shuffle_buffer=0),
        modalities=modalities, inputs=INPUTS, batch_size=16, train=train, tokenizer=None, text_max_len=16,
        rank=0, workers=1, positions=[(0, 0, 0)], infinite=False, drop_last=False, task=task,
        require_caption=task.needs_captions,
    )  # fmt: skip
    return list(ShardStream(spec))


def cls_config(**task: object):
    """The tiny model's RunConfig for task.name=classification (3 classes, no other objective)."""
    cfg = make_tiny_config()
    for k in ("contrastive_weight", "matching_weight", "generation_weight"):
        setattr(cfg.objectives, k, 0.0)
    cfg.task.name = "classification"
    cfg.task.classification = ClassificationConfig(
        **{"num_classes": 3, "spec_freq_mask": 4, "spec_time_mask": 8, **task}  # type: ignore[arg-type]
    )
    cfg.eval.tasks = ["classification"]
    return cfg


# ----------------------------------------------------------------------------- labels from shards


def test_labels_come_from_imagefolder_shards(imagefolder: Path) -> None:
    classes = json.loads((imagefolder / "classes.json").read_text())
    assert classes == sorted(COLOURS)
    urls = expand_urls("*.tar", str(imagefolder))
    msgs = stream(urls, ("image",), ClassificationSamples(num_classes=3, max_len=16))
    got = {k: int(y) for m in msgs if m.batch for k, y in zip(m.batch[schema.KEYS], m.batch[LABELS])}
    assert got == {f"{n}_{n}{i}": classes.index(n) for n in COLOURS for i in range(2)}
    assert read_labels(urls) == got  # the evaluation's reading of the same json members
    # a head of 2 classes: the third class is out of range, a skip with its reason
    msgs = stream(urls, ("image",), ClassificationSamples(num_classes=2, max_len=16))
    assert sum(m.stats["skipped"].get(LABEL_OUT_OF_RANGE, 0) for m in msgs) == 2
    # the run's training loader (the task found by name) and the model's forward on its batch
    shards = [
        f"data.root={imagefolder}",
        "data.corpora.0.shards='*.tar'",
        "data.corpora.0.modalities=[image]",
    ]
    cfg = load_config("debug", [*CLS, *shards, "data.tokenizer=", "task.classification.spec_time_mask=8"])
    for k in ("contrastive_weight", "matching_weight", "generation_weight"):
        setattr(cfg.objectives, k, 0.0)  # see cls_config
    cfg.data.resolve_batch_sizes(1, 1)
    batch = next(build_train_loader(cfg, rank=0, world_size=1, num_workers=0))
    assert [got[k] for k in batch[schema.KEYS]] == batch[LABELS].tolist() and len(batch[LABELS]) == 4
    losses, _ = MiCoModel.from_run_config(cfg, make_tiny_special())(batch, step=0)
    assert set(losses) == {"classification_loss", "loss"} and torch.isfinite(losses["loss"])


def test_labels_come_from_labels_csv_shards_with_audio(tmp_path: Path) -> None:
    root = tmp_path / "audio"
    root.mkdir()
    rng = np.random.default_rng(1)
    rows = [["filename", "fold", "category"]]
    for i, name in enumerate(["rain", "dog", "rain", "bird"]):
        (root / f"clip{i}.flac").write_bytes(
            media.encode_flac(0.1 * rng.standard_normal(8000).astype(np.float32))
        )
        rows.append([f"clip{i}.flac", "1", name])
    with open(tmp_path / "esc.csv", "w", newline="") as f:
        csv.writer(f).writerows(rows)
    make("labels-csv", tmp_path / "out", root, tmp_path / "esc.csv")
    assert json.loads((tmp_path / "out" / "classes.json").read_text()) == ["bird", "dog", "rain"]
    msgs = stream(expand_urls("*.tar", str(tmp_path / "out")), ("audio",), ClassificationSamples(3, 16))
    (batch,) = [m.batch for m in msgs if m.batch]
    assert dict(zip(batch[schema.KEYS], batch[LABELS].tolist())) == {
        "clip0": 2,
        "clip1": 1,
        "clip2": 2,
        "clip3": 0,
    }
    assert tuple(batch["audio"].shape[-2:]) == (16, 32)


def test_a_sample_without_a_label_is_skipped() -> None:
    task = ClassificationSamples(num_classes=3, max_len=16)
    for meta in ({"captions": {}}, {"label": "cat"}, {"label_index": True}, {"label_index": "0"}):
        with pytest.raises(SkipSample) as e:
            task.prepare({"__key__": "k", "json": json.dumps(meta).encode()}, {"key": "k"}, 0, 0, None)
        assert e.value.reason == NO_LABEL
    with pytest.raises(SkipSample) as e:
        task.prepare({"__key__": "k"}, {"key": "k"}, 0, 0, None)
    assert e.value.reason == NO_LABEL


# ----------------------------------------------------------------------------- config and check()


def test_config_section_keys_help_and_errors() -> None:
    cfg = load_config("debug", ["task.classification.num_classes=5", "task.classification.mixup_alpha=0.2"])
    assert (cfg.task.classification.num_classes, cfg.task.classification.mixup_alpha) == (5, 0.2)
    with pytest.raises(ValueError, match="mixup_alpah"):
        load_config("debug", ["task.classification.mixup_alpah=0.2"])
    with pytest.raises(ValueError, match="hflip_prob"):
        load_config("debug", ["task.classification.hflip_prob=1.5"])
    text = help_text()
    for key in (
        "num_classes=0",
        "label_smoothing=0.1",
        "cutmix_alpha=1.0",
        "spec_time_mask=96",
        "spec_masks=1",
    ):
        assert f"--task.classification.{key}" in text
    assert "eval.tasks" in text and "classification" in str(
        load_config("debug", ["eval.tasks=[classification]"]).eval
    )


def test_the_documented_overrides_load() -> None:
    """The overrides of docs/classification.md's training command load and pass the task's check."""
    (cmd,) = [c for c in commands([REPO / "docs/classification.md"]) if "mico_ds.train" in c.text]
    overrides = [a for a in shlex.split(cmd.text) if a.startswith("--") and "=" in a]
    cfg = load_config("debug", overrides)
    tasks.get("classification").check(cfg)
    assert (cfg.task.name, cfg.task.classification.num_classes, cfg.eval.tasks) == (
        "classification",
        1000,
        ["classification"],
    )


def test_check_refuses_what_it_cannot_train(tmp_path: Path, imagefolder: Path) -> None:
    task = tasks.get("classification")
    assert task.metric == "classification/top1"
    cfg = load_config("debug", CLS)
    with pytest.raises(ValueError, match=r"objectives.contrastive_weight=0 \(got 1\), objectives.matching"):
        task.check(cfg)
    for k in ("contrastive_weight", "matching_weight", "generation_weight"):
        setattr(cfg.objectives, k, 0.0)
    with pytest.raises(ValueError, match="spec_time_mask=96 must fit the audio clips"):  # debug: 32 frames
        task.check(cfg)
    cfg.task.classification.spec_time_mask = 8
    task.check(cfg)
    cfg.eval.tasks = ["retrieval"]
    with pytest.raises(ValueError, match="add it to eval.tasks"):
        task.check(cfg)
    cfg.eval.tasks = ["classification"]
    cfg.task.classification.num_classes = 0
    with pytest.raises(ValueError, match="num_classes >= 2"):
        task.check(cfg)
    cfg.task.classification.num_classes = 4
    cfg.data.root, cfg.data.corpora[0].shards = str(imagefolder), "*.tar"
    with pytest.raises(
        ValueError, match=r"num_classes=4 but .*classes.json \(data.corpora\[omni\]\) lists 3"
    ):
        task.check(cfg)
    cfg.task.classification.num_classes = 3
    task.check(cfg)


# ----------------------------------------------------------------------------- loss and augmentation


def test_loss_is_timms_soft_target_cross_entropy() -> None:
    torch.manual_seed(0)
    cfg = cls_config(mixup_prob=0.0, hflip_prob=0.0, label_smoothing=0.2)
    model = MiCoModel.from_run_config(cfg, make_tiny_special()).train()
    batch = make_random_batch(cfg, ["image"], 4, seed=1)
    batch[LABELS] = torch.tensor([0, 2, 1, 2])
    losses, report = model(batch, step=5, micro=0)
    logits = class_logits(model, batch)
    want = SoftTargetCrossEntropy()(logits, mixup_target(batch[LABELS], 3, lam=1.0, smoothing=0.2))
    torch.testing.assert_close(losses["classification_loss"], want)
    torch.testing.assert_close(losses["loss"], F.cross_entropy(logits, batch[LABELS], label_smoothing=0.2))
    assert float(report["mix_lam"]) == 1.0 and set(losses) == {"classification_loss", "loss"}
    # the loss trains the head and the encoder side; the text branch does not run
    losses["loss"].backward()
    grads = {n.split(".")[0] for n, p in model.named_parameters() if p.grad is not None}
    assert grads == {"encoder", "context", "cls_head"}


def test_mixup_and_cutmix_targets_sum_to_one_and_repeat_for_the_same_step() -> None:
    cfg = ClassificationConfig(num_classes=5, mixup_alpha=0.8, cutmix_alpha=1.0, switch_prob=0.5)
    x = torch.randn(6, 3, 16, 16)
    labels = torch.tensor([0, 1, 2, 3, 4, 0])
    modes = set()
    for step in range(40):
        draws = []
        for _ in range(2):  # the same (seed, step, micro, rank, stream): the same draw
            gen = step_generator(0, step, 0, 0, ClassificationStream.IMAGE_AUG, "cpu")  # type: ignore[arg-type]
            mode, lam, box = draw_mix(cfg, (16, 16), gen)
            draws.append((mode, lam, box, apply_mix(x, mode, lam, box)))
        (mode, lam, box, mixed), again = draws
        assert (mode, lam, box) == again[:3] and torch.equal(mixed, again[3])
        modes.add(mode)
        targets = soft_targets(labels, 5, lam, smoothing=0.1)
        torch.testing.assert_close(targets.sum(1), torch.ones(6))
        if mode == "mixup":
            torch.testing.assert_close(mixed, lam * x + (1 - lam) * x.flip(0))
        else:  # CutMix: the reversed batch inside the box, lam = the area kept
            y0, y1, x0, x1 = box
            inside = torch.zeros(16, 16, dtype=torch.bool)
            inside[y0:y1, x0:x1] = True
            assert torch.equal(mixed[..., inside], x.flip(0)[..., inside])
            assert torch.equal(mixed[..., ~inside], x[..., ~inside])
            assert lam == pytest.approx(1 - inside.sum().item() / 256)
    assert modes == {"mixup", "cutmix"}
    other = draw_mix(cfg, (16, 16), step_generator(0, 0, 1, 0, ClassificationStream.IMAGE_AUG, "cpu"))  # type: ignore[arg-type]
    assert (
        other[1]
        != draw_mix(cfg, (16, 16), step_generator(0, 0, 0, 0, ClassificationStream.IMAGE_AUG, "cpu"))[1]
    )  # type: ignore[arg-type]
    off = ClassificationConfig(num_classes=5, mixup_alpha=0.0, cutmix_alpha=0.0)
    assert draw_mix(off, (16, 16), torch.Generator().manual_seed(0)) == ("none", 1.0, None)


def test_forward_mixes_reproducibly_per_step_and_not_in_eval() -> None:
    torch.manual_seed(0)
    cfg = cls_config()
    model = MiCoModel.from_run_config(cfg, make_tiny_special()).train()
    batch = make_random_batch(cfg, ["image"], 4, seed=2)
    batch[LABELS] = torch.tensor([0, 1, 2, 0])
    with torch.no_grad():
        a, b, c = (model(batch, step=s, micro=0)[0]["loss"] for s in (7, 7, 8))
        assert torch.equal(a, b) and not torch.equal(a, c)
        model.eval()
        plain = SoftTargetCrossEntropy()(class_logits(model, batch), mixup_target(batch[LABELS], 3, 1.0, 0.1))
        torch.testing.assert_close(model(batch, step=7)[0]["loss"], plain)


def test_spec_augment_masks_the_configured_widths() -> None:
    gen = torch.Generator().manual_seed(0)
    m = band_masks(400, 32, 8, 1, gen)
    widths = m.sum(1)
    assert int(widths.max()) == 8 and int(widths.min()) == 0
    for row in m:  # one contiguous band
        idx = row.nonzero().flatten()
        assert idx.numel() == 0 or idx.tolist() == list(range(int(idx[0]), int(idx[-1]) + 1))
    assert int(band_masks(400, 32, 8, 2, gen).sum(1).max()) <= 16
    assert not band_masks(10, 32, 0, 3, gen).any()
    x = torch.ones(50, 2, 1, 16, 32)
    y = spec_augment(x, 4, 8, 1, torch.Generator().manual_seed(3))
    zero_rows = (y == 0).all(dim=-1).sum(-1).flatten()  # masked mel bins per clip
    zero_cols = (y == 0).all(dim=-2).sum(-1).flatten()  # masked frames per clip
    assert int(zero_rows.max()) == 4 and int(zero_cols.max()) == 8 and set(y.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(y, spec_augment(x, 4, 8, 1, torch.Generator().manual_seed(3)))


# ----------------------------------------------------------------------------- evaluation


class FixedLogits:
    """A model stand-in whose head returns given logits (class_logits calls encode_context, cls_head)."""

    def __init__(self, logits: torch.Tensor) -> None:
        self.logits = logits
        self.cls_head = lambda z: z

    def encode_context(self, batch: dict) -> tuple[torch.Tensor, None]:
        return self.logits[batch["rows"]], None


def test_top1_top5_against_a_hand_count() -> None:
    logits = torch.tensor([
        [9.0, 8, 7, 6, 5, 4, 3],  # label 0: top-1
        [9.0, 8, 7, 6, 5, 4, 3],  # label 4: top-5 only
        [9.0, 8, 7, 6, 5, 4, 3],  # label 6: neither
        [0.0, 0, 0, 0, 0, 0, 1],  # label 6: top-1
        [0.0, 1, 0, 0, 0, 0, 0],  # padding (valid False): not counted
        [0.0, 1, 0, 0, 0, 0, 0],  # no label: counted as unlabeled
    ])  # fmt: skip
    labels = {"a": 0, "b": 4, "c": 6, "d": 6, "e": 1, "g": 9}
    valid = [torch.ones(3, dtype=torch.bool), torch.tensor([True, False, True])]
    batches = [
        {schema.KEYS: ["a", "b", "c"], "rows": torch.tensor([0, 1, 2]), "valid": valid[0]},
        {schema.KEYS: ["d", "e", "f"], "rows": torch.tensor([3, 4, 5]), "valid": valid[1]},
    ]
    res = evaluate_classification(FixedLogits(logits), batches, labels)
    assert res == {
        "classification/top1": 50.0,
        "classification/top5": 75.0,
        "classification/n": 4.0,
        "classification/unlabeled": 1.0,
        "classification/num_classes": 7.0,
    }
    assert evaluate_classification(FixedLogits(logits), batches, {}) == {}


def test_run_evaluation_on_imagefolder_shards(imagefolder: Path) -> None:
    torch.manual_seed(0)
    cfg = cls_config()
    cfg.data = DataConfig(root=str(imagefolder), tokenizer="", val_shards="*.tar", num_workers=0)
    model = MiCoModel.from_run_config(cfg, make_tiny_special())
    res = run_evaluation(model, cfg, None, "cpu")
    assert res["classification/n"] == 6 and res["classification/num_classes"] == 3
    assert 0 <= res["classification/top1"] <= res["classification/top5"] == 100.0
    assert "classification: 6 items  top-1" in format_results(res) and model.training


# ----------------------------------------------------------------------------- learning


def colour_images(labels: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """(B, 3, 32, 32) normalized images: class c is 0.2 brighter in channel c than the others, under
    unit noise (the tiny model needs about 20 of the 40 steps below to separate them)."""
    x = torch.randn(len(labels), 3, 32, 32, generator=gen)
    x[torch.arange(len(labels)), labels] += 0.2
    return x


def test_short_cpu_training_learns_a_separable_three_class_problem() -> None:
    torch.manual_seed(0)
    cfg = cls_config()  # mixup / CutMix, flips and label smoothing on, as a real run
    model = MiCoModel.from_run_config(cfg, make_tiny_special())
    gen = torch.Generator().manual_seed(1)
    val_y = torch.arange(60) % 3
    val = {"image": colour_images(val_y, gen), schema.KEYS: [f"v{i}" for i in range(60)]}
    labels = {f"v{i}": int(y) for i, y in enumerate(val_y)}
    before = evaluate_classification(model.eval(), [val], labels)["classification/top1"]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.train()
    for step in range(40):
        y = torch.randint(0, 3, (12,), generator=gen)
        losses, _ = model({"image": colour_images(y, gen), LABELS: y}, step=step, micro=0)
        opt.zero_grad()
        losses["loss"].backward()
        opt.step()
    after = evaluate_classification(model.eval(), [val], labels)["classification/top1"]
    assert before < 90.0 < after, (before, after)
