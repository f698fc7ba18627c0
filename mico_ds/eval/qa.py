"""Open-ended question answering (MiCo appendix B.3): the question is a text prefix after the
multimodal context, the answer is generated without constraints by the captioning decoder (same
<mask> convention, same beam search), and scored per question:

- **VQA accuracy** (Antol et al. 2015; the official ``vqaEval.py`` of github.com/GT-Vision-Lab/VQA)
  for a pair that carries its ten human answers (json ``answers``, as ``--format vqa`` writes
  VQAv2): min(#humans who gave the predicted answer / 3, 1), averaged over the 10 subsets of 9 of the
  10 annotators. Answers are normalized by :func:`normalize_vqa` (that code's steps).
- **Exact match** otherwise, after :func:`normalize_answer` (the SQuAD / VQA habit: lowercase,
  punctuation removed, the articles a/an/the removed, whitespace collapsed; "The RED." and "red"
  match, "red star" and "red" do not).

``qa/accuracy`` is the mean of these per-question scores (the official VQAv2 figure on a VQAv2 split,
exact match on the demo and the video QA sets); ``qa/vqa_accuracy`` and ``qa/exact_match`` report
both measures apart when some pairs carry ten answers (docs/finetuning.md, "QA protocol").
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any

import torch

from mico_ds import distributed as mdist
from mico_ds.data import schema
from mico_ds.eval.captioning import DecodeOptions, generate

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans({c: " " for c in string.punctuation})

VQA_ANNOTATORS = 10  # a VQAv2 question's human answers; a pair with this many is scored by VQA accuracy
# vqaEval.py's marks (its list less the apostrophe, kept for the contractions below): each is deleted
# when the answer has one next to a space or a digit-comma-digit, else it becomes a space.
_VQA_PUNCT = ';:/[]"()=+\\_><@`,?'
_DIGIT_COMMA = re.compile(r"\d,\d")
_PERIOD = re.compile(r"\.(?!\d)")  # a period not before a digit ("3.5" keeps its point)
_NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
_NUMBERS = {"none": "0"} | {w: str(i) for i, w in enumerate(_NUMBER_WORDS)}
_VQA_ARTICLES = frozenset(("a", "an", "the"))
# Contractions by ending: the words before it.
_CONTRACTION_STEMS = {
    "n't": "ai are could did does had has have is might must need ought should was were would ca do wo sha",
    "n't've": "could had might should would",
    "'ve": "could might must should would we they you not i",
    "'s": "he how that there what when where who why somebody someone",
    "'ll": "it they you how what who why somebody someone something y'all",
    "'re": "they you what why there",
    "'d": "he how it they you who where there somebody someone something",
    "'d've": "he it she we they you who there somebody someone something i y'all",
    "": "ma'am o'clock y'all 'twas i'm",
}


def _contractions() -> dict[str, str]:
    """Contractions written without their apostrophe -> with it ("dont" -> "don't"; vqaEval.py's
    table, rebuilt from stems). Spellings that are words of their own (its, well, were, hell, shell,
    id, ill, wed, shed, lets, shes, somethings) are left alone, as that table leaves them."""
    forms = [stem + end for end, stems in _CONTRACTION_STEMS.items() for stem in stems.split()]
    return {f.replace("'", ""): f for f in forms}


_CONTRACTIONS = _contractions()


def normalize_answer(text: str) -> str:
    """Lowercase, punctuation -> space, drop articles, collapse whitespace."""
    text = text.lower().translate(_PUNCT)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, answer: str) -> bool:
    return normalize_answer(prediction) == normalize_answer(answer)


def normalize_vqa(text: str) -> str:
    """The VQA evaluation's answer processing: tabs and newlines -> spaces; punctuation (``_VQA_PUNCT``)
    deleted or made a space as vqaEval.py's ``processPunctuation`` decides, periods not before a digit
    deleted; then per lowercased word (``processDigitArticle``) number words -> digits ("two" -> "2",
    "none" -> "0"), articles dropped, contractions given their apostrophe ("dont" -> "don't").

    Applied to the prediction and to every human answer alike (vqaEval.py strips only the punctuation
    of the annotations, which VQA's release already wrote in this form: on such answers the two
    agree). Curly apostrophes are read as straight ones."""
    text = text.replace("\n", " ").replace("\t", " ").replace("\u2019", "'").replace("\u2018", "'").strip()
    delete = _DIGIT_COMMA.search(text) is not None
    out = text
    for p in _VQA_PUNCT:
        out = out.replace(p, "" if delete or f"{p} " in text or f" {p}" in text else " ")
    out = _PERIOD.sub("", out)
    words = (_NUMBERS.get(w, w) for w in out.lower().split())
    return " ".join(_CONTRACTIONS.get(w, w) for w in words if w not in _VQA_ARTICLES)


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """VQA accuracy in [0, 1]: the mean over annotators i of min(#{j != i: answer j == prediction} / 3,
    1) (leave one annotator out: the 10 subsets of 9), answers compared after :func:`normalize_vqa`.
    An answer 2 of 10 humans gave scores 0.6, 3 of 10 score 0.9, 4 or more score 1."""
    if not answers:
        raise ValueError("vqa_accuracy needs the human answers")
    pred = normalize_vqa(prediction)
    same = [normalize_vqa(a) == pred for a in answers]
    hits = sum(same)
    return sum(min(1.0, (hits - s) / 3.0) for s in same) / len(same)


def ten_answers(pair: dict[str, Any]) -> list[str] | None:
    """The pair's :data:`VQA_ANNOTATORS` human answers (json ``answers``, strings), else None (a pair
    scored by exact match: no list, or one of another length, such as a video QA set's alternatives)."""
    given = pair.get("answers")
    if isinstance(given, list) and len(given) == VQA_ANNOTATORS and all(isinstance(a, str) for a in given):
        return list(given)
    return None


def score(prediction: str, pair: dict[str, Any]) -> float:
    """A question's score in [0, 1]: :func:`vqa_accuracy` over its ten answers when it carries them,
    else :func:`exact_match` with ``pair["a"]``."""
    humans = ten_answers(pair)
    return (
        vqa_accuracy(prediction, humans) if humans is not None else float(exact_match(prediction, pair["a"]))
    )


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
    Each question is scored by :func:`score`: VQA accuracy when its pair carries ten human answers,
    exact match otherwise. ``prior`` (:func:`answer_prior` of another split's pairs) answers the same
    questions without looking, scored the same way: ``qa/baseline_accuracy`` (a template it lacks
    counts as wrong).

    Returns:
        ``qa/accuracy`` (percent: the mean score), ``qa/accuracy_<type>`` per question type, ``qa/n``
        questions, a few ``qa/examples``; when some pairs carry ten answers also ``qa/vqa_accuracy``
        and ``qa/vqa_n`` (those pairs alone) and ``qa/exact_match`` (every question against its
        ``a``); with ``prior`` ``qa/baseline_accuracy`` and ``qa/baseline_<type>``; ``{}`` when no item
        carries questions.
    """
    from tqdm import tqdm

    prefixes, rows = [], []  # rows: (index into the stacked prefixes, question, answer, type, answers)
    n_items = 0
    for batch in batches:
        pre = model.context_prefix(batch)
        valid = batch["valid"].tolist() if "valid" in batch else [True] * pre.shape[0]
        qa = batch.get(schema.QA) or [[] for _ in valid]
        keep = [i for i, ok in enumerate(valid) if ok]
        prefixes.append(pre[keep])
        for j, i in enumerate(keep):
            for p in qa[i][:max_questions_per_item]:
                rows.append((n_items + j, p["q"], p["a"], str(p.get("type", "all")), ten_answers(p)))
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
    local = [(q, a, t, humans, p) for (_, q, a, t, humans), p in zip(rows, preds)]
    everything = [r for part in mdist.all_gather_object(local) for r in part]
    hits, totals, base = Counter(), Counter(), Counter()
    vqa, n_vqa, exact = 0.0, 0, 0
    for q, a, t, humans, p in everything:
        pair = {"a": a, "answers": humans}
        ok = score(p, pair)
        guess = None if prior is None else prior.get(template_of({"q": q, "type": None if t == "all" else t}))
        for key in {"all", t}:
            hits[key] += ok
            totals[key] += 1
            base[key] += 0.0 if guess is None else score(guess, pair)
        exact += exact_match(p, a)
        if humans is not None:
            vqa, n_vqa = vqa + ok, n_vqa + 1
    out: dict[str, Any] = {
        f"{prefix}accuracy": 100.0 * hits["all"] / totals["all"],
        f"{prefix}n": float(totals["all"]),
    }
    for t in sorted(k for k in totals if k != "all"):
        out[f"{prefix}accuracy_{t}"] = 100.0 * hits[t] / totals[t]
    if n_vqa:
        out[f"{prefix}vqa_accuracy"] = 100.0 * vqa / n_vqa
        out[f"{prefix}vqa_n"] = float(n_vqa)
        out[f"{prefix}exact_match"] = 100.0 * exact / totals["all"]
    if prior is not None:
        out[f"{prefix}baseline_accuracy"] = 100.0 * base["all"] / totals["all"]
        for t in sorted(k for k in totals if k != "all"):
            out[f"{prefix}baseline_{t}"] = 100.0 * base[t] / totals[t]
    out[f"{prefix}examples"] = [{"q": q, "a": a, "predicted": p} for q, a, _, _, p in everything[:examples]]
    return out
