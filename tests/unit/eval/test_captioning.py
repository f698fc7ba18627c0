"""Beam search against an exhaustive search and greedy decoding; the <mask> decoder against hand-built
recomputation (with and without the KV cache); our CIDEr-D/BLEU wrapper against pycocoevalcap."""

from __future__ import annotations

import itertools
import math
import shutil

import pytest
import torch

from mico_ds.eval.captioning import (
    BeamResult,
    DecodeOptions,
    MaskDecoder,
    beam_search,
    caption_scores,
    coco_tokenize,
    generate,
    left_pad,
)
from mico_ds.models.mico import MiCoModel
from tests.helpers.tiny import make_random_batch, make_tiny_config, make_tiny_special

V, EOS = 4, 3  # tokens 0..3, 3 is EOS


def _table_logprobs(
    history: tuple[int, ...], item: int, seed: int = 0, eos_bias: float = 0.0
) -> torch.Tensor:
    """A fixed random distribution over V tokens for every (item, history): a 'model' whose best
    sequence can be found by enumeration."""
    g = torch.Generator().manual_seed(hash((seed, item, history)) % (2**31))
    logits = torch.randn(V, generator=g) * 2.0
    logits[EOS] += eos_bias
    return torch.log_softmax(logits, dim=0)


class TableDecoder:
    """StepDecoder over :func:`_table_logprobs`; also counts steps (to check dummy work)."""

    def __init__(self, batch: int, beams: int, seed: int = 0, eos_bias: float = 0.0) -> None:
        self.b, self.k, self.seed, self.eos_bias = batch, beams, seed, eos_bias
        self.hist: list[tuple[int, ...]] = [() for _ in range(batch * beams)]
        self.steps = 0

    def _logp(self) -> torch.Tensor:
        return torch.stack(
            [_table_logprobs(h, i // self.k, self.seed, self.eos_bias) for i, h in enumerate(self.hist)]
        )

    def start(self) -> torch.Tensor:
        return self._logp()

    def step(self, tokens: torch.Tensor, origin: torch.Tensor) -> torch.Tensor:
        self.steps += 1
        self.hist = [(*self.hist[o], int(t)) for t, o in zip(tokens.tolist(), origin.tolist())]
        return self._logp()


def exhaustive(item: int, max_len: int, alpha: float, seed: int = 0) -> tuple[float, list[int]]:
    """Best (score, tokens) over every sequence: EOS-terminated of length <= max_len, or max_len
    tokens without EOS; score = sum log-prob / length**alpha (EOS counted)."""
    best = (-math.inf, [])
    for n in range(1, max_len + 1):
        for seq in itertools.product(range(V), repeat=n):
            if EOS in seq[:-1] or (n < max_len and seq[-1] != EOS):
                continue
            lp = sum(float(_table_logprobs(seq[:i], item, seed)[t]) for i, t in enumerate(seq))
            score = lp / n**alpha
            if score > best[0]:
                best = (score, list(seq[:-1]) if seq[-1] == EOS else list(seq))
    return best


def no_sync(flag: bool) -> bool:
    return flag


@pytest.mark.parametrize("alpha", [0.0, 1.0, 2.0])
@pytest.mark.parametrize("early", [True, False])
def test_wide_beam_finds_the_exhaustive_optimum(alpha: float, early: bool) -> None:
    max_len, b = 4, 3
    beams = V**max_len  # >= every sequence: nothing is ever pruned
    res = beam_search(TableDecoder(b, beams, seed=1), b, beams, max_len, EOS, alpha, early, sync=no_sync)
    for i in range(b):
        score, tokens = exhaustive(i, max_len, alpha, seed=1)
        assert res.tokens[i] == tokens
        assert res.scores[i] == pytest.approx(score, abs=1e-5)


def greedy(item: int, max_len: int, seed: int) -> list[int]:
    hist: tuple[int, ...] = ()
    for _ in range(max_len):
        t = int(_table_logprobs(hist, item, seed).argmax())
        if t == EOS:
            return list(hist)
        hist = (*hist, t)
    return list(hist)


def test_beam_one_is_greedy() -> None:
    b, max_len = 16, 6
    res = beam_search(TableDecoder(b, 1, seed=3), b, 1, max_len, EOS, 1.0, sync=no_sync)
    assert res.tokens == [greedy(i, max_len, 3) for i in range(b)]
    assert any(len(t) < max_len for t in res.tokens) and any(len(t) == max_len for t in res.tokens)


def test_batched_equals_one_item_at_a_time() -> None:
    b, k, max_len = 5, 3, 6
    batched = beam_search(TableDecoder(b, k, seed=4), b, k, max_len, EOS, 1.0, sync=no_sync)
    for i in range(b):
        one = TableDecoder(1, k, seed=4)
        one._logp = lambda d=one, i=i: torch.stack([_table_logprobs(h, i, 4) for h in d.hist])  # type: ignore[method-assign]
        single = beam_search(one, 1, k, max_len, EOS, 1.0, sync=no_sync)
        assert single.tokens[0] == batched.tokens[i]
        assert single.scores[0] == pytest.approx(batched.scores[i])


def test_other_ranks_keep_every_rank_stepping_without_changing_results() -> None:
    """sync() says another rank still decodes: this rank runs dummy steps to max_len, same output."""
    b, k, max_len = 4, 2, 7
    alone = TableDecoder(b, k, seed=5, eos_bias=3.0)  # likely EOS: every item finishes early
    res = beam_search(alone, b, k, max_len, EOS, 1.0, sync=no_sync)
    busy = TableDecoder(b, k, seed=5, eos_bias=3.0)
    res_busy = beam_search(busy, b, k, max_len, EOS, 1.0, sync=lambda flag: True)
    assert res_busy.tokens == res.tokens and res_busy.scores == res.scores
    assert alone.steps < max_len - 1 and busy.steps == max_len - 1


def test_min_len_and_no_eos() -> None:
    res = beam_search(TableDecoder(3, 2, seed=6), 3, 2, 5, None, 1.0, sync=no_sync)
    assert all(len(t) == 5 for t in res.tokens)
    res = beam_search(TableDecoder(3, 2, seed=6), 3, 2, 5, EOS, 1.0, min_len=3, sync=no_sync)
    assert all(len(t) >= 2 for t in res.tokens)  # EOS (not returned) at position >= 3


# ----------------------------------------------------------------------------- the model's decoder


@pytest.fixture(scope="module")
def tiny() -> tuple[MiCoModel, dict, torch.Tensor]:
    torch.manual_seed(0)
    model = MiCoModel.from_run_config(make_tiny_config(), make_tiny_special()).eval()
    batch = make_random_batch(make_tiny_config(), ["image", "audio"], 3, seed=1)
    with torch.no_grad():
        prefix = model.context_prefix(batch)
    return model, batch, prefix


def _mask_greedy_reference(model: MiCoModel, prefix: torch.Tensor, prompt: list[int], n: int) -> list[int]:
    """Greedy decoding by full recomputation, one row at a time: [prompt, t1..ti, <mask>] -> t_{i+1}."""
    sp = model.special
    toks: list[int] = []
    for _ in range(n):
        ids = torch.tensor([[*prompt, *toks, sp.mask_id]])
        logits, _ = model.next_token_logits(prefix, ids, torch.ones_like(ids))
        t = int(logits.argmax())
        if t == sp.eos_id:
            break
        toks.append(t)
    return toks


@pytest.mark.parametrize("use_cache", [False, True])
def test_mask_decoder_greedy_equals_recomputation(tiny, use_cache: bool) -> None:
    model, _, prefix = tiny
    sp = model.special
    prompts = [[sp.bos_id], [sp.bos_id, 7, 9, 11], [sp.bos_id, 5]]  # different lengths: left padding
    with torch.no_grad():
        out = generate(model, prefix, prompts, sp, DecodeOptions(num_beams=1, max_len=6, use_cache=use_cache))
        for i, p in enumerate(prompts):
            assert out.tokens[i] == _mask_greedy_reference(model, prefix[i : i + 1], p, 6)


def test_cache_and_recompute_give_the_same_beams(tiny) -> None:
    model, _, prefix = tiny
    sp = model.special
    prompts = [[sp.bos_id], [sp.bos_id, 4, 5], [sp.bos_id, 8]]
    with torch.no_grad():
        a = generate(model, prefix, prompts, sp, DecodeOptions(num_beams=3, max_len=8, use_cache=True))
        b = generate(model, prefix, prompts, sp, DecodeOptions(num_beams=3, max_len=8, use_cache=False))
    assert a.tokens == b.tokens
    assert a.scores == pytest.approx(b.scores, abs=1e-4)


def test_first_step_reads_the_hidden_state_at_the_mask(tiny) -> None:
    """Decoding convention: logits come from the <mask> position appended after the prompt."""
    model, _, prefix = tiny
    sp = model.special
    ids, mask = left_pad([[sp.bos_id, 6]], sp.pad_id)
    dec = MaskDecoder(model, prefix[:1], ids, mask, 1, sp.mask_id, use_cache=True)
    with torch.no_grad():
        got = dec.start()
        h = model.text(torch.tensor([[sp.bos_id, 6, sp.mask_id]]), torch.ones(1, 3, dtype=torch.long),
                       prefix=prefix[:1]).hidden[:, -1]  # fmt: skip
        want = torch.log_softmax(model.text.lm_logits(h).float(), dim=-1)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- scoring

CANDS = [
    "a small red star moves left along the top",
    "A large blue circle moves up, on the right.",
    "three loud high buzzing beeps",
]
REFS = [
    ["a small red star moves left along the top", "a red star goes left"],
    ["a large blue circle moves up on the right", "the blue circle is going up"],
    ["two quiet low pure beeps", "three loud buzzing beeps"],
]


def test_scores_equal_pycocoevalcap_called_directly() -> None:
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider

    got = caption_scores(CANDS, REFS)
    res = {i: [coco_tokenize(c)] for i, c in enumerate(CANDS)}
    gts = {i: [coco_tokenize(r) for r in rs] for i, rs in enumerate(REFS)}
    cider, _ = Cider().compute_score(gts, res)
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    assert got["cider"] == pytest.approx(cider, abs=1e-12)
    assert [got[f"bleu{n}"] for n in (1, 2, 3, 4)] == pytest.approx(bleu, abs=1e-12)
    assert 0 < got["cider"] < 10 and 0 < got["bleu4"] < 1
    # a perfect candidate set scores higher than a shuffled one
    worse = caption_scores(CANDS[::-1], REFS)
    assert worse["cider"] < got["cider"] and worse["bleu4"] < got["bleu4"]


def test_coco_tokenize() -> None:
    assert (
        coco_tokenize("A large blue circle moves up, on the right.")
        == "a large blue circle moves up on the right"
    )
    assert (
        coco_tokenize("can you hear three beeps? the red star ; goes")
        == "can you hear three beeps the red star goes"
    )


@pytest.mark.skipif(shutil.which("java") is None, reason="pycocoevalcap's PTBTokenizer needs Java")
def test_coco_tokenize_agrees_with_ptb_tokenizer() -> None:
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    texts = [*CANDS, *(r for rs in REFS for r in rs), "a steady tone, and the hexagon goes down ; it's near!"]
    ptb = PTBTokenizer().tokenize({i: [{"caption": t}] for i, t in enumerate(texts)})
    for i, t in enumerate(texts):
        if "'" in t:  # PTB splits contractions ("it 's"); ours keeps them whole
            continue
        assert coco_tokenize(t) == ptb[i][0], t


def test_score_errors() -> None:
    with pytest.raises(ValueError, match="reference lists"):
        caption_scores(["a"], [])
    with pytest.raises(ValueError, match="no reference"):
        caption_scores(["a"], [[]])
    assert isinstance(BeamResult([[]], [0.0], [0.0]), BeamResult)
