"""Caption generation by beam search with the generation objective's convention, scored by CIDEr-D.

Decoding convention (MiCo Eq. 6 / ``mico_ds.objectives.generation``): the decoder was trained to
predict, AT a ``<mask>`` position, the original token of that position, with causal attention. So a
caption is generated left to right as

    [prefix] BOS <mask>            -> the hidden state at <mask> gives token 1
    [prefix] BOS t1 <mask>         -> token 2   (the <mask> was replaced by t1, a new <mask> appended)
    ...

With the KV cache, keys/values of every position before the ``<mask>`` stay valid; the ``<mask>``'s
own entry does not (that position now holds the chosen token), so each step drops the last cache
entry and feeds two tokens: the chosen one and a new ``<mask>``.

Beam search (MiCo appendix B.3: beam size 3) is generic over a :class:`StepDecoder` so it can be
tested against an exhaustive search on a tiny vocabulary. Hypothesis score = sum of token
log-probabilities / (generated length ** length_penalty), EOS counted in the length (Hugging Face's
convention).

Scoring: CIDEr-D and BLEU-4 from ``pycocoevalcap`` (its ``Cider`` is the CIDEr-D of the COCO caption
server: sigma 6, clipped counts, x10). The COCO server tokenizes with the Stanford PTB tokenizer, a
Java program; :func:`coco_tokenize` is a Java-free approximation (lowercase, punctuation split off and
the PTB punctuation list removed) that agrees with it on plain English captions (a test checks this
when Java is present).
"""

from __future__ import annotations

import heapq
import math
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from mico_ds import distributed as mdist

# ----------------------------------------------------------------------------- beam search


class StepDecoder(Protocol):
    """What beam search needs from a model: next-token log-probabilities of N = B * beams rows."""

    def start(self) -> torch.Tensor:
        """Log-probs (N, V) of the first generated token; rows are (item, beam) with beam fastest."""

    def step(self, tokens: torch.Tensor, origin: torch.Tensor) -> torch.Tensor:
        """Row i := hypothesis of row ``origin[i]`` + ``tokens[i]``; returns log-probs (N, V)."""


@dataclass(order=True)
class _Hyp:
    score: float
    tokens: list[int] = field(compare=False)
    logprob: float = field(compare=False)


@dataclass
class BeamResult:
    """Best hypothesis per item: token ids (EOS excluded), length-normalized score, sum of log-probs."""

    tokens: list[list[int]]
    scores: list[float]
    logprobs: list[float]


def _norm(logprob: float, length: int, length_penalty: float) -> float:
    return logprob / (max(length, 1) ** length_penalty)


@torch.no_grad()
def beam_search(
    decoder: StepDecoder,
    batch_size: int,
    num_beams: int = 3,
    max_len: int = 30,
    eos_id: int | None = None,
    length_penalty: float = 1.0,
    early_stopping: bool = True,
    min_len: int = 1,
    sync: Callable[[bool], bool] | None = None,
) -> BeamResult:
    """Batched beam search over ``decoder``.

    Args:
        decoder: gives log-probs (N, V) for N = batch_size * num_beams rows (item-major).
        num_beams: beams per item (1 = greedy decoding).
        max_len: most generated tokens (EOS included); hypotheses still open then end there.
        eos_id: ends a hypothesis (None: every hypothesis runs to ``max_len``).
        length_penalty: exponent alpha of the length normalization (0: plain sum of log-probs).
        early_stopping: an item is done once it has ``num_beams`` finished hypotheses (Hugging Face's
            ``early_stopping=True``); False: also wait until no open beam could still beat the worst of
            them (exact for alpha >= 0: an open beam's final score is at most logprob / max_len**alpha).
        min_len: EOS is not allowed before this many generated tokens.
        sync: ``sync(local_not_done) -> any rank not done``; every rank keeps stepping (dummy work
            once its own items are done) until no rank has work, since under ZeRO-3 every rank must run
            the same number of forward passes. Default: :func:`mico_ds.distributed.any_rank`.

    Returns:
        the best finished hypothesis of each item.
    """
    if num_beams < 1 or max_len < 1:
        raise ValueError(f"num_beams and max_len must be >= 1, got {num_beams}, {max_len}")
    b, k = batch_size, num_beams
    finished: list[list[_Hyp]] = [[] for _ in range(b)]  # min-heaps of at most k hypotheses
    done = [False] * b
    seqs: list[list[int]] = [[] for _ in range(b * k)]
    logp = decoder.start().float()  # (N, V)
    v = logp.shape[1]
    if sync is None:
        device = logp.device

        def sync(flag: bool) -> bool:
            return mdist.any_rank(flag, device=device)

    # Only beam 0 of each item is live at the start (all beams hold the same empty hypothesis).
    beam_scores = torch.full((b, k), -math.inf, device=logp.device)
    beam_scores[:, 0] = 0.0
    for t in range(1, max_len + 1):
        if eos_id is not None and t < min_len:
            logp[:, eos_id] = -math.inf
        cand = (beam_scores.view(-1, 1) + logp).view(b, k * v)  # (B, K*V) cumulative log-probs
        n_cand = min(2 * k, k * v)  # 2k: even if k candidates end with EOS, k stay open
        top_lp, top_idx = cand.topk(n_cand, dim=1)
        top_lp, top_idx = top_lp.tolist(), top_idx.tolist()  # host sync: bookkeeping is per item
        new_tokens = torch.zeros(b * k, dtype=torch.long)
        origin = torch.arange(b * k, dtype=torch.long)
        new_scores = torch.full((b, k), -math.inf)
        new_seqs: list[list[int]] = [list(s) for s in seqs]
        for i in range(b):
            if done[i]:
                continue
            filled = 0
            for lp, idx in zip(top_lp[i], top_idx[i]):
                if lp == -math.inf:
                    break
                beam, tok = divmod(idx, v)
                src = i * k + beam
                if eos_id is not None and tok == eos_id:
                    _push(finished[i], _Hyp(_norm(lp, t, length_penalty), list(seqs[src]), lp), k)
                    continue
                row = i * k + filled
                new_tokens[row], origin[row], new_scores[i, filled] = tok, src, lp
                new_seqs[row] = [*seqs[src], tok]
                filled += 1
                if filled == k:
                    break
            if t == max_len or filled == 0:  # out of length (or of live candidates): close the beams
                for j in range(filled):
                    row = i * k + j
                    _push(finished[i], _Hyp(_norm(float(new_scores[i, j]), t, length_penalty),
                                            new_seqs[row], float(new_scores[i, j])), k)  # fmt: skip
                done[i] = True
                continue
            if len(finished[i]) == k:
                if early_stopping:
                    done[i] = True
                else:
                    best_open = float(new_scores[i, :filled].max())
                    # Upper bound of an open beam's final score (more tokens add log-probs <= 0).
                    bound = best_open / (max_len if length_penalty > 0 else t) ** length_penalty
                    done[i] = bound <= finished[i][0].score
        seqs = new_seqs
        beam_scores = new_scores.to(logp.device)
        for i in range(b):
            if done[i]:
                beam_scores[i] = -math.inf
        if t == max_len or not sync(not all(done)):
            break
        logp = decoder.step(new_tokens.to(logp.device), origin.to(logp.device)).float()
    best = [max(f) if f else _Hyp(-math.inf, [], -math.inf) for f in finished]
    return BeamResult([h.tokens for h in best], [h.score for h in best], [h.logprob for h in best])


def _push(heap: list[_Hyp], hyp: _Hyp, k: int) -> None:
    if len(heap) < k:
        heapq.heappush(heap, hyp)
    elif hyp.score > heap[0].score:
        heapq.heapreplace(heap, hyp)


# ----------------------------------------------------------------------------- the model's decoder


class MaskDecoder:
    """:class:`StepDecoder` over a MiCo model with the <mask> convention (module docstring).

    Args:
        model: exposes ``next_token_logits(prefix, ids, mask, past_key_values, use_cache)``.
        prefix: (B, P, H) context prefix from ``model.context_prefix``.
        prompt_ids / prompt_mask: (B, Lp) the text before the generated tokens (BOS, or BOS + a
            question), LEFT-padded so every row's generated tokens start at the same column (the text
            branch derives positions from the mask, so padding between prefix and prompt is harmless).
        num_beams: rows per item.
        mask_id: the ``<mask>`` token id.
        use_cache: reuse keys/values of the positions before the <mask> (False: recompute everything).
    """

    def __init__(
        self,
        model: Any,
        prefix: torch.Tensor,
        prompt_ids: torch.Tensor,
        prompt_mask: torch.Tensor,
        num_beams: int,
        mask_id: int,
        use_cache: bool = True,
    ) -> None:
        self.model = model
        self.prefix = prefix.repeat_interleave(num_beams, dim=0)  # (N, P, H)
        self.ids = prompt_ids.repeat_interleave(num_beams, dim=0)  # (N, Lp + t)
        self.mask = prompt_mask.repeat_interleave(num_beams, dim=0).long()
        self.mask_id = mask_id
        self.use_cache = use_cache
        self.cache: Any = None
        n = self.ids.shape[0]
        self._mask_col = torch.full((n, 1), mask_id, dtype=self.ids.dtype, device=self.ids.device)
        self._one = torch.ones((n, 1), dtype=self.mask.dtype, device=self.mask.device)

    def start(self) -> torch.Tensor:
        ids = torch.cat([self.ids, self._mask_col], dim=1)
        mask = torch.cat([self.mask, self._one], dim=1)
        logits, self.cache = self.model.next_token_logits(self.prefix, ids, mask, use_cache=self.use_cache)
        return torch.log_softmax(logits.float(), dim=-1)

    def step(self, tokens: torch.Tensor, origin: torch.Tensor) -> torch.Tensor:
        self.ids = torch.cat([self.ids[origin], tokens.view(-1, 1).to(self.ids.dtype)], dim=1)
        self.mask = torch.cat([self.mask[origin], self._one], dim=1)
        if not self.use_cache:
            ids = torch.cat([self.ids, self._mask_col], dim=1)
            mask = torch.cat([self.mask, self._one], dim=1)
            logits, _ = self.model.next_token_logits(self.prefix, ids, mask)
            return torch.log_softmax(logits.float(), dim=-1)
        self.cache.reorder_cache(origin)
        self.cache.crop(-1)  # the <mask>'s entry: that position now holds the chosen token
        new = torch.cat([tokens.view(-1, 1).to(self.ids.dtype), self._mask_col], dim=1)  # (N, 2)
        prefix_mask = torch.ones(self.prefix.shape[:2], dtype=self.mask.dtype, device=self.mask.device)
        full = torch.cat([prefix_mask, self.mask, self._one], dim=1)  # (N, P + Lp + t + 1)
        logits, self.cache = self.model.next_token_logits(
            None, new, full, past_key_values=self.cache, use_cache=True
        )
        return torch.log_softmax(logits.float(), dim=-1)


def left_pad(rows: Sequence[Sequence[int]], pad_id: int, device: torch.device | str = "cpu"):
    """Token rows -> (ids (B, L), mask (B, L)) left-padded with ``pad_id``."""
    n = max(len(r) for r in rows)
    ids = torch.full((len(rows), n), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), n), dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            ids[i, n - len(r) :] = torch.tensor(list(r), dtype=torch.long)
            mask[i, n - len(r) :] = 1
    return ids.to(device), mask.to(device)


@dataclass
class DecodeOptions:
    """Decoding settings (MiCo appendix B.3: beam size 3)."""

    num_beams: int = 3
    max_len: int = 40
    length_penalty: float = 1.0
    early_stopping: bool = True
    use_cache: bool = True


@torch.no_grad()
def generate(
    model: Any,
    prefix: torch.Tensor,
    prompts: Sequence[Sequence[int]],
    special: Any,
    opts: DecodeOptions,
    sync: Callable[[bool], bool] | None = None,
) -> BeamResult:
    """Generate after ``prefix`` (B, P, H) and per-row prompt token ids (BOS first)."""
    ids, mask = left_pad(prompts, special.pad_id, prefix.device)
    dec = MaskDecoder(model, prefix, ids, mask, opts.num_beams, special.mask_id, opts.use_cache)
    return beam_search(
        dec,
        batch_size=prefix.shape[0],
        num_beams=opts.num_beams,
        max_len=opts.max_len,
        eos_id=special.eos_id,
        length_penalty=opts.length_penalty,
        early_stopping=opts.early_stopping,
        sync=sync,
    )


@dataclass
class Rollout:
    """Captions decoded for a fixed number of steps T (SCST, ``mico_ds.objectives.scst``).

    ``tokens`` (B, 1 + K, T): per item, row 0 the greedy caption and rows 1..K sampled ones, ``pad_id``
    after the first EOS; ``lengths`` (B, 1 + K): tokens up to and including that EOS (T when none).
    """

    tokens: torch.Tensor
    lengths: torch.Tensor


@torch.no_grad()
def sample_fixed(
    model: Any,
    prefix: torch.Tensor,
    special: Any,
    num_samples: int,
    max_tokens: int,
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
    use_cache: bool = True,
) -> Rollout:
    """Greedy and sampled captions after ``prefix`` (B, P, H), with the <mask> convention of
    :class:`MaskDecoder`, in exactly ``max_tokens`` decoder calls whatever the captions' lengths.

    No early stop: inside a training forward under ZeRO-3 every rank must run the same forward passes,
    and a stop decided from this rank's captions would differ between ranks. Sampled tokens are drawn
    from softmax(logits / temperature) by the inverse CDF of one uniform per row and step from
    ``generator`` (on the prefix's device), so the same generator seed gives the same captions.
    """
    if num_samples < 1 or max_tokens < 1 or not temperature > 0:
        raise ValueError(f"need num_samples, max_tokens >= 1 and temperature > 0, got "
                         f"{num_samples}, {max_tokens}, {temperature}")  # fmt: skip
    b, k, device = prefix.shape[0], 1 + num_samples, prefix.device
    ids, mask = left_pad([[special.bos_id]] * b, special.pad_id, device)
    dec = MaskDecoder(model, prefix, ids, mask, k, special.mask_id, use_cache)
    n = b * k
    greedy = torch.arange(n, device=device) % k == 0  # row 0 of each item
    keep = torch.arange(n, device=device)  # no reordering: every row keeps its own hypothesis
    tokens = torch.full((n, max_tokens), special.pad_id, dtype=torch.long, device=device)
    lengths = torch.full((n,), max_tokens, dtype=torch.long, device=device)
    done = torch.zeros(n, dtype=torch.bool, device=device)
    where = generator.device if generator is not None else device
    logp = dec.start()  # (N, V), log-softmax at temperature 1
    for t in range(max_tokens):
        cdf = torch.softmax(logp / temperature, dim=-1).cumsum(dim=-1)
        u = torch.rand(n, generator=generator, device=where).to(device)
        drawn = (cdf < u.unsqueeze(1) * cdf[:, -1:]).sum(dim=1).clamp(max=logp.shape[1] - 1)
        tok = torch.where(greedy, logp.argmax(dim=-1), drawn)
        tokens[:, t] = torch.where(done, special.pad_id, tok)
        ended = ~done & (tok == special.eos_id)
        lengths = torch.where(ended, t + 1, lengths)
        done |= ended
        if t + 1 < max_tokens:
            logp = dec.step(tok, keep)  # what a finished row feeds is never read
    return Rollout(tokens.view(b, k, max_tokens), lengths.view(b, k))


# ----------------------------------------------------------------------------- scoring

# Tokens pycocoevalcap's PTBTokenizer removes after tokenizing (its PUNCTUATIONS list).
PTB_PUNCTUATION = frozenset(
    ["''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":", "-", "--", "...", ";"]
)
_TOKEN_RE = re.compile(r"\.\.\.|--|[A-Za-z0-9]+(?:'[A-Za-z]+)?|[^\sA-Za-z0-9]")


def coco_tokenize(text: str) -> str:
    """Java-free stand-in for the COCO caption server's PTB tokenization: lowercase, punctuation split
    off and dropped (PTB's list), whitespace-joined."""
    toks = _TOKEN_RE.findall(text.lower().replace("\n", " "))
    return " ".join(t for t in toks if t not in PTB_PUNCTUATION and t not in "()[]{}")


def caption_scores(
    candidates: Sequence[str], references: Sequence[Sequence[str]], tokenize: bool = True
) -> dict[str, float]:
    """Corpus CIDEr-D and BLEU-1..4 of generated captions against their references (pycocoevalcap).

    Args:
        candidates: one generated caption per item.
        references: the reference captions of each item (COCO: 5 per image).
        tokenize: apply :func:`coco_tokenize` first (False: the strings are already tokenized).

    Returns:
        ``{"cider", "bleu1", ..., "bleu4"}``, CIDEr-D x 1 (pycocoevalcap's scale: 1.0 = 100 in papers
        that report x100), BLEU in [0, 1].
    """
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider

    if len(candidates) != len(references):
        raise ValueError(f"{len(candidates)} candidates but {len(references)} reference lists")
    if not candidates:
        raise ValueError("no captions to score")
    tok = coco_tokenize if tokenize else (lambda s: s)
    res = {i: [tok(c)] for i, c in enumerate(candidates)}
    gts = {i: [tok(r) for r in refs] for i, refs in enumerate(references)}
    for i, refs in gts.items():
        if not refs:
            raise ValueError(f"item {i} has no reference caption")
    cider, _ = Cider().compute_score(gts, res)
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    return {"cider": float(cider), **{f"bleu{n + 1}": float(b) for n, b in enumerate(bleu)}}


# ----------------------------------------------------------------------------- evaluation


def _references(batch: dict[str, Any]) -> list[list[str]]:
    from mico_ds.data import schema

    texts = batch.get(schema.EVAL_TEXTS)
    return [list(t) for t in texts] if texts is not None else [[c] for c in batch[schema.CAPTIONS]]


@torch.no_grad()
def evaluate_captioning(
    model: Any,
    batches: Iterable[dict[str, Any]],
    tokenizer: Any,
    opts: DecodeOptions,
    prefix: str = "captioning/",
    progress: bool = False,
    examples: int = 3,
) -> dict[str, Any]:
    """Caption every valid item of ``batches`` (the same count on every rank) and score the corpus.

    Each caption is scored against every reference of its item: the batch's ``eval_texts`` (all
    captions of the item's list fields, e.g. COCO's five, MSR-VTT's twenty, Clotho's five), else its
    ``captions``; CIDEr-D's document frequencies are those of the whole gathered reference set, as
    pycocoevalcap computes them. Every rank computes the same scores from the gathered captions.
    ``refs_per_item`` (logged) is the mean number of references an item was scored against.
    """
    from tqdm import tqdm

    special = tokenizer.special
    cands, refs = [], []
    batches = list(batches)
    for batch in tqdm(batches, desc="captioning", disable=not progress, leave=False):
        pre = model.context_prefix(batch)
        out = generate(model, pre, [[special.bos_id]] * pre.shape[0], special, opts)
        valid = batch["valid"].tolist() if "valid" in batch else [True] * pre.shape[0]
        for ok, toks, r in zip(valid, out.tokens, _references(batch)):
            if ok:
                cands.append(tokenizer.decode(toks))
                refs.append(r)
    gathered = mdist.all_gather_object((cands, refs))
    cands = [c for cs, _ in gathered for c in cs]
    refs = [r for _, rs in gathered for r in rs]
    scores = caption_scores(cands, refs)
    out: dict[str, Any] = {f"{prefix}{k}": v for k, v in scores.items()}
    out[f"{prefix}n"] = float(len(cands))
    out[f"{prefix}refs_per_item"] = sum(len(r) for r in refs) / len(refs)
    out[f"{prefix}mean_words"] = sum(len(coco_tokenize(c).split()) for c in cands) / len(cands)
    out[f"{prefix}examples"] = [{"generated": c, "reference": r[0]} for c, r in zip(cands, refs)][:examples]
    return out
