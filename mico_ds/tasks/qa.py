"""``task.name: qa``: open-ended question answering, fine-tuned as VAST formulates it (MiCo appendix
B.3): the question is text after the multimodal context, the answer is generated.

Each training sample carries one of its item's question/answer pairs (json ``"qa"``): the pair of
epoch e is ``perm[e % n]`` for a permutation of the item's n pairs seeded by (``train.seed``, the
sample key), so every pair of an item is trained once in every n epochs. Its text is what the
evaluation decodes from, ``question_prompt`` of ``mico_ds.eval.qa`` (BOS + the question's tokens),
then the answer's tokens and EOS; ``gen_targets`` marks exactly the answer tokens and EOS, the
positions the generation objective predicts (the question is context, never a target). The model
predicts each target from the prompt and the answer tokens before it, with ``<mask>`` at the target,
as the decoder generates (``mico_ds.objectives.generation.target_rows``).

Samples without a usable pair are skipped as ``no_qa``; a prompt + answer + EOS longer than
``data.text_max_len`` as ``qa_too_long``. Only the generation objective is trained: the contrastive
and matching weights must be 0 (their texts would be questions, not captions).
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from mico_ds.data import schema
from mico_ds.data.read.batch import read_qa_pairs
from mico_ds.data.read.skips import SkipSample
from mico_ds.eval.qa import question_prompt
from mico_ds.tasks.base import Task

NO_QA = "no_qa"
QA_TOO_LONG = "qa_too_long"
QA_PAIR = "qa_pair"  # the decoded sample's chosen pair: {"q", "a", "type", "ids", "targets_from"}


def qa_tokens(tokenizer: Any, question: str, answer: str) -> tuple[list[int], int]:
    """Token ids ``question_prompt + answer + [EOS]`` and where the targets start (the prompt's length)."""
    prompt = question_prompt(tokenizer, question)
    answer_ids = tokenizer.tokenize_ids([answer])[0]
    return [*prompt, *answer_ids, tokenizer.special.eos_id], len(prompt)


def pair_index(key: str, n: int, epoch: int, seed: int) -> int:
    """Which of an item's n pairs epoch ``epoch`` trains: a permutation of the n, seeded by (seed,
    key), read at ``epoch % n`` (every pair once in every n epochs)."""
    perm = np.random.default_rng([int(seed), zlib.crc32(key.encode("utf-8")), 0x0A]).permutation(n)
    return int(perm[epoch % n])


def collate_qa(rows: list[list[int]], starts: list[int], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded ``text_ids`` / ``text_mask`` and ``gen_targets`` (True from each row's start to its
    end: the answer tokens and EOS) of token rows."""
    n = max(len(r) for r in rows)
    ids = torch.full((len(rows), n), pad_id, dtype=torch.int64)
    mask = torch.zeros((len(rows), n), dtype=torch.int64)
    targets = torch.zeros((len(rows), n), dtype=torch.bool)
    for i, (r, s) in enumerate(zip(rows, starts)):
        ids[i, : len(r)] = torch.tensor(r, dtype=torch.int64)
        mask[i, : len(r)] = 1
        targets[i, s : len(r)] = True
    return {schema.TEXT_IDS: ids, schema.TEXT_MASK: mask, schema.GEN_TARGETS: targets}


@dataclass
class QASamples:
    """The worker side of the qa task (:class:`~mico_ds.tasks.base.SampleTask`)."""

    max_len: int
    needs_captions: bool = False  # VQA / video-QA shards carry questions, not captions

    def prepare(
        self, item: dict[str, Any], sample: dict[str, Any], epoch: int, seed: int, tokenizer: Any
    ) -> None:
        pairs = read_qa_pairs(item)
        if not pairs:
            raise SkipSample(NO_QA, "no json 'qa' pair with a text question and answer")
        p = pairs[pair_index(sample["key"], len(pairs), epoch, seed)]
        ids, start = qa_tokens(tokenizer, p["q"], p["a"])
        if len(ids) > self.max_len:
            raise SkipSample(QA_TOO_LONG, f"{len(ids)} tokens > data.text_max_len={self.max_len}")
        sample[QA_PAIR] = {**p, "ids": ids, "targets_from": start}

    def tokenize(self, batch: dict[str, Any], samples: list[dict[str, Any]], tokenizer: Any) -> None:
        pairs = [s[QA_PAIR] for s in samples]
        rows, starts = [p["ids"] for p in pairs], [p["targets_from"] for p in pairs]
        batch.update(collate_qa(rows, starts, tokenizer.special.pad_id))
        batch[schema.QA] = [[{k: p[k] for k in ("q", "a", "type") if k in p}] for p in pairs]


class QATask(Task):
    def check(self, cfg: Any) -> None:
        o = cfg.objectives
        if o.contrastive_weight or o.matching_weight or not o.generation_weight:
            raise ValueError(
                "task.name=qa trains the generation objective on question + answer text only: set "
                f"objectives.contrastive_weight=0 and objectives.matching_weight=0 (got "
                f"{o.contrastive_weight:g}, {o.matching_weight:g}) and objectives.generation_weight > 0 "
                f"(got {o.generation_weight:g})"
            )
        joined = [c.name for c in cfg.data.corpora if c.joined_from and (c.weight > 0 or c.steps)]
        if joined:
            raise ValueError(
                f"task.name=qa reads each sample's own json 'qa': turn the joined corpora {joined} off"
            )

    def sample_task(self, cfg: Any) -> QASamples:
        return QASamples(max_len=cfg.data.text_max_len)


TASK = QATask(
    "qa",
    "open-ended QA: generate the answer after the context and the question (appendix B.3)",
    metric="qa/accuracy",
)
