"""The MiCo pretraining objectives (MiCo Eq. 4-6) as functions of features."""

from mico_ds.objectives.contrastive import contrastive_loss, in_batch_top1
from mico_ds.objectives.generation import generation_loss, mask_caption_tokens
from mico_ds.objectives.matching import gather_texts, matching_labels, matching_loss, sample_hard_negatives

__all__ = [
    "contrastive_loss",
    "gather_texts",
    "generation_loss",
    "in_batch_top1",
    "mask_caption_tokens",
    "matching_labels",
    "matching_loss",
    "sample_hard_negatives",
]
