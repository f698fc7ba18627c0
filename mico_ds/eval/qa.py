"""Open-ended question answering (MiCo appendix B.3): the question is a text prefix after the
multimodal context, the answer is generated without constraints by the captioning decoder (same
<mask> convention, same beam search), and scored by exact match after normalization.

Normalization (the SQuAD / VQA habit): lowercase, punctuation removed, the articles a/an/the removed,
whitespace collapsed. "The RED." and "red" match; "red star" and "red" do not.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Iterable
from typing import Any

import torch

from mico_ds import distributed as mdist
from mico_ds.data import schema
from mico_ds.eval.captioning import DecodeOptions, generate

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans({c: " " for c in string.punctuation})


def normalize_answer(text: str) -> str:
    """Lowercase, punctuation -> space, drop articles, collapse whitespace."""
    text = text.lower().translate(_PUNCT)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, answer: str) -> bool:
    return normalize_answer(prediction) == normalize_answer(answer)


def question_prompt(tokenizer: Any, question: str) -> list[int]:
    """BOS + the question's tokens: what the decoder reads after the context prefix."""
    return [tokenizer.special.bos_id, *tokenizer.tokenize_ids([question])[0]]


def template_of(pair: dict[str, Any]) -> str:
    """The question template of a pair, the unit of the answer-without-looking baseline: its ``type``
    (the demo corpus's 8 types each have one question text up to the item's attribute words), else
    the normalized question text."""
    t = pair.get("type")
    return str(t) if t is not None else normalize_answer(pair["q"])


def answer_prior(pairs: Iterable[dict[str, Any]]) -> dict[str, str]:
    """The most frequent normalized answer per template (:func:`template_of`) of ``pairs``; a tie
    goes to the answer that sorts first."""
    counts: dict[str, Counter] = {}
    for p in pairs:
        counts.setdefault(template_of(p), Counter())[normalize_answer(p["a"])] += 1
    return {t: min(c.items(), key=lambda kv: (-kv[1], kv[0]))[0] for t, c in sorted(counts.items())}


def read_pairs(urls: Iterable[str]) -> list[dict[str, Any]]:
    """Every json ``"qa"`` pair of the samples of these shards (malformed pairs left out)."""
    from mico_ds.data.io import iter_tar_samples
    from mico_ds.data.read.batch import read_qa_pairs

    return [p for url in urls for _, sample in iter_tar_samples(url) for p in read_qa_pairs(sample)]


@torch.no_grad()
def evaluate_qa(
    model: Any,
    batches: Iterable[dict[str, Any]],
    tokenizer: Any,
    opts: DecodeOptions,
    batch_size: int = 32,
    max_questions_per_item: int | None = None,
    prefix: str = "qa/",
    progress: bool = False,
    examples: int = 3,
    prior: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Answer every question (batch ``qa`` lists) of the valid items of ``batches`` on every rank.

    The context prefix of each batch is computed once; questions are then decoded in chunks of
    ``batch_size``, the same number of chunks on every rank (dummy chunks where a rank has fewer).
    ``prior`` (:func:`answer_prior` of another split's pairs) answers the same questions without
    looking: ``qa/baseline_accuracy`` (a template it lacks counts as wrong).

    Returns:
        ``qa/accuracy`` (percent), ``qa/accuracy_<type>`` per question type, ``qa/n`` questions, a
        few ``qa/examples``, with ``prior`` ``qa/baseline_accuracy`` and ``qa/baseline_<type>``;
        ``{}`` when no item carries questions.
    """
    from tqdm import tqdm

    prefixes, rows = [], []  # rows: (index into the stacked prefixes, question, answer, type)
    n_items = 0
    for batch in batches:
        pre = model.context_prefix(batch)
        valid = batch["valid"].tolist() if "valid" in batch else [True] * pre.shape[0]
        qa = batch.get(schema.QA) or [[] for _ in valid]
        keep = [i for i, ok in enumerate(valid) if ok]
        prefixes.append(pre[keep])
        for j, i in enumerate(keep):
            for p in qa[i][:max_questions_per_item]:
                rows.append((n_items + j, p["q"], p["a"], str(p.get("type", "all"))))
        n_items += len(keep)
        dummy = pre[:1]
    pre_all = torch.cat(prefixes)
    if not mdist.any_rank(bool(rows), device=pre_all.device):
        return {}
    n_chunks = int(mdist.dist_max(torch.tensor([-(-len(rows) // batch_size)], device=pre_all.device)).item())
    preds: list[str] = []
    for c in tqdm(range(n_chunks), desc="qa", disable=not progress, leave=False):
        chunk = rows[c * batch_size : (c + 1) * batch_size]
        if not chunk:  # dummy work: other ranks still decode
            generate(model, dummy, [[tokenizer.special.bos_id]], tokenizer.special, opts)
            continue
        pre = pre_all[torch.tensor([r[0] for r in chunk], device=pre_all.device)]
        prompts = [question_prompt(tokenizer, r[1]) for r in chunk]
        out = generate(model, pre, prompts, tokenizer.special, opts)
        preds += [tokenizer.decode(t) for t in out.tokens]
    local = [(q, a, t, p) for (_, q, a, t), p in zip(rows, preds)]
    everything = [r for part in mdist.all_gather_object(local) for r in part]
    hits, totals, base = Counter(), Counter(), Counter()
    for q, a, t, p in everything:
        ok = exact_match(p, a)
        guess = None if prior is None else prior.get(template_of({"q": q, "type": None if t == "all" else t}))
        for key in {"all", t}:
            hits[key] += ok
            totals[key] += 1
            base[key] += guess is not None and exact_match(guess, a)
    out: dict[str, Any] = {
        f"{prefix}accuracy": 100.0 * hits["all"] / totals["all"],
        f"{prefix}n": float(totals["all"]),
    }
    for t in sorted(k for k in totals if k != "all"):
        out[f"{prefix}accuracy_{t}"] = 100.0 * hits[t] / totals[t]
    if prior is not None:
        out[f"{prefix}baseline_accuracy"] = 100.0 * base["all"] / totals["all"]
        for t in sorted(k for k in totals if k != "all"):
            out[f"{prefix}baseline_{t}"] = 100.0 * base[t] / totals[t]
    out[f"{prefix}examples"] = [{"q": q, "a": a, "predicted": p} for q, a, _, p in everything[:examples]]
    return out
