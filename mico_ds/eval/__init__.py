"""Evaluation with the MiCo appendix B.3 protocol: retrieval (contrastive ranking, top-k reranked by
the matching head), captioning (beam search, CIDEr-D / BLEU-4) and open-ended QA (exact match).

``run_evaluation`` runs any of them on a model over ``data.val_shards`` (the trainer calls it every
``train.eval_every`` steps and at the end); ``python -m mico_ds.eval`` runs it on a checkpoint.
"""

from mico_ds.eval.captioning import BeamResult, DecodeOptions, beam_search, caption_scores, generate
from mico_ds.eval.qa import evaluate_qa, normalize_answer
from mico_ds.eval.retrieval import evaluate_retrieval, retrieval_metrics
from mico_ds.eval.runner import format_results, run_evaluation

__all__ = [
    "BeamResult",
    "DecodeOptions",
    "beam_search",
    "caption_scores",
    "evaluate_qa",
    "evaluate_retrieval",
    "format_results",
    "generate",
    "normalize_answer",
    "retrieval_metrics",
    "run_evaluation",
]
