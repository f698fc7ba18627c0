"""The qa task (mico_ds/tasks/qa.py): its training batches, that training predicts each answer token
as the evaluation's decoder generates it, the answer-without-looking baseline, the skip reason, and
that the pretrain task leaves the streams as they were."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mico_ds import demo, tasks
from mico_ds.config import ObjectiveConfig, TaskConfig, load_config
from mico_ds.data import schema
from mico_ds.data.io import expand_urls
from mico_ds.data.read.mixture import build_train_loader
from mico_ds.data.read.plan import StreamPlan
from mico_ds.data.read.skips import SkipSample
from mico_ds.data.read.stream import ShardStream, StreamSpec
from mico_ds.data.tokenizer import resolve_tokenizer
from mico_ds.eval.captioning import DecodeOptions, MaskDecoder, left_pad
from mico_ds.eval.qa import answer_prior, evaluate_qa, question_prompt, read_pairs
from mico_ds.models.mico import MiCoModel
from mico_ds.objectives.generation import target_rows
from mico_ds.tasks.qa import NO_QA, QA_TOO_LONG, QASamples, collate_qa, pair_index
from tests.helpers.tiny import make_random_batch, make_tiny_config, make_tiny_special
from tests.unit.eval.test_qa import WordTokenizer

QA_OVERRIDES = ["task.name=qa", "objectives.contrastive_weight=0", "objectives.matching_weight=0"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("qa") / "demo"
    demo.make_demo_corpus(
        root, num_train=16, num_val=4, samples_per_shard=8, num_single_pair=8, progress=False
    )
    return root


def qa_config(root: Path, *extra: str):
    cfg = load_config(
        "debug",
        [f"data.root={root}", f"data.tokenizer={root}/tokenizer/tokenizer.model", *QA_OVERRIDES, *extra],
    )
    cfg.data.resolve_batch_sizes(1, 1)
    return cfg


def test_qa_batch_is_the_eval_prompt_then_answer_and_eos_with_exactly_those_targets(corpus: Path) -> None:
    cfg = qa_config(corpus)
    tok = resolve_tokenizer(cfg.data.tokenizer)
    batch = next(build_train_loader(cfg, rank=0, world_size=1, num_workers=0))
    ids, mask, targets = batch[schema.TEXT_IDS], batch[schema.TEXT_MASK], batch[schema.GEN_TARGETS]
    assert targets.dtype == torch.bool and targets.shape == ids.shape
    for i, [p] in enumerate(batch[schema.QA]):
        prompt = question_prompt(tok, p["q"])
        answer = [*tok.tokenize_ids([p["a"]])[0], tok.special.eos_id]
        n = int(mask[i].sum())
        assert ids[i, :n].tolist() == prompt + answer and mask[i, n:].sum() == 0
        assert targets[i].nonzero().flatten().tolist() == list(range(len(prompt), n))  # never the question
        assert not targets[i, : len(prompt)].any()
    # the pair is one of the item's own
    assert all(p["type"] in demo.QA_TYPES for [p] in batch[schema.QA])


def test_every_pair_of_an_item_is_trained_once_per_n_epochs() -> None:
    for key in ("omni-train-000001", "x"):
        for n in (1, 7, 8):
            seen = [pair_index(key, n, e, seed=0) for e in range(3 * n)]
            assert sorted(seen[:n]) == list(range(n)) and seen[n : 2 * n] == seen[:n]
    assert [pair_index("a", 8, e, 0) for e in range(8)] != [pair_index("a", 8, e, 1) for e in range(8)]


def test_collate_qa_targets() -> None:
    out = collate_qa([[1, 5, 6, 9, 2], [1, 7, 9, 2]], [3, 2], pad_id=0)
    assert out[schema.TEXT_IDS].tolist() == [[1, 5, 6, 9, 2], [1, 7, 9, 2, 0]]
    assert out[schema.GEN_TARGETS].tolist() == [[0, 0, 0, 1, 1], [0, 0, 1, 1, 0]]


def test_samples_without_qa_are_skipped_with_a_reason(corpus: Path) -> None:
    cfg = qa_config(corpus)
    tok = resolve_tokenizer(cfg.data.tokenizer)
    task = QASamples(max_len=48)
    with pytest.raises(SkipSample) as e:
        task.prepare(
            {"__key__": "k", "json": json.dumps({"captions": {"vision": "x"}}).encode()},
            {"key": "k"},
            0,
            0,
            tok,
        )
    assert e.value.reason == NO_QA
    item = {
        "__key__": "k",
        "json": json.dumps({"qa": [{"q": "what colour is the star?", "a": "red"}]}).encode(),
    }
    with pytest.raises(SkipSample) as e:
        QASamples(max_len=4).prepare(item, {"key": "k"}, 0, 0, tok)
    assert e.value.reason == QA_TOO_LONG
    # through a stream: the omni samples carry QA, the image-text ones do not and are counted
    urls = expand_urls("{omni/train-000000.tar,image_text/train-000000.tar}", str(corpus))
    spec = StreamSpec(
        corpus="mixed", plan=StreamPlan(urls=tuple(urls), num_streams=1, shuffle=False, shuffle_buffer=0),
        modalities=("image",), inputs=cfg.inputs, batch_size=4, train=True, tokenizer=tok,
        text_max_len=48, rank=0, workers=1, positions=[(0, 0, 0)], infinite=False, drop_last=False,
        task=task,
    )  # fmt: skip
    msgs = list(ShardStream(spec))
    skipped = sum(m.stats["skipped"].get(NO_QA, 0) for m in msgs)
    kept = sum(len(m.batch[schema.KEYS]) for m in msgs if m.batch is not None)
    assert (kept, skipped) == (8, 8)


def test_pretrain_streams_are_untouched(corpus: Path) -> None:
    cfg = load_config("debug", [f"data.root={corpus}", f"data.tokenizer={corpus}/tokenizer/tokenizer.model"])
    cfg.data.resolve_batch_sizes(1, 1)
    assert cfg.task.name == "pretrain" and tasks.get("pretrain").sample_task(cfg) is None
    batch = next(build_train_loader(cfg, rank=0, world_size=1, num_workers=0))
    assert schema.GEN_TARGETS not in batch and schema.QA not in batch


def test_task_config_and_check() -> None:
    assert {"pretrain", "qa"} <= set(tasks.names())
    with pytest.raises(ValueError, match="unknown task 'vqa'"):
        TaskConfig(name="vqa")
    cfg = load_config("debug", ["task.name=qa"])
    with pytest.raises(ValueError, match="contrastive_weight=0"):
        tasks.get("qa").check(cfg)
    tasks.get("qa").check(load_config("debug", QA_OVERRIDES))


def test_target_rows_mask_one_target_each() -> None:
    ids = torch.tensor([[1, 5, 6, 9, 2], [1, 7, 9, 2, 0]])
    targets = torch.tensor([[0, 0, 0, 1, 1], [0, 0, 1, 1, 0]], dtype=torch.bool)
    src, masked, is_masked = target_rows(ids, targets, mask_id=3)
    assert src.tolist() == [0, 0, 1, 1]
    assert masked.tolist() == [[1, 5, 6, 3, 2], [1, 5, 6, 9, 3], [1, 7, 3, 2, 0], [1, 7, 9, 3, 0]]
    assert ids[src][is_masked].tolist() == [9, 2, 9, 2]


def _decoder_nll(model, prefix, prompts, answers, special) -> torch.Tensor:
    """Mean -log p(answer token) as the evaluation's MaskDecoder sees it, fed the true tokens."""
    ids, mask = left_pad(prompts, special.pad_id)
    dec = MaskDecoder(model, prefix, ids, mask, num_beams=1, mask_id=special.mask_id)
    logp, nll, n = dec.start(), [], len(prompts)
    for t in range(len(answers[0])):
        tok = torch.tensor([a[t] for a in answers])
        nll.append(-logp[torch.arange(n), tok])
        if t + 1 < len(answers[0]):
            logp = dec.step(tok, torch.arange(n))
    return torch.stack(nll).mean()


@torch.no_grad()
def test_training_predicts_each_target_as_the_decoder_generates_it() -> None:
    torch.manual_seed(0)
    cfg = make_tiny_config()
    cfg.objectives = ObjectiveConfig(contrastive_weight=0.0, matching_weight=0.0)
    special = make_tiny_special()
    model = MiCoModel.from_run_config(cfg, special).eval()
    batch = make_random_batch(cfg, ["image"], 2, seed=3)
    prompts = [[1, 10, 11, 12, 13], [1, 20, 21]]  # questions of different lengths: decoding left-pads
    answers = [[40, 41, 2], [50, 51, 2]]  # two answer tokens + EOS
    batch.update(collate_qa([p + a for p, a in zip(prompts, answers)], [5, 3], special.pad_id))
    losses, report = model(batch)
    want = _decoder_nll(model, model.context_prefix(batch), prompts, answers, special)
    assert report["masked_tokens"] == 6
    torch.testing.assert_close(losses["generation_loss"], want, rtol=1e-5, atol=1e-5)
    # masking the whole answer at once (one row per sample) would train something else
    ids, mask = batch[schema.TEXT_IDS], batch[schema.TEXT_MASK]
    all_masked = ids.masked_fill(batch[schema.GEN_TARGETS], special.mask_id)
    prefix = model.context_prefix(batch)
    h = model.text(all_masked, mask, prefix=prefix).hidden[:, prefix.shape[1] :]
    logits = model.text.lm_logits(h[batch[schema.GEN_TARGETS]]).float()
    other = torch.nn.functional.cross_entropy(logits, ids[batch[schema.GEN_TARGETS]])
    assert not torch.allclose(other, want, atol=1e-3)


def test_answer_prior_and_baseline_accuracy(corpus: Path) -> None:
    pairs = [
        {"q": "what colour?", "a": "red", "type": "colour"},
        {"q": "what colour?", "a": "The red.", "type": "colour"},
        {"q": "what colour?", "a": "blue", "type": "colour"},
        {"q": "small or large?", "a": "small", "type": "size"},
        {"q": "small or large?", "a": "large", "type": "size"},
        {"q": "How many?", "a": "two"},  # no type: the normalized question is the template
    ]
    prior = answer_prior(pairs)
    assert prior == {"colour": "red", "how many": "two", "size": "large"}  # a tie: the first sorted
    torch.manual_seed(0)
    model = MiCoModel.from_run_config(make_tiny_config(), make_tiny_special()).eval()
    batch = make_random_batch(make_tiny_config(), ["image"], 2, seed=2)
    batch[schema.QA] = [
        [{"q": "5", "a": "red", "type": "colour"}, {"q": "6", "a": "blue", "type": "colour"}],
        [{"q": "7", "a": "large", "type": "size"}, {"q": "8", "a": "red", "type": "depth"}],
    ]
    res = evaluate_qa(model, [batch], WordTokenizer(), DecodeOptions(num_beams=1, max_len=2), prior=prior)
    assert res["qa/baseline_accuracy"] == 50.0  # red right, blue wrong, large right, no depth prior
    assert (res["qa/baseline_colour"], res["qa/baseline_size"], res["qa/baseline_depth"]) == (
        50.0,
        100.0,
        0.0,
    )
    # from shards: the demo's train split
    train = read_pairs(expand_urls("omni/train-*.tar", str(corpus)))
    assert len(train) >= 16 * 7 and set(answer_prior(train)) == set(demo.QA_TYPES)
