"""Batches per the data contract (``mico_ds.data.schema``): collation of decoded samples, their
tokens, the evaluation-only fields, and the move to a device."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import torch

from mico_ds.config import InputConfig
from mico_ds.data import schema
from mico_ds.data.read.decode import finalize, is_caption, is_text, join_captions
from mico_ds.data.tokenizer import TextTokenizer


def collate(samples: list[dict], modalities: Sequence[str], inputs: InputConfig) -> dict:
    """Decoded samples -> batch dict per schema (tensors stacked, captions joined; no tokens yet)."""
    batch: dict = {}
    for m in schema.MODALITIES:
        if m in modalities:
            batch[m] = finalize(m, torch.stack([s[m] for s in samples]), inputs)
    batch[schema.KEYS] = [s["key"] for s in samples]
    batch[schema.CAPTIONS] = [join_captions(s["fields"]) for s in samples]
    batch[schema.SAMPLE_SOURCE] = torch.zeros((len(samples), len(modalities)), dtype=torch.int64)
    batch[schema.SOURCE_GROUP] = torch.tensor(
        [schema.source_group(s.get("source", s["key"])) for s in samples], dtype=torch.int64
    )
    for key in (schema.EVAL_TEXTS, schema.QA):
        if all(key in s for s in samples):
            batch[key] = [s[key] for s in samples]
    return batch


def tokenize_into(batch: dict, texts: list[str], tokenizer: TextTokenizer | None, max_len: int) -> None:
    if tokenizer is None:
        return
    ids, mask = tokenizer.encode(texts, max_len)
    batch[schema.TEXT_IDS] = torch.as_tensor(ids, dtype=torch.int64)
    batch[schema.TEXT_MASK] = torch.as_tensor(mask, dtype=torch.int64)


def token_sources(
    pieces: list[list[tuple[str, int]]], ids_BL: torch.Tensor, mask_BL: torch.Tensor, tokenizer: TextTokenizer
) -> torch.Tensor:
    """Per token of each encoded caption, the source id of the piece it belongs to (``text_source``).

    ``pieces[b]`` lists sample b's captions with their sources, in the order
    ``schema.CAPTION_SEP.join`` concatenated them into the text that was encoded into row b of
    ``ids_BL``/``mask_BL``. A piece's end is found by encoding the text up to it: the tokenizer splits at
    whitespace (Llama-2's SentencePiece settings), so a prefix ending at a word boundary tokenizes as
    the start of the whole. BOS and each separator go with the piece after them, EOS with the last
    piece, padding is 0.
    """
    out = torch.zeros_like(ids_BL, dtype=torch.int64)
    prefixes = [schema.CAPTION_SEP.join(t for t, _ in ps[: i + 1]) for ps in pieces for i in range(len(ps))]
    if not prefixes:
        return out
    _, pmask = tokenizer.encode(prefixes, max_len=1 << 20)
    ends = (torch.as_tensor(pmask).sum(dim=1) - 1).tolist()  # BOS + tokens: the row index after the piece
    row_len = torch.as_tensor(mask_BL).sum(dim=1).tolist()
    j = 0
    for b, ps in enumerate(pieces):
        start, n = 0, int(row_len[b])
        for i, (_, src) in enumerate(ps):
            end = n if i == len(ps) - 1 else min(int(ends[j + i]), n)
            out[b, start:end] = src
            start = max(start, end)
        j += len(ps)
    return out


def to_device(batch: dict[str, Any], device: torch.device | str, bf16: bool) -> dict[str, Any]:
    """A collated batch's tensors to ``device`` (floating ones to bf16 when asked); lists and strings
    as they are."""
    out = {}
    for k, v in batch.items():
        if isinstance(v, torch.Tensor):
            v = v.to(device, non_blocking=True)
            if bf16 and v.is_floating_point():
                v = v.to(torch.bfloat16)
        out[k] = v
    return out


def eval_extras(item: dict, fields: dict[str, str]) -> dict:
    """Evaluation-only fields of a raw sample (schema: ``eval_texts``, ``qa``).

    ``eval_texts``: one concatenated caption per caption alternative -- text j takes the j-th entry of
    every caption field that holds a list (cycling through shorter lists) and the single caption of the
    others; text 0 is the batch's ``captions`` entry. Duplicates are dropped.
    ``qa``: the json's ``"qa"`` list of ``{"q": str, "a": str, ...}``; malformed entries (and texts a
    tokenizer cannot take, see ``decode.is_text``) are ignored.
    """
    meta: dict = {}
    raw = item.get(schema.JSON_EXT)
    if raw is not None:
        try:
            meta = json.loads(raw)
        except ValueError:
            meta = {}  # the decoder already accepted or skipped this sample: nothing more to read
    caps = meta.get("captions") if isinstance(meta, dict) else None
    alts: dict[str, list[str]] = {}
    if isinstance(caps, dict):
        for f in schema.TEXT_FIELDS:
            v = caps.get(f) if f in fields else None  # only the fields the text is made of
            if isinstance(v, list):
                v = [x.strip() for x in v if is_caption(x)]
                if v:
                    alts[f] = v
    n = max((len(v) for v in alts.values()), default=1)
    texts: list[str] = []
    for j in range(n):
        t = join_captions({**fields, **{f: v[j % len(v)] for f, v in alts.items()}})
        if t not in texts:
            texts.append(t)
    return {schema.EVAL_TEXTS: texts, schema.QA: qa_pairs_of(meta)}


def qa_pairs_of(meta: Any) -> list[dict]:
    """The ``{"q": str, "a": str, ...}`` entries of a parsed json's ``"qa"`` list; malformed entries
    (and texts a tokenizer cannot take, see ``decode.is_text``) are ignored."""
    qa = meta.get("qa") if isinstance(meta, dict) else None
    return [
        dict(p)
        for p in (qa if isinstance(qa, list) else [])
        if isinstance(p, dict) and is_text(p.get("q")) and is_text(p.get("a"))
    ]


def read_qa_pairs(item: dict) -> list[dict]:
    """:func:`qa_pairs_of` a raw sample's json member ([] without one, or when it does not parse)."""
    raw = item.get(schema.JSON_EXT)
    if raw is None:
        return []
    try:
        return qa_pairs_of(json.loads(raw))
    except ValueError:
        return []


def truncate(batch: dict, n: int) -> dict:
    """The first ``n`` samples of a batch (tensors and lists cut; other values kept)."""
    return {k: (v[:n] if isinstance(v, (torch.Tensor, list)) else v) for k, v in batch.items()}
