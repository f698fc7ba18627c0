"""Text tokenizer: a Llama-2-shaped SentencePiece model and the wrapper the data pipeline encodes with.

``train_sentencepiece`` trains, in-process, a BPE model with Llama-2's settings (unk=0 ``<unk>``,
bos=1 ``<s>``, eos=2 ``</s>``, no pad piece, byte fallback, split digits, identity normalization), so
that a demo vocabulary and the real Llama-2 ``tokenizer.model`` take the same code path:
``Tokenizer.from_path`` loads either through ``transformers.LlamaTokenizer`` (offline) and adds the
special tokens Llama-2 lacks: ``<pad>`` and the generation objective's ``<mask>`` (MiCo Eq. 6).

    tok = Tokenizer.from_path("data/demo/tokenizer/tokenizer.model")
    ids_BL, mask_BL = tok.encode(["a red star moves left"], max_len=64)   # int64 (B, L)
    tok.special   # SpecialTokens(vocab_size, pad_id, bos_id, eos_id, mask_id)
"""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from mico_ds.data import schema

if TYPE_CHECKING:
    import torch

    from mico_ds.config import DataConfig, DemoConfig

log = logging.getLogger(__name__)

PAD_TOKEN = "<pad>"
MASK_TOKEN = "<mask>"
MODEL_FILE = "tokenizer.model"

# Llama-2's SentencePiece trainer settings (as recorded in the trainer_spec of its tokenizer.model),
# minus corpus-size knobs.
LLAMA2_TRAINER_SPEC: dict[str, Any] = {
    "model_type": "bpe",
    "character_coverage": 0.99995,
    "split_by_unicode_script": True,
    "split_by_whitespace": True,
    "split_by_number": True,
    "split_digits": True,
    "treat_whitespace_as_suffix": False,
    "allow_whitespace_only_pieces": True,
    "byte_fallback": True,
    "max_sentencepiece_length": 16,
    "max_sentence_length": 4192,
    "normalization_rule_name": "identity",
    "add_dummy_prefix": True,
    "remove_extra_whitespaces": False,
    "unk_id": 0,
    "bos_id": 1,
    "eos_id": 2,
    "pad_id": -1,
    "unk_piece": "<unk>",
    "bos_piece": "<s>",
    "eos_piece": "</s>",
    "vocabulary_output_piece_score": True,
}


def train_sentencepiece(
    captions: Iterable[str],
    out_dir: str | Path,
    vocab_size: int = 512,
    seed: int = 0,
    max_sentences: int = 10_000_000,
) -> Path:
    """Train a Llama-2-style SentencePiece BPE model on ``captions``; returns ``out_dir/tokenizer.model``.

    The vocabulary may come out smaller than ``vocab_size`` when the captions cannot support that many
    pieces (a warning says so); the file is written atomically.

    Args:
        captions: training sentences (empty ones are ignored; newlines become spaces).
        out_dir: directory receiving ``tokenizer.model``.
        vocab_size: requested vocabulary size, including the 3 special and 256 byte pieces.
        seed: SentencePiece's random seed (used when more than ``max_sentences`` are given).
        max_sentences: sentences sampled for training (SentencePiece's input_sentence_size).
    """
    import sentencepiece as spm

    if vocab_size < 262:
        raise ValueError(f"vocab_size must be >= 262 (3 special + 256 byte pieces + text), got {vocab_size}")
    sentences = [c.replace("\n", " ").strip() for c in captions]
    sentences = [s for s in sentences if s]
    if not sentences:
        raise ValueError("no captions to train the tokenizer on")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    spm.set_random_generator_seed(seed)
    buf = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(sentences),
            model_writer=buf,
            vocab_size=vocab_size,
            hard_vocab_limit=False,  # a small caption set may support fewer pieces than asked for
            input_sentence_size=max_sentences if len(sentences) > max_sentences else 0,
            shuffle_input_sentence=True,
            num_threads=1,  # single-threaded training is deterministic
            minloglevel=2,
            **LLAMA2_TRAINER_SPEC,
        )
    except RuntimeError as e:
        raise ValueError(
            f"SentencePiece training failed (vocab_size={vocab_size}, {len(sentences)} sentences): {e}"
        ) from e
    path = out_dir / MODEL_FILE
    tmp = out_dir / f".{MODEL_FILE}.tmp{os.getpid()}"
    tmp.write_bytes(buf.getvalue())
    os.replace(tmp, path)
    got = spm.SentencePieceProcessor(model_proto=buf.getvalue()).vocab_size()
    if got < vocab_size:
        warnings.warn(
            f"tokenizer vocabulary has {got} pieces, fewer than the {vocab_size} requested: the "
            f"{len(sentences)} captions do not support more",
            stacklevel=2,
        )
    return path


def captions_from(source: str | Path) -> Iterator[str]:
    """Captions of a ``.txt`` file (one per line), or of shards (a ``.tar``, a directory, a brace pattern).

    From shards: every caption field of each ``json`` member and every ``txt`` member.
    """
    from mico_ds.data.io import expand_urls, iter_tar_samples

    source = str(source)
    if source.endswith(".txt") and os.path.isfile(source):
        with open(source, encoding="utf-8") as f:
            yield from (line.rstrip("\n") for line in f)
        return
    for shard in expand_urls(source):
        for key, members in iter_tar_samples(shard):
            if schema.TXT_EXT in members:
                yield members[schema.TXT_EXT].decode("utf-8")
            if schema.JSON_EXT in members:
                try:
                    meta = json.loads(members[schema.JSON_EXT])
                except json.JSONDecodeError as e:
                    raise ValueError(f"{shard}: sample {key!r} has an invalid json member: {e}") from e
                yield from (str(v) for v in meta.get("captions", {}).values())


class Tokenizer:
    """``transformers.LlamaTokenizer`` plus ``<pad>``/``<mask>``, with fixed-shape batch encoding."""

    def __init__(self, hf_tokenizer: Any, model_file: Path | None = None) -> None:
        self.hf = hf_tokenizer
        self.model_file = model_file
        vocab = self.hf.get_vocab()
        # Llama-2 has neither token; reuse a piece of that name when a vocabulary already has one.
        for attr, token in (("pad_token", PAD_TOKEN), ("mask_token", MASK_TOKEN)):
            if getattr(self.hf, attr, None) is None:
                self.hf.add_special_tokens({attr: token})
            elif token in vocab and getattr(self.hf, attr) != token:
                log.info("tokenizer already has %s=%r; keeping it", attr, getattr(self.hf, attr))
        ids = {
            "bos": self.hf.bos_token_id,
            "eos": self.hf.eos_token_id,
            "pad": self.hf.pad_token_id,
            "mask": self.hf.mask_token_id,
        }
        if any(v is None for v in ids.values()):
            raise ValueError(f"tokenizer lacks special tokens: {ids}")
        if len(set(ids.values())) != 4:
            raise ValueError(f"special token ids collide: {ids}")
        self._special = schema.SpecialTokens(
            vocab_size=len(self.hf),
            pad_id=ids["pad"],
            bos_id=ids["bos"],
            eos_id=ids["eos"],
            mask_id=ids["mask"],
        )

    @classmethod
    def from_path(cls, path: str | Path) -> Tokenizer:
        """Load a SentencePiece ``*.model`` file or a Hugging Face tokenizer directory (offline)."""
        from transformers import LlamaTokenizer

        path = Path(path)
        if path.is_dir():
            hf = LlamaTokenizer.from_pretrained(str(path), local_files_only=True)
            model = path / MODEL_FILE
            return cls(hf, model if model.is_file() else None)
        if not path.is_file():
            raise ValueError(f"tokenizer {path} not found (expected a .model file or a tokenizer directory)")
        # from_pretrained looks for a file named tokenizer.model; link the file under that name.
        with tempfile.TemporaryDirectory() as tmp:
            os.symlink(path.resolve(), Path(tmp) / MODEL_FILE)
            try:
                hf = LlamaTokenizer.from_pretrained(tmp, local_files_only=True)
            except Exception as e:  # noqa: BLE001 - report which file failed whatever the cause
                raise ValueError(f"cannot load {path} as a SentencePiece model: {e}") from e
        hf.vocab_file = str(path.resolve())  # save_pretrained copies the model file from here
        return cls(hf, path.resolve())

    @property
    def special(self) -> schema.SpecialTokens:
        """Special token ids and the vocabulary size including added tokens."""
        return self._special

    @property
    def vocab_size(self) -> int:
        return self._special.vocab_size

    def __len__(self) -> int:
        return self._special.vocab_size

    def tokenize_ids(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each text without BOS/EOS (leading/trailing whitespace stripped)."""
        if isinstance(texts, str):
            raise TypeError("texts must be a list of strings, not a string")
        out = self.hf([t.strip() for t in texts], add_special_tokens=False)["input_ids"]
        return [list(x) for x in out]

    def encode(self, texts: list[str], max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode a batch: BOS + tokens + EOS, right-padded with pad_id.

        Too-long texts are cut before the EOS, which is always kept.

        Returns:
            ids int64 (B, L) and mask int64 (B, L) (1 = token, 0 = padding), L = min(max_len, longest).
        """
        import torch

        if max_len < 2:
            raise ValueError(f"max_len must be >= 2 (BOS and EOS), got {max_len}")
        sp = self._special
        rows = [[sp.bos_id, *toks[: max_len - 2], sp.eos_id] for toks in self.tokenize_ids(texts)]
        length = max((len(r) for r in rows), default=2)
        ids_BL = torch.full((len(rows), length), sp.pad_id, dtype=torch.int64)
        mask_BL = torch.zeros((len(rows), length), dtype=torch.int64)
        for i, row in enumerate(rows):
            ids_BL[i, : len(row)] = torch.tensor(row, dtype=torch.int64)
            mask_BL[i, : len(row)] = 1
        return ids_BL, mask_BL

    def decode(self, ids: Any) -> str:
        """Text of one id sequence (list or 1-D tensor), special tokens skipped."""
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        return self.hf.decode(list(ids), skip_special_tokens=True)

    def decode_batch(self, ids_BL: Any) -> list[str]:
        """Texts of a batch of id sequences (B, L), special tokens skipped."""
        if hasattr(ids_BL, "tolist"):
            ids_BL = ids_BL.tolist()
        return [self.decode(row) for row in ids_BL]

    def save_pretrained(self, out_dir: str | Path) -> Path:
        """Write a Hugging Face tokenizer directory (tokenizer.json, config, and tokenizer.model)."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        self.hf.save_pretrained(str(out_dir))
        if self.model_file is not None and not (out_dir / MODEL_FILE).exists():
            shutil.copyfile(self.model_file, out_dir / MODEL_FILE)
        return out_dir


# ----------------------------------------------------------------------------- a run's tokenizer


class TextTokenizer(Protocol):
    """What the data pipeline needs of a tokenizer."""

    def encode(self, texts: list[str], max_len: int) -> tuple[Any, Any]: ...


_LOADED: dict[str, TextTokenizer] = {}


def resolve_tokenizer(tok: str | TextTokenizer | None) -> TextTokenizer | None:
    """A tokenizer object from a ``tokenizer.model`` path (loaded once per process) or as given."""
    if tok is None or tok == "":
        return None
    if not isinstance(tok, str):
        return tok
    if tok not in _LOADED:
        _LOADED[tok] = Tokenizer.from_path(tok)
    return _LOADED[tok]


def tokenizer_path(data: DataConfig, demo: DemoConfig) -> Path:
    """``data.tokenizer``, or the demo corpus's own tokenizer when the recipe generates the demo."""
    if data.tokenizer:
        return Path(data.tokenizer)
    if demo.generate:
        return Path(data.root) / "tokenizer" / MODEL_FILE
    raise ValueError(
        "data.tokenizer is not set: point it to a SentencePiece tokenizer.model (e.g. Llama-2's)"
    )


def run_tokenizer(data: DataConfig, demo: DemoConfig) -> Tokenizer:
    """The tokenizer of a run; ``data.tokenizer`` is set to its path (data workers open that file)."""
    path = tokenizer_path(data, demo)
    if not path.exists():
        raise ValueError(f"data.tokenizer: {path} does not exist")
    data.tokenizer = str(path)
    return Tokenizer.from_path(path)
