"""Tokenizer: a Llama-2-shaped SentencePiece model trained in-process, loaded through transformers'
LlamaTokenizer (checked against SentencePiece itself), with <pad>/<mask> added and fixed-shape encoding."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import sentencepiece as spm
import torch
from sentencepiece import sentencepiece_model_pb2

from mico_ds import demo
from mico_ds.data.tokenizer import LLAMA2_TRAINER_SPEC, Tokenizer, train_sentencepiece

REPO = Path(__file__).resolve().parents[3]
TEXTS = [
    "a small red star moves left along the top",
    "three loud high buzzing beeps ; the star is close to the camera",
    "can you hear 12 beeps? the blue ring is going up",
    "naïve café — 東京 😀",  # outside the training characters: byte fallback
]


def demo_captions(n: int = 400) -> list[str]:
    return [
        text
        for code in range(0, demo.NUM_COMBINATIONS, demo.NUM_COMBINATIONS // n)
        for text in demo.captions_for(demo.decode_attributes(code)).values()
    ]


@pytest.fixture(scope="module")
def model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_sentencepiece(demo_captions(), tmp_path_factory.mktemp("tok"), vocab_size=600, seed=0)


@pytest.fixture(scope="module")
def tok(model_path: Path) -> Tokenizer:
    return Tokenizer.from_path(model_path)


def test_model_is_shaped_like_llama2(model_path: Path) -> None:
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(model_path.read_bytes())
    ts, ns = proto.trainer_spec, proto.normalizer_spec
    assert ts.model_type == sentencepiece_model_pb2.TrainerSpec.BPE
    assert (ts.unk_id, ts.bos_id, ts.eos_id, ts.pad_id) == (0, 1, 2, -1)
    assert ts.byte_fallback and ts.split_digits and ts.allow_whitespace_only_pieces
    assert ns.name == "identity" and ns.add_dummy_prefix and not ns.remove_extra_whitespaces
    pieces = [p.piece for p in proto.pieces]
    assert pieces[:3] == ["<unk>", "<s>", "</s>"]
    assert pieces[3:259] == [f"<0x{i:02X}>" for i in range(256)]
    assert "<pad>" not in pieces and "<mask>" not in pieces


def test_special_tokens(tok: Tokenizer, model_path: Path) -> None:
    base = spm.SentencePieceProcessor(model_file=str(model_path)).vocab_size()
    sp = tok.special
    assert (sp.bos_id, sp.eos_id) == (1, 2)
    assert (sp.pad_id, sp.mask_id, sp.vocab_size) == (base, base + 1, base + 2)
    assert len(tok) == len(tok.hf) == sp.vocab_size
    assert tok.tokenize_ids(["<mask>"]) == [[sp.mask_id]]  # one token, not "<", "mask", ">"
    assert tok.tokenize_ids(["a <mask> star"])[0].count(sp.mask_id) == 1


def test_ids_match_sentencepiece_and_round_trip(tok: Tokenizer, model_path: Path) -> None:
    ref = spm.SentencePieceProcessor(model_file=str(model_path))
    for text in TEXTS:
        assert tok.tokenize_ids([text])[0] == ref.encode(text), text
        ids, mask = tok.encode([text], max_len=256)
        assert tok.decode(ids[0]) == text
        assert mask.sum() == len(ref.encode(text)) + 2
    assert any(ref.id_to_piece(i).startswith("<0x") for i in ref.encode(TEXTS[3]))  # byte fallback used


def test_encode_shapes_padding_and_truncation(tok: Tokenizer) -> None:
    sp = tok.special
    ids, mask = tok.encode(["a red star", TEXTS[1]], max_len=64)
    n0, n1 = len(tok.tokenize_ids(["a red star"])[0]) + 2, len(tok.tokenize_ids([TEXTS[1]])[0]) + 2
    assert ids.dtype == mask.dtype == torch.int64
    assert ids.shape == mask.shape == (2, max(n0, n1))  # L = longest when below max_len
    assert ids[:, 0].tolist() == [sp.bos_id] * 2
    assert ids[0, n0 - 1] == sp.eos_id and (ids[0, n0:] == sp.pad_id).all()
    assert mask[0].tolist() == [1] * n0 + [0] * (ids.shape[1] - n0)
    short, short_mask = tok.encode([TEXTS[1]], max_len=6)
    assert short.shape == (1, 6) and short_mask.all()
    assert short[0].tolist() == [sp.bos_id, *tok.tokenize_ids([TEXTS[1]])[0][:4], sp.eos_id]
    assert tok.decode_batch(ids) == ["a red star", TEXTS[1]]
    with pytest.raises(ValueError, match="max_len"):
        tok.encode(["x"], max_len=1)


def test_training_is_deterministic(tmp_path: Path, model_path: Path) -> None:
    again = train_sentencepiece(demo_captions(), tmp_path, vocab_size=600, seed=0)
    assert again.read_bytes() == model_path.read_bytes()


def test_small_caption_sets_give_a_smaller_vocabulary_with_a_warning(tmp_path: Path) -> None:
    with pytest.warns(UserWarning, match="fewer than the 2000 requested"):
        path = train_sentencepiece(["a red star", "two loud beeps"], tmp_path, vocab_size=2000)
    assert 259 < spm.SentencePieceProcessor(model_file=str(path)).vocab_size() < 2000


def test_a_llama_style_model_file_loads_through_the_same_path(tmp_path: Path) -> None:
    """A model trained by SentencePiece directly with Llama-2's trainer spec, under another file name."""
    captions = [f"sample number {i} says {w}" for i in range(200) for w in ("hello", "world", "gpu")]
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(captions), model_prefix=str(tmp_path / "llama-style"), vocab_size=300,
        num_threads=1, minloglevel=2, **LLAMA2_TRAINER_SPEC,
    )  # fmt: skip
    path = tmp_path / "llama-style.model"
    tok = Tokenizer.from_path(path)
    ref = spm.SentencePieceProcessor(model_file=str(path))
    assert tok.special.vocab_size == 302 and (tok.special.pad_id, tok.special.mask_id) == (300, 301)
    for text in ["sample number 7 says gpu", "unseen words ünïcode", TEXTS[0]]:
        assert tok.tokenize_ids([text])[0] == ref.encode(text)
        assert tok.decode(tok.encode([text], 128)[0][0]) == text


def test_save_pretrained_reloads_identically(tok: Tokenizer, tmp_path: Path) -> None:
    out = tok.save_pretrained(tmp_path / "hf")
    assert (out / "tokenizer.json").is_file() and (out / "tokenizer.model").is_file()
    again = Tokenizer.from_path(out)
    assert again.special == tok.special
    a, b = tok.encode(TEXTS, 32), again.encode(TEXTS, 32)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_bad_inputs_are_named(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not found"):
        Tokenizer.from_path(tmp_path / "missing.model")
    (tmp_path / "junk.model").write_bytes(b"not a model")
    with pytest.raises(ValueError, match="junk.model"):
        Tokenizer.from_path(tmp_path / "junk.model")
    with pytest.raises(ValueError, match="vocab_size"):
        train_sentencepiece(["a b c"], tmp_path, vocab_size=100)
    with pytest.raises(ValueError, match="no captions"):
        train_sentencepiece(["", " "], tmp_path, vocab_size=300)


def test_train_tokenizer_cli(tmp_path: Path) -> None:
    txt = tmp_path / "captions.txt"
    txt.write_text("\n".join(demo_captions(100)) + "\n")
    res = subprocess.run(
        [sys.executable, "tools/train_tokenizer.py", "--captions-from", str(txt),
         "--out", str(tmp_path / "t"), "--vocab-size", "300"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert "<pad>=300 <mask>=301" in res.stdout
    assert Tokenizer.from_path(tmp_path / "t" / "tokenizer.model").special.vocab_size == 302
