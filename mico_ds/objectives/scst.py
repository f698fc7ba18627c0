"""Self-critical sequence training (Rennie et al., "Self-critical Sequence Training for Image
Captioning", CVPR 2017; MiCo appendix B.3, "MSCOCO(SCST)"), inside the training forward.

Per item the decoder produces its greedy caption and ``task.scst.num_samples`` sampled ones
(``mico_ds.eval.captioning.sample_fixed``: exactly ``max_tokens`` decoder calls on every rank, the same
forward passes everywhere under ZeRO-3). Each caption is scored by CIDEr-D against every reference of
the item (the batch's ``references``, attached by the captioning task), and

    loss = -(r_sample - r_greedy) * sum_t log p(w_t | w_<t, context)

over the sampled tokens up to and including the first EOS: a sample better than the model's own test
time (greedy) caption is made more likely, a worse one less likely, with no learned baseline. The
log-probabilities come from one teacher-forced decoder pass with gradient, one row per sampled token
with ``<mask>`` at its position (``objectives.generation.target_rows``: what the decoder computed
while sampling); the sampling itself runs without gradient. The loss is averaged over the global
number of sampled captions (``generation_loss``'s normalization).

Reward. :class:`CiderD` is pycocoevalcap's CIDEr-D (n = 1..4, sigma 6, clipped counts, x10; a test
checks it equals ``pycocoevalcap.cider.Cider`` score for score), with its document frequencies given
instead of recomputed from each call's references: ``task.scst.df=train`` counts them over every item
of the training corpora, once, at the first SCST step (SCST's reference code precomputes them over the
training references: the idf of a batch of a few items is coarse, log(B) at most); ``df=batch`` uses
the micro-batch's references, as pycocoevalcap does with what it is given. Captions and references
are tokenized by ``coco_tokenize`` first, as the evaluation scores them.

The sampling draws from its own random stream seeded by (train.seed, step, micro, rank): an exact
resume samples what the uninterrupted run sampled.
"""

from __future__ import annotations

import functools
import logging
import math
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from mico_ds.config.scst_section import ScstConfig
from mico_ds.distributed import all_reduce_sum, get_world_size
from mico_ds.eval.captioning import Rollout, coco_tokenize, sample_fixed
from mico_ds.objectives.generation import target_rows

log = logging.getLogger(__name__)

REFERENCES = "references"  # batch key: every reference caption of each item, list[list[str]] (B)
# The sampling's random stream (mico_ds.objectives.seeding: MATCHING = 1, GENERATION = 2).
SCST_STREAM = 3


# ----------------------------------------------------------------------------- CIDEr-D


def ngram_counts(text: str, n: int = 4) -> dict[str, int]:
    """Counts of the 1..n-grams of a whitespace-tokenized text, keyed by the n-gram's words joined with
    a space (pycocoevalcap's ``precook``, in its order)."""
    words = text.split()
    counts: dict[str, int] = defaultdict(int)
    for k in range(1, n + 1):
        for i in range(len(words) - k + 1):
            counts[" ".join(words[i : i + k])] += 1
    return counts


@dataclass
class CiderD:
    """CIDEr-D of pycocoevalcap (``pycocoevalcap.cider.cider_scorer``) with given document frequencies.

    Args:
        document_frequency: per n-gram, the number of items whose references contain it.
        num_items: the number of items counted (the idf is log(num_items / df)).
    """

    document_frequency: Mapping[str, float]
    num_items: int
    n: int = 4
    sigma: float = 6.0
    ref_len: float = field(init=False)

    def __post_init__(self) -> None:
        if self.num_items < 1:
            raise ValueError("CIDEr-D needs the references of at least one item")
        self.ref_len = math.log(float(self.num_items))

    @classmethod
    def from_references(cls, references: Iterable[Sequence[str]], n: int = 4) -> CiderD:
        """Document frequencies over the references of each item (tokenized texts), as pycocoevalcap
        computes them from the references it is given."""
        df: dict[str, float] = defaultdict(float)
        items = 0
        for refs in references:
            items += 1
            for g in {g for r in refs for g in ngram_counts(r, n)}:
                df[g] += 1.0
        return cls(dict(df), items, n)

    def _vec(self, counts: Mapping[str, int]) -> tuple[list[dict[str, float]], list[float], int]:
        vec: list[dict[str, float]] = [{} for _ in range(self.n)]
        norm = [0.0] * self.n
        length = 0
        for g, tf in counts.items():
            k = g.count(" ")  # n-gram order - 1
            vec[k][g] = float(tf) * (self.ref_len - math.log(max(1.0, self.document_frequency.get(g, 0.0))))
            norm[k] += vec[k][g] ** 2
            if k == 1:  # pycocoevalcap's length: the number of bigrams
                length += tf
        return vec, [math.sqrt(x) for x in norm], length

    def _sim(self, hyp: tuple, ref: tuple) -> list[float]:
        (vh, nh, lh), (vr, nr, lr) = hyp, ref
        delta = float(lh - lr)
        val = [0.0] * self.n
        for k in range(self.n):
            for g, w in vh[k].items():
                r = vr[k].get(g, 0.0)
                val[k] += min(w, r) * r  # clipped counts
            if nh[k] != 0 and nr[k] != 0:
                val[k] /= nh[k] * nr[k]
            val[k] *= math.e ** (-(delta**2) / (2 * self.sigma**2))  # length penalty
        return val

    def score(self, candidate: str, references: Sequence[str]) -> float:
        """CIDEr-D (x10) of a tokenized candidate against an item's tokenized references."""
        if not references:
            raise ValueError("CIDEr-D of a caption needs at least one reference")
        hyp = self._vec(ngram_counts(candidate, self.n))
        total = [0.0] * self.n
        for r in references:
            total = [a + b for a, b in zip(total, self._sim(hyp, self._vec(ngram_counts(r, self.n))))]
        return sum(total) / self.n / len(references) * 10.0


# ----------------------------------------------------------------------------- the loss


def sequence_logprobs(
    model: Any, prefix: torch.Tensor, tokens: torch.Tensor, lengths: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """sum_t log p(w_t) of each caption (B, K) under the <mask> decoder, with gradient.

    Args:
        model: a MiCoModel (its ``text`` module runs once: one row per token).
        prefix: (B, P, H) context prefix of each item.
        tokens: (B, K, T) K captions per item, padded after EOS; lengths: (B, K) tokens counted (>= 1).
        temperature: the log-probs of softmax(logits / temperature), the distribution sampled from.
    """
    b, k, t = tokens.shape
    sp = model.special
    n = b * k
    ids = torch.cat([torch.full((n, 1), sp.bos_id, dtype=torch.long, device=tokens.device),
                     tokens.reshape(n, t)], dim=1)  # fmt: skip
    pos = torch.arange(t + 1, device=tokens.device)
    mask = (pos <= lengths.reshape(n, 1)).long()  # BOS + the caption's tokens
    src, masked, is_masked = target_rows(ids, mask.bool() & (pos >= 1), sp.mask_id)
    rows_prefix = prefix.repeat_interleave(k, dim=0)[src]
    h = model.text(masked, mask[src], prefix=rows_prefix).hidden[:, rows_prefix.shape[1] :]
    logits = model.text.lm_logits(h[is_masked]).float() / temperature  # (R, V), one per token
    lp = torch.log_softmax(logits, dim=-1).gather(1, ids[src][is_masked].unsqueeze(1)).squeeze(1)
    return torch.zeros(n, dtype=lp.dtype, device=lp.device).index_add(0, src, lp).view(b, k)


def scst_loss(logprobs: torch.Tensor, advantage: torch.Tensor) -> torch.Tensor:
    """-(advantage * sum log p) summed over this rank's captions, times world_size / the global number
    of captions: DeepSpeed's gradient average over ranks then gives the mean over the global batch."""
    local = -(advantage.to(logprobs) * logprobs).sum()
    count = all_reduce_sum(torch.tensor(float(logprobs.numel()), device=logprobs.device))
    return local * get_world_size() / count.clamp(min=1.0)


@dataclass(eq=False)
class ScstObjective:
    """The SCST term of a captioning run (module docstring): built by :meth:`from_run_config`, called
    from ``MiCoModel.forward``.

    Args:
        cfg: ``task.scst``.
        tokenizer: a tokenizer (``decode(ids) -> str``) or the path of one (loaded at the first step).
        train_references: the references of every training item (``df=train``), read at the first step.
    """

    cfg: ScstConfig
    tokenizer: Any
    train_references: Callable[[], Iterable[Sequence[str]]] | None = None
    _cider: CiderD | None = field(default=None, repr=False)

    @classmethod
    def from_run_config(cls, cfg: Any) -> ScstObjective | None:
        """The SCST term of a run (a RunConfig), None when ``task.scst.enabled`` is false. Nothing is
        read here (an evaluation builds the model too): tokenizer and df come at the first step."""
        s = cfg.task.scst
        if not s.enabled:
            return None
        s.check_task(cfg.task.name)
        if s.replace_generation and cfg.objectives.generation_weight > 0:
            log.warning("task.scst.replace_generation=true: objectives.generation_weight=%g is not used (the "
                        "cross-entropy is not computed)", cfg.objectives.generation_weight)  # fmt: skip
        from mico_ds.tasks.captioning import train_references  # the data side (it imports this module)

        refs = functools.partial(train_references, cfg) if s.df == "train" else None
        return cls(s, cfg.data.tokenizer, refs)

    @property
    def weight(self) -> float:
        return self.cfg.weight

    def cider(self, batch_refs: Sequence[Sequence[str]]) -> CiderD:
        """The reward's scorer: over the training references (computed once) or this batch's."""
        if self.cfg.df == "batch":
            return CiderD.from_references(batch_refs)
        if self._cider is None:
            if self.train_references is None:
                raise ValueError("task.scst.df=train needs the training references")
            t0 = time.perf_counter()
            self._cider = CiderD.from_references(
                [coco_tokenize(r) for r in refs] for refs in self.train_references()
            )
            c = self._cider
            log.info("task.scst: CIDEr-D document frequencies of %d training items (%d n-grams) in %.1f s",
                     c.num_items, len(c.document_frequency), time.perf_counter() - t0)  # fmt: skip
        return self._cider

    def decode(self, ids: list[int]) -> str:
        if isinstance(self.tokenizer, str):
            from mico_ds.data.tokenizer import resolve_tokenizer

            self.tokenizer = resolve_tokenizer(self.tokenizer)
            if self.tokenizer is None:
                raise ValueError("task.scst needs data.tokenizer to turn sampled tokens into captions")
        return self.tokenizer.decode(ids)

    def rollout(self, model: Any, prefix: torch.Tensor, step: int, micro: int) -> Rollout:
        """Greedy + sampled captions of every item, from this (step, micro)'s random stream."""
        gen = model.generator(SCST_STREAM, step, micro, prefix.device)
        c = self.cfg
        return sample_fixed(
            model, prefix.detach(), model.special, c.num_samples, c.max_tokens, c.temperature, gen
        )

    def rewards(self, roll: Rollout, references: Sequence[Sequence[str]], eos_id: int) -> torch.Tensor:
        """CIDEr-D (B, 1 + K) of every decoded caption against its item's references (float64, CPU)."""
        refs = [[coco_tokenize(r) for r in rs] for rs in references]
        scorer = self.cider(refs)
        tokens, lengths = roll.tokens.tolist(), roll.lengths.tolist()  # host sync: CIDEr-D is Python
        out = torch.zeros(roll.lengths.shape, dtype=torch.float64)
        for i, (rows, lens, rs) in enumerate(zip(tokens, lengths, refs)):
            for j, (row, n) in enumerate(zip(rows, lens)):
                words = row[: n - 1] if row[n - 1] == eos_id else row[:n]
                out[i, j] = scorer.score(coco_tokenize(self.decode(words)), rs)
        return out

    def __call__(
        self, model: Any, batch: dict[str, Any], prefix: torch.Tensor, step: int, micro: int
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(scst_loss, report figures scst_reward / scst_baseline: the mean CIDEr-D of the sampled and of
        the greedy captions on this rank) for a batch with ``references`` and its prefix (B, P, H)."""
        refs = batch.get(REFERENCES)
        if refs is None or len(refs) != prefix.shape[0] or not all(refs):
            got = "none" if refs is None else f"{len(refs)} lists for {prefix.shape[0]} items"
            raise ValueError(f"task.scst needs every item's reference captions in batch[{REFERENCES!r}] "
                             f"(the captioning task attaches them), got {got}")  # fmt: skip
        roll = self.rollout(model, prefix, step, micro)
        r = self.rewards(roll, refs, model.special.eos_id).to(prefix.device)
        advantage = r[:, 1:] - r[:, :1]  # the greedy caption is the baseline
        logp = sequence_logprobs(model, prefix, roll.tokens[:, 1:], roll.lengths[:, 1:], self.cfg.temperature)
        report = {"scst_reward": r[:, 1:].mean().float(), "scst_baseline": r[:, 0].mean().float()}
        return scst_loss(logp, advantage), report


__all__ = ["REFERENCES", "CiderD", "ScstObjective", "scst_loss", "sequence_logprobs", "ngram_counts"]
