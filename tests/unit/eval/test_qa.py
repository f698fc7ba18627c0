"""QA: answer normalization, the demo corpus's question/answer pairs, the eval-only batch fields, and
evaluate_qa against decoding each question directly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mico_ds import demo
from mico_ds.config import EvalConfig, load_config
from mico_ds.data import schema
from mico_ds.data.read.batch import eval_extras
from mico_ds.data.read.loader import EvalLoader
from mico_ds.eval.captioning import DecodeOptions, generate
from mico_ds.eval.qa import evaluate_qa, exact_match, normalize_answer
from mico_ds.models.mico import MiCoModel
from tests.helpers.tiny import make_random_batch, make_tiny_config, make_tiny_special


def test_normalize_answer() -> None:
    assert normalize_answer("  The RED.  ") == "red"
    assert normalize_answer("a steady-tone!") == "steady tone"
    assert normalize_answer("An apple, the pear") == "apple pear"
    assert exact_match("Three", "three") and exact_match("the far", "far")
    assert not exact_match("red star", "red") and not exact_match("", "red")
    assert normalize_answer("theatre") == "theatre"  # articles only as whole words


def test_demo_qa_is_derived_from_the_attributes_and_grounded_in_the_captions() -> None:
    for code in range(0, demo.NUM_COMBINATIONS, 9973):
        a = demo.decode_attributes(code)
        qa = demo.qa_for(a)
        caps = demo.captions_for(a)
        words = " ".join(caps.values()).split()
        assert {p["type"] for p in qa} == set(demo.QA_TYPES) - ({"count"} if a["rhythm"] == 0 else set())
        for p in qa:
            assert p["a"] in words, (p, caps)  # each answer is a caption word
        by_type = {p["type"]: p["a"] for p in qa}
        assert by_type["colour"] == a["colour"] and by_type["direction"] == a["direction"]
        assert by_type["depth"] == ("close" if a["depth_order"] == "near" else "far")
        assert qa == demo.qa_for(dict(a))  # a pure function


def test_eval_extras_multiple_captions_and_qa() -> None:
    meta = {
        "captions": {"vision": ["a red star", "a star in red", "  "], "audio": "one beep"},
        "qa": [{"q": "what colour?", "a": "red", "type": "colour"}, {"q": 3}, "bad"],
    }
    item = {"__key__": "k", schema.JSON_EXT: json.dumps(meta).encode()}
    extras = eval_extras(item, {"vision": "a red star", "audio": "one beep"})
    assert extras[schema.EVAL_TEXTS] == ["a red star ; one beep", "a star in red ; one beep"]
    assert extras[schema.QA] == [{"q": "what colour?", "a": "red", "type": "colour"}]
    txt = eval_extras({"__key__": "k", "txt": b"a cat"}, {"vision": "a cat"})
    assert txt == {schema.EVAL_TEXTS: ["a cat"], schema.QA: []}


def test_eval_loader_carries_texts_and_qa_while_training_batches_do_not(tmp_path: Path) -> None:
    root = tmp_path / "demo"
    demo.make_demo_corpus(
        root, num_train=8, num_val=6, samples_per_shard=8, single_pair=False, progress=False
    )
    cfg = load_config("debug", [f"data.root={root}", f"data.tokenizer={root}/tokenizer/tokenizer.model"])
    loader = EvalLoader("omni/val-*.tar", ["image"], cfg.inputs, cfg.data, batch_size=4)
    batches = list(loader)
    assert sum(len(b[schema.KEYS]) for b in batches) == 6
    for b in batches:
        assert [t[0] for t in b[schema.EVAL_TEXTS]] == b[schema.CAPTIONS]
        assert all(len(q) >= 7 for q in b[schema.QA])
    from mico_ds.data.read.mixture import build_train_loader

    train = next(iter(build_train_loader(cfg)))
    assert schema.QA not in train and schema.EVAL_TEXTS not in train


def test_eval_config_validation() -> None:
    with pytest.raises(ValueError, match="unknown"):
        EvalConfig(tasks=["retrieval", "vqa"])
    with pytest.raises(ValueError, match="num_beams"):
        EvalConfig(num_beams=0)
    assert EvalConfig().rerank_k == 50 and EvalConfig().num_beams == 3


class WordTokenizer:
    """Words are integers; decode joins ids with spaces (the tiny vocabulary)."""

    special = make_tiny_special()

    def tokenize_ids(self, texts: list[str]) -> list[list[int]]:
        return [[int(w) for w in t.split()] for t in texts]

    def decode(self, ids: list[int]) -> str:
        return " ".join(str(i) for i in ids if i > 3)


@torch.no_grad()
def test_evaluate_qa_equals_decoding_each_question() -> None:
    torch.manual_seed(0)
    model = MiCoModel.from_run_config(make_tiny_config(), make_tiny_special()).eval()
    batch = make_random_batch(make_tiny_config(), ["image"], 3, seed=2)
    batch["valid"] = torch.tensor([True, True, False])
    batch[schema.QA] = [[{"q": "5 6", "a": "x", "type": "t1"}], [{"q": "7", "a": "y", "type": "t2"}] * 2, []]
    opts = DecodeOptions(num_beams=2, max_len=3)
    tok = WordTokenizer()
    res = evaluate_qa(model, [batch], tok, opts, batch_size=2)
    assert res["qa/n"] == 3 and set(res) >= {"qa/accuracy", "qa/accuracy_t1", "qa/accuracy_t2"}
    prefix = model.context_prefix(batch)
    want = []
    for i, q in ((0, "5 6"), (1, "7"), (1, "7")):
        out = generate(model, prefix[i : i + 1], [[1, *map(int, q.split())]], tok.special, opts)
        want.append(tok.decode(out.tokens[0]))
    assert [e["predicted"] for e in res["qa/examples"]] == want
    # the answer is right when it is what the model says
    batch[schema.QA][0][0]["a"] = want[0]
    assert evaluate_qa(model, [batch], tok, opts, batch_size=2)["qa/accuracy_t1"] == 100.0
    assert evaluate_qa(model, [{**batch, schema.QA: [[], [], []]}], tok, opts) == {}
