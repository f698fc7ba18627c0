"""Run the evaluation tasks on a model over ``data.val_shards``: shared by the trainer and the CLI.

One eval-mode pass reads each rank's share of the held-out items; every task takes the first items
of that share it needs (``eval.max_samples`` / ``caption_samples`` / ``qa_samples`` in all, split
over the ranks). QA and classification take items with or without a caption, retrieval, captioning
and grounding only captioned ones (a second pass when the split mixes both: :func:`held_out_batches`).
Batch lists are padded to the same length on every rank (ZeRO-3: every rank runs the same forward
passes), padding items marked ``valid = False``. Retrieval's rerank weight, unless given
(``eval.rerank_weight``), is chosen on the first ``eval.rerank_tune_samples`` items of
``eval.rerank_tune_shards``, a split that is not the reported one.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

import torch

from mico_ds import distributed as mdist
from mico_ds.config import EVAL_TASKS, RunConfig
from mico_ds.data import schema
from mico_ds.data.read.batch import to_device

log = logging.getLogger("mico_ds")
DEFAULT_RERANK_WEIGHT = 1.0  # eval.rerank_weight None without tune shards: BLIP's plain sum
CAPTION_TASKS = (
    "retrieval",
    "captioning",
    "grounding",
)  # read the items' captions (qa, classification do not)
_warned: set[str] = set()


def per_rank(n: int) -> int:
    return -(-n // mdist.get_world_size())


def load_batches(
    cfg: RunConfig,
    device: torch.device | str,
    bf16: bool,
    items_per_rank: int,
    modalities: Sequence[str] | None = None,
    shards: str | None = None,
    require_caption: bool = True,
) -> list[dict[str, Any]]:
    """This rank's first ``items_per_rank`` held-out items, as batches with ``valid`` (all True);
    ``require_caption`` False keeps items without a caption (QA and classification splits)."""
    from mico_ds.data.read.loader import EvalLoader

    shards = shards or cfg.data.val_shards
    if not shards:
        raise ValueError("data.val_shards is not set: no held-out shards to evaluate on")
    loader = EvalLoader(
        shards,
        list(modalities or cfg.data.val_modalities),
        cfg.inputs,
        cfg.data,
        batch_size=cfg.eval.batch_size,
        max_samples=items_per_rank,
        require_caption=require_caption,
    )
    out = []
    for b in loader:
        b["valid"] = torch.ones(len(b[schema.KEYS]), dtype=torch.bool)
        out.append(to_device(b, device, bf16))
    return out


def held_out_batches(
    cfg: RunConfig,
    device: torch.device | str,
    bf16: bool,
    sizes: dict[str, int],
    modalities: Sequence[str] | None = None,
    shards: str | None = None,
) -> dict[bool, list[dict[str, Any]]]:
    """The held-out batches of the tasks of ``sizes`` (task -> items in all), keyed by whether the
    task reads captions (:data:`CAPTION_TASKS`).

    QA and classification read the json's ``qa`` pairs and labels: they get every item, with a caption
    or without (``--format vqa`` / ``videoqa`` shards have none). Retrieval, captioning and grounding
    get the items with a caption, as a caption-requiring load gives them. Both from one pass when
    the items loaded without the requirement all have a caption (then they are the same items, in the
    same batches); else a second pass with it, for the caption tasks only.
    """
    caption = [t for t in sizes if t in CAPTION_TASKS]
    out: dict[bool, list[dict[str, Any]]] = {}

    def load(tasks: Sequence[str], require_caption: bool) -> list[dict[str, Any]]:
        n = per_rank(max(sizes[t] for t in tasks))
        return load_batches(cfg, device, bf16, n, modalities, shards, require_caption=require_caption)

    if len(caption) < len(sizes):
        out[False] = load(list(sizes), require_caption=False)
        if caption and all(c for b in out[False] for c in b[schema.CAPTIONS]):
            out[True] = out[False]
    if caption and True not in out:
        out[True] = load(caption, require_caption=True)
    return out


def take(batches: Sequence[dict[str, Any]], n: int) -> list[dict[str, Any]]:
    """The batches holding this rank's first ``n`` valid items (later items marked invalid), padded
    to the same count on every rank by repeating the last batch with ``valid`` all False."""
    out, left = [], n
    for b in batches:
        if left <= 0:
            break
        valid = b["valid"].clone()
        idx = valid.nonzero().flatten()
        valid[idx[left:]] = False
        left -= int(valid.sum())
        out.append({**b, "valid": valid})
    if not batches:
        raise ValueError(f"rank {mdist.get_rank()} got no held-out items: fewer held-out samples than ranks?")
    if not out:
        out = [{**batches[0], "valid": torch.zeros_like(batches[0]["valid"])}]
    dev = out[0]["valid"].device
    count = int(mdist.dist_max(torch.tensor([len(out)], device=dev)).item())
    while len(out) < count:
        out.append({**out[-1], "valid": torch.zeros_like(out[-1]["valid"])})
    return out


def tune_rerank_weight(
    model: Any,
    cfg: RunConfig,
    tokenizer: Any,
    device: torch.device | str,
    bf16: bool,
    modalities: Sequence[str] | None,
    val_shards: str | None,
    progress: bool,
) -> tuple[float, dict[str, float]]:
    """The retrieval rerank weight and the figures to report about its choice.

    ``eval.rerank_weight`` when set; else chosen by :func:`~mico_ds.eval.retrieval.evaluate_retrieval`
    on ``eval.rerank_tune_shards`` (every rank runs the same passes), whose R@1 are reported as
    ``retrieval/tune_*``; else :data:`DEFAULT_RERANK_WEIGHT`, with a warning (once per process).
    """
    from mico_ds.eval.retrieval import evaluate_retrieval

    e = cfg.eval
    if e.rerank_weight is not None:
        return e.rerank_weight, {"retrieval/rerank_weight_tuned": 0.0}
    if not e.rerank_tune_shards:
        if "tune" not in _warned and mdist.is_main_process():
            log.warning(
                "eval.rerank_weight and eval.rerank_tune_shards are not set: the retrieval rerank adds the "
                "matching log-odds to the contrastive logit with weight %g", DEFAULT_RERANK_WEIGHT
            )  # fmt: skip
        _warned.add("tune")
        return DEFAULT_RERANK_WEIGHT, {"retrieval/rerank_weight_tuned": 0.0}
    if e.rerank_tune_shards == (val_shards or cfg.data.val_shards):
        raise ValueError(
            f"eval.rerank_tune_shards={e.rerank_tune_shards!r} are the evaluated shards: the rerank weight "
            "must be chosen on another split than the reported one"
        )
    n = per_rank(e.rerank_tune_samples)
    tune = take(load_batches(cfg, device, bf16, n, modalities, e.rerank_tune_shards), n)
    res = evaluate_retrieval(
        model, tune, tokenizer, max_items=e.rerank_tune_samples, rerank_k=e.rerank_k,
        batch_size=e.batch_size, text_max_len=cfg.data.text_max_len, progress=progress,
        prefix="retrieval/tune_", rerank_weight=None,
    )  # fmt: skip
    r1 = ("_r1", "_r1_rerank", "_r1_rerank_match")
    keep = {k: v for k, v in res.items() if k == "retrieval/tune_n" or k.endswith(r1)}
    return res["retrieval/tune_rerank_weight"], {**keep, "retrieval/rerank_weight_tuned": 1.0}


_PRIORS: dict[tuple[str, ...], dict[str, str]] = {}


def qa_prior(cfg: RunConfig) -> dict[str, str] | None:
    """The answer-without-looking baseline's answers (``eval.qa_baseline_shards``; None when unset),
    read once per process: the most frequent answer per question template of that split's pairs."""
    from mico_ds.data.io import expand_urls
    from mico_ds.eval.qa import answer_prior, read_pairs

    shards = cfg.eval.qa_baseline_shards
    if not shards:
        return None
    urls = tuple(expand_urls(shards, cfg.data.root))
    if urls not in _PRIORS:
        _PRIORS[urls] = answer_prior(read_pairs(urls))
    return _PRIORS[urls]


def scalars(results: dict[str, Any]) -> dict[str, float]:
    """The numeric entries of a result dict (what goes into metrics.jsonl)."""
    return {
        k: float(v) for k, v in results.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
    }


@torch.no_grad()
def run_evaluation(
    model: Any,
    cfg: RunConfig,
    tokenizer: Any,
    device: torch.device | str,
    bf16: bool = False,
    tasks: Sequence[str] | None = None,
    progress: bool = False,
    modalities: Sequence[str] | None = None,
    shards: str | None = None,
) -> dict[str, Any]:
    """Run ``tasks`` (default ``cfg.eval.tasks``) and return every figure, keyed ``<task>/<name>``.

    ``model`` is the MiCoModel (under ZeRO-3: the engine's module, on every rank). Non-scalar entries
    (``captioning/examples``, ``qa/examples``) hold a few generated outputs.
    """
    from mico_ds.eval.captioning import DecodeOptions, evaluate_captioning
    from mico_ds.eval.classification import evaluate_classification, split_labels
    from mico_ds.eval.grounding import evaluate_grounding
    from mico_ds.eval.qa import evaluate_qa
    from mico_ds.eval.retrieval import evaluate_retrieval

    e = cfg.eval
    tasks = list(e.tasks if tasks is None else tasks)
    bad = [t for t in tasks if t not in EVAL_TASKS]
    if bad:
        raise ValueError(f"unknown evaluation tasks {bad}; known: {list(EVAL_TASKS)}")
    if not tasks:
        return {}
    sizes = {
        "retrieval": e.max_samples,
        "captioning": e.caption_samples,
        "qa": e.qa_samples,
        "grounding": e.max_samples,
        "classification": cfg.task.classification.eval_samples,
    }
    t0 = time.perf_counter()
    batches = held_out_batches(cfg, device, bf16, {t: sizes[t] for t in tasks}, modalities, shards)
    out: dict[str, Any] = {"eval/load_seconds": time.perf_counter() - t0}
    was_training = getattr(model, "training", False)
    model.eval()
    try:
        for task in tasks:
            t0 = time.perf_counter()
            part = take(batches[task in CAPTION_TASKS], per_rank(sizes[task]))
            if task == "retrieval":
                w, tuning = 0.0, {}
                if e.rerank_k > 0:
                    w, tuning = tune_rerank_weight(
                        model, cfg, tokenizer, device, bf16, modalities, shards, progress
                    )
                res = evaluate_retrieval(
                    model, part, tokenizer, max_items=e.max_samples, rerank_k=e.rerank_k,
                    batch_size=e.batch_size, text_max_len=cfg.data.text_max_len, progress=progress,
                    rerank_weight=w,
                )  # fmt: skip
                res |= tuning
            elif task == "captioning":
                opts = DecodeOptions(
                    num_beams=e.num_beams,
                    max_len=e.caption_max_tokens or max(1, cfg.data.text_max_len - 1),
                    length_penalty=e.length_penalty,
                    use_cache=e.use_cache,
                )
                res = evaluate_captioning(model, part, tokenizer, opts, progress=progress)
            elif task == "grounding":
                res = evaluate_grounding(model, part, cfg.objectives.mask_ratio, seed=cfg.train.seed)
            elif task == "classification":
                res = evaluate_classification(model, part, split_labels(cfg, shards), progress=progress)
            else:
                opts = DecodeOptions(
                    num_beams=e.num_beams,
                    max_len=e.qa_max_tokens,
                    length_penalty=e.length_penalty,
                    use_cache=e.use_cache,
                )
                res = evaluate_qa(
                    model, part, tokenizer, opts, batch_size=e.batch_size, progress=progress,
                    prior=qa_prior(cfg),
                )  # fmt: skip
                if not res and mdist.is_main_process():
                    log.warning("qa: no held-out item carries questions (json 'qa'); task skipped")
            out.update(res)
            if res:
                out[f"{task}/seconds"] = time.perf_counter() - t0
    finally:
        model.train(was_training)
    return out


def format_results(res: dict[str, Any]) -> str:
    """A readable table of evaluation results (what the CLI and the run summary print)."""
    lines = []
    if "retrieval/t2k_r1" in res:
        n, nt = int(res.get("retrieval/n", 0)), int(res.get("retrieval/n_texts", 0))
        lines.append(f"retrieval: {n} items, {nt} texts (chance R@1 about {100 / max(n, 1):.2f}%)")
        top = f"rerank top-{int(res.get('retrieval/rerank_k', 0))}"
        w = res.get("retrieval/rerank_weight")
        if not res.get("retrieval/rerank_weight_tuned"):
            how = "given"
        elif "retrieval/tune_n" in res:
            how = f"tuned on {int(res['retrieval/tune_n'])} items"
        else:
            how = "tuned on these items"
        fused = f"{top} fused (w={w:g}, {how})" if w is not None else top
        rows = [
            (f"{name} {label}", f"retrieval/{d}_{{}}{suffix}")
            for d, name in (("t2k", "text->knowledge"), ("k2t", "knowledge->text"))
            for suffix, label in (
                ("", "contrastive"),
                ("_rerank", fused),
                ("_rerank_match", f"{top} matching only"),
            )
            if f"retrieval/{d}_r1{suffix}" in res
        ]
        width = max(31, *(len(label) + 2 for label, _ in rows))
        lines.append(f"  {'':<{width}}{'R@1':>8}{'R@5':>8}{'R@10':>8}{'MedR':>8}")
        for label, key in rows:
            vals = "".join(f"{res[key.format(f'r{k}')]:>8.2f}" for k in (1, 5, 10))
            lines.append(f"  {label:<{width}}{vals}{res[key.format('medr')]:>8.1f}")
        if "retrieval/tune_t2k_r1_rerank" in res:
            tune = ", ".join(
                f"{d} {res[f'retrieval/tune_{d}_r1']:.2f} -> {res[f'retrieval/tune_{d}_r1_rerank']:.2f}"
                for d in ("t2k", "k2t")
            )
            lines.append(f"  tuning split R@1, contrastive -> fused: {tune}")
    if "captioning/cider" in res:
        lines.append(
            f"captioning: {int(res['captioning/n'])} items  CIDEr-D {res['captioning/cider']:.3f}  "
            f"BLEU-4 {res['captioning/bleu4']:.3f}  ({res['captioning/mean_words']:.1f} words/caption)"
        )
        for ex in res.get("captioning/examples", [])[:2]:
            lines.append(f"  generated: {ex['generated']!r}\n  reference: {ex['reference']!r}")
    if "grounding/gen_loss_own" in res:
        lines.append(
            f"grounding: {int(res['grounding/n'])} items  generation loss with their own context "
            f"{res['grounding/gen_loss_own']:.3f}, with another item's {res['grounding/gen_loss_other']:.3f} "
            f"(gain {res['grounding/gen_gain']:.3f} nats)  matching prefers the own context for "
            f"{100 * res['grounding/match_pairwise_acc']:.1f}% (chance 50%)"
        )
    if "classification/top1" in res:
        lines.append(
            f"classification: {int(res['classification/n'])} items  top-1 {res['classification/top1']:.2f}%  "
            f"top-5 {res['classification/top5']:.2f}%  (chance top-1 "
            f"{100 / max(res['classification/num_classes'], 1):.2f}%)"
        )
    if "qa/accuracy" in res:
        per = "  ".join(
            f"{k.split('accuracy_', 1)[1]} {v:.1f}" for k, v in res.items() if k.startswith("qa/accuracy_")
        )
        if "qa/vqa_n" in res:
            how = (
                f"accuracy {res['qa/accuracy']:.2f}% (VQA accuracy on the {int(res['qa/vqa_n'])} with ten "
                f"answers: {res['qa/vqa_accuracy']:.2f}%; exact match {res['qa/exact_match']:.2f}%)"
            )
        else:
            how = f"exact match {res['qa/accuracy']:.2f}%"
        lines.append(f"qa: {int(res['qa/n'])} questions  {how}  ({per})")
        if "qa/baseline_accuracy" in res:
            base = {
                k: v for k, v in res.items() if k.startswith("qa/baseline_") and k != "qa/baseline_accuracy"
            }
            per = "  ".join(f"{k.split('baseline_', 1)[1]} {v:.1f}" for k, v in base.items())
            lines.append(
                f"  answer without looking (most frequent train answer per question type): "
                f"{res['qa/baseline_accuracy']:.2f}%  ({per})"
            )
        for ex in res.get("qa/examples", [])[:2]:
            lines.append(f"  Q: {ex['q']}  A: {ex['a']!r}  predicted: {ex['predicted']!r}")
    return "\n".join(lines)
