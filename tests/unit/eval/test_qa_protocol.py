"""The QA protocol (docs/finetuning.md, "QA protocol"): VQA accuracy over the ten human answers of a
VQAv2 pair against its definition, the VQA answer normalization, exact match for the other pairs,
and the evaluation runner on captionless ``--format vqa`` shards and on splits that mix captioned
and captionless items."""

from __future__ import annotations

import json
import zlib
from itertools import combinations
from pathlib import Path

import numpy as np
import pytest
import torch

from mico_ds.cli import make_shards
from mico_ds.config import DataConfig
from mico_ds.data import schema
from mico_ds.data.write import media
from mico_ds.eval import runner
from mico_ds.eval.captioning import DecodeOptions
from mico_ds.eval.qa import evaluate_qa, exact_match, normalize_vqa, score, ten_answers, vqa_accuracy
from mico_ds.eval.runner import format_results, run_evaluation
from mico_ds.models.mico import MiCoModel
from tests.helpers.tiny import TINY_VOCAB, make_random_batch, make_tiny_config, make_tiny_special

# ----------------------------------------------------------------------------- the metric


def by_definition(prediction: str, answers: list[str]) -> float:
    """VQA accuracy as the VQA paper defines it, on answers already normalized: min(#humans who gave
    the answer / 3, 1), averaged over all 10-choose-9 subsets of the annotators."""
    subsets = list(combinations(range(len(answers)), len(answers) - 1))
    return sum(min(1.0, sum(answers[i] == prediction for i in s) / 3) for s in subsets) / len(subsets)


@pytest.mark.parametrize("k, hand", [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (7, 1.0), (10, 1.0)])
def test_vqa_accuracy_equals_the_subset_average(k: int, hand: float) -> None:
    answers = ["yes"] * k + ["no"] * (10 - k)
    assert by_definition("yes", answers) == pytest.approx(hand)
    # by hand, k = 2: the 2 subsets leaving out a "yes" hold 1 of them (1/3), the 8 others 2 (2/3)
    assert by_definition("yes", ["yes"] * 2 + ["no"] * 8) == pytest.approx((2 * 1 / 3 + 8 * 2 / 3) / 10)
    assert vqa_accuracy("yes", answers) == pytest.approx(hand)
    # the order of the annotators does not matter, nor the other answers' spread
    mixed = ["yes"] * k + [f"other{i}" for i in range(10 - k)]
    assert vqa_accuracy("yes", mixed[::-1]) == pytest.approx(by_definition("yes", mixed))


def test_normalization_of_predictions_and_human_answers() -> None:
    for pred, human in [
        ("Two", "2"),
        ("a dog", "dog"),
        ("dogs.", "dogs"),
        ("The Dog", "dog"),
        ("none", "0"),
        ("dont", "don't"),
        ("don’t", "don't"),  # a curly apostrophe
        ("yes\n", "yes"),
        ("1,000", "1000"),
        ("red, white", "red white"),
        ("what's that?", "whats that"),
    ]:
        assert normalize_vqa(pred) == normalize_vqa(human), (pred, human)
        assert vqa_accuracy(pred, [human] * 10) == 1.0
    assert normalize_vqa("3.5") == "3.5"  # a decimal point stays
    assert normalize_vqa("Two dogs.") == "2 dogs"
    for pred, human in [("dogs", "dog"), ("red star", "red"), ("its", "it's"), ("well", "we'll"), ("", "no")]:
        assert normalize_vqa(pred) != normalize_vqa(human), (pred, human)
    # a human answer is normalized like the prediction: 3 annotators wrote "Two", 1 wrote "2."
    answers = ["Two", "two", "TWO", "2.", "3", "3", "3", "4", "4", "5"]
    assert vqa_accuracy("2", answers) == pytest.approx(by_definition("2", ["2"] * 4 + ["x"] * 6)) == 1.0
    assert vqa_accuracy("3", answers) == pytest.approx(0.9)


def test_ten_answers_pick_the_metric() -> None:
    humans = ["cat"] * 2 + ["dog"] * 8
    assert ten_answers({"q": "?", "a": "dog", "answers": humans}) == humans
    assert score("cat", {"a": "dog", "answers": humans}) == pytest.approx(0.6)
    # alternatives of another length (a video QA list answer), or none: exact match with "a"
    assert ten_answers({"a": "dog", "answers": ["cat", "dog"]}) is None
    assert score("cat", {"a": "dog", "answers": ["cat", "dog"]}) == 0.0
    assert score("The dog.", {"a": "dog"}) == 1.0 and score("two", {"a": "2"}) == 0.0
    assert exact_match("The dog.", "dog")


class WordTokenizer:
    """Words -> ids 4..TINY_VOCAB-1 by a CRC of the word; decode writes ``w<id>``; encode for
    retrieval's texts (BOS + words + EOS)."""

    special = make_tiny_special()

    def tokenize_ids(self, texts: list[str]) -> list[list[int]]:
        return [[4 + zlib.crc32(w.encode()) % (TINY_VOCAB - 4) for w in t.split()] for t in texts]

    def decode(self, ids: list[int]) -> str:
        return " ".join(f"w{i}" for i in ids if i > 3)

    def encode(self, texts: list[str], max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        rows = [[1, *r][: max_len - 1] + [2] for r in self.tokenize_ids(texts)]
        ids = torch.zeros(len(rows), max(map(len, rows)), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, r in enumerate(rows):
            ids[i, : len(r)], mask[i, : len(r)] = torch.tensor(r), 1
        return ids, mask


@torch.no_grad()
def test_evaluate_qa_scores_ten_answer_pairs_by_vqa_accuracy_and_others_by_exact_match() -> None:
    torch.manual_seed(0)
    model = MiCoModel.from_run_config(make_tiny_config(), make_tiny_special()).eval()
    batch = make_random_batch(make_tiny_config(), ["image"], 2, seed=3)
    tok, opts = WordTokenizer(), DecodeOptions(num_beams=1, max_len=2)
    questions = [("what is it", "other"), ("how many", "number"), ("is it red", "yes/no")]
    batch[schema.QA] = [
        [{"q": q, "a": "?", "type": t} for q, t in questions[:2]],
        [{"q": "is it red", "a": "?"}],
    ]
    said = [e["predicted"] for e in evaluate_qa(model, [batch], tok, opts, examples=3)["qa/examples"]]
    p0, p1, p2 = said
    # q0: the prediction is 2 of 10 answers (0.6) and "a"; q1: 0 of 10, "a" another (0);
    # q2: no ten answers, "a" right (1)
    batch[schema.QA] = [
        [
            {"q": "what is it", "a": p0, "type": "other", "answers": [p0] * 2 + ["zz"] * 8},
            {"q": "how many", "a": "zz", "type": "number", "answers": ["zz"] * 10},
        ],
        [{"q": "is it red", "a": p2, "type": "yes/no", "answers": [p2, "zz"]}],  # 2 alternatives: exact match
    ]
    res = evaluate_qa(model, [batch], tok, opts)
    assert [e["predicted"] for e in res["qa/examples"]] == [p0, p1, p2]
    assert res["qa/n"] == 3 and res["qa/vqa_n"] == 2
    assert res["qa/accuracy"] == pytest.approx(100 * (0.6 + 0 + 1) / 3)
    assert res["qa/vqa_accuracy"] == pytest.approx(100 * (0.6 + 0) / 2)
    assert res["qa/exact_match"] == pytest.approx(100 * 2 / 3)
    assert (res["qa/accuracy_other"], res["qa/accuracy_number"], res["qa/accuracy_yes/no"]) == pytest.approx(
        (60.0, 0.0, 100.0)
    )
    # the answer without looking is scored the same way
    base = evaluate_qa(model, [batch], tok, opts, prior={"other": "zz", "number": "zz", "yes/no": "zz"})
    assert base["qa/baseline_accuracy"] == pytest.approx(100 * (1.0 + 1.0 + 0.0) / 3)  # 8 of 10, 10 of 10
    text = format_results(res)
    assert "qa: 3 questions  accuracy 53.33% (VQA accuracy on the 2 with ten answers: 30.00%" in text
    # without ten-answer pairs: exact match, as before
    plain = [[{"q": q, "a": "zz", "type": t} for q, t in questions[:2]], [{"q": "is it red", "a": p2}]]
    res = evaluate_qa(model, [{**batch, schema.QA: plain}], tok, opts)
    assert "qa/vqa_n" not in res and res["qa/accuracy"] == pytest.approx(100 / 3)
    assert "exact match 33.33%" in format_results(res)


# ----------------------------------------------------------------------------- the runner on real shards


def jpeg(level: int) -> bytes:
    return media.encode_jpeg(np.full((20, 28, 3), level, np.uint8))


def build(fmt: str, out: Path, root: Path, *ann: Path) -> None:
    args = ["--format", fmt, "--annotations", *map(str, ann), "--media-root", str(root), "--out", str(out),
            "--samples-per-shard", "2", "--workers", "1", "--quiet", "--max-skip", "0"]  # fmt: skip
    assert make_shards.main(args) == 0


def qa_config(root: Path, **eval_keys: object):
    cfg = make_tiny_config()
    cfg.data = DataConfig(root=str(root), tokenizer="", val_shards="*.tar", num_workers=0)
    for k, v in {"tasks": ["qa"], "num_beams": 1, "qa_max_tokens": 2, "rerank_k": 0, **eval_keys}.items():
        setattr(cfg.eval, k, v)
    return cfg


@pytest.fixture(scope="module")
def vqa_shards(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, int]:
    """``make_shards --format vqa`` of 3 COCO images (real JPEGs) and 5 questions with ten answers."""
    tmp = tmp_path_factory.mktemp("vqa")
    for n in (1, 2, 3):
        (tmp / "coco" / "val2014").mkdir(parents=True, exist_ok=True)
        (tmp / "coco" / "val2014" / f"COCO_val2014_{n:012d}.jpg").write_bytes(jpeg(40 * n))
    qs = [(1, "What color is it?", 10), (1, "Is it day?", 11), (2, "How many cats?", 20), (3, "Why?", 30),
          (3, "Where is it?", 31)]  # fmt: skip
    sub = {"data_subtype": "val2014"}
    questions = {**sub, "questions": [{"image_id": i, "question": q, "question_id": qid} for i, q, qid in qs]}
    annotations = {**sub, "annotations": [
        {"question_id": qid, "image_id": qid // 10, "multiple_choice_answer": "yes", "answer_type": "other",
         "question_type": "what", "answers": [{"answer": "yes" if k < 4 else "no", "answer_confidence": "yes",
                                               "answer_id": k + 1} for k in range(10)]}
        for _, _, qid in qs]}  # fmt: skip
    q_file, a_file = (
        tmp / "v2_OpenEnded_mscoco_val2014_questions.json",
        tmp / "v2_mscoco_val2014_annotations.json",
    )
    q_file.write_text(json.dumps(questions))
    a_file.write_text(json.dumps(annotations))
    build("vqa", tmp / "shards", tmp / "coco", q_file, a_file)
    return tmp / "shards", len(qs)


def test_qa_evaluation_on_captionless_vqa_shards(vqa_shards: tuple[Path, int]) -> None:
    shards, n_questions = vqa_shards
    torch.manual_seed(0)
    cfg = qa_config(shards)
    model = MiCoModel.from_run_config(cfg, make_tiny_special())
    res = run_evaluation(model, cfg, WordTokenizer(), "cpu")
    assert res["qa/n"] == res["qa/vqa_n"] == n_questions
    assert 0.0 <= res["qa/accuracy"] == res["qa/vqa_accuracy"] <= 100.0 and "qa/exact_match" in res
    assert f"qa: {n_questions} questions  accuracy" in format_results(res) and model.training
    # the held-out loading requires a caption only for the caption tasks: a caption-requiring load finds none
    assert runner.load_batches(cfg, "cpu", False, 8) == []
    assert (
        sum(len(b[schema.KEYS]) for b in runner.load_batches(cfg, "cpu", False, 8, require_caption=False))
        == 3
    )


@pytest.fixture(scope="module")
def vast_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``make_shards --format vast`` of 4 images (real JPEGs): img0 and img1 with captions (img1 also
    with a question), img2 and img3 with questions only."""
    tmp = tmp_path_factory.mktemp("vast")
    (tmp / "media").mkdir()
    for n in range(4):
        (tmp / "media" / f"img{n}.jpg").write_bytes(jpeg(50 * n + 10))
    entries = [
        {"image_id": "img0", "caption": ["a dark square", "a square in the dark"]},
        {"image_id": "img1", "caption": "a grey square", "question": "what colour?", "answer": "grey"},
        {"image_id": "img2", "question": ["what colour?", "is it bright?"], "answer": ["light grey", "yes"]},
        {"image_id": "img3", "question": "what colour?", "answer": "white"},
    ]
    ann = tmp / "descs_qa_test.json"
    ann.write_text(json.dumps(entries))
    build("vast", tmp / "shards", tmp / "media", ann)
    return tmp / "shards"


def spy(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, bool]]:
    """Record (items per rank, require_caption) of every held-out load."""
    calls, real = [], runner.load_batches

    def load(cfg, device, bf16, n, modalities=None, shards=None, require_caption=True):  # noqa: ANN001, ANN202
        calls.append((n, require_caption))
        return real(cfg, device, bf16, n, modalities, shards, require_caption=require_caption)

    monkeypatch.setattr(runner, "load_batches", load)
    return calls


def test_a_split_of_captioned_and_captionless_items(
    vast_shards: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    torch.manual_seed(0)
    cfg = qa_config(vast_shards, max_samples=16, qa_samples=16)
    model = MiCoModel.from_run_config(cfg, make_tiny_special())
    tok = WordTokenizer()
    calls = spy(monkeypatch)
    alone = run_evaluation(model, cfg, tok, "cpu", tasks=["retrieval"])
    assert calls == [(16, True)] and alone["retrieval/n"] == 2 and alone["retrieval/n_texts"] == 3
    calls.clear()
    both = run_evaluation(model, cfg, tok, "cpu", tasks=["qa", "retrieval"])
    # QA over every question, captionless items included; retrieval over the captioned items only,
    # from a second, caption-requiring pass (the first pass met captionless items)
    assert calls == [(16, False), (16, True)]
    assert both["qa/n"] == 4 and "qa/vqa_n" not in both
    for k, v in alone.items():
        if k.startswith("retrieval/") and k != "retrieval/seconds":
            assert both[k] == v, k
    assert run_evaluation(model, cfg, tok, "cpu", tasks=["qa"])["qa/accuracy"] == both["qa/accuracy"]


def test_an_all_captioned_split_is_read_once(vast_shards: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    cfg = qa_config(vast_shards, max_samples=2, qa_samples=2)  # the first 2 items: img0, img1, both captioned
    model = MiCoModel.from_run_config(cfg, make_tiny_special())
    tok = WordTokenizer()
    calls = spy(monkeypatch)
    both = run_evaluation(model, cfg, tok, "cpu", tasks=["qa", "retrieval"])
    assert calls == [(2, False)] and both["qa/n"] == 1 and both["retrieval/n"] == 2
    alone = run_evaluation(model, cfg, tok, "cpu", tasks=["retrieval"])
    assert {k: v for k, v in alone.items() if "seconds" not in k} == {
        k: v for k, v in both.items() if k.startswith("retrieval/") and "seconds" not in k
    }
