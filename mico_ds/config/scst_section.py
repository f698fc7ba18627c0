"""``task.scst``: self-critical sequence training of the captioning task (docs/captioning.md, "SCST")."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from mico_ds.config.base import Section, _f

SCST_TASK = "captioning"  # the one task whose batches carry the references the reward needs


@dataclass
class ScstConfig(Section):
    """Self-critical sequence training (Rennie et al., CVPR 2017; MiCo appendix B.3, "MSCOCO(SCST)"):
    reward = CIDEr-D of a sampled caption against the item's references, baseline = CIDEr-D of the
    greedy caption, loss = -(r_sample - r_greedy) * sum log p(sampled tokens)."""

    enabled: bool = _f(False, "Train the SCST term (task.name=captioning only; the second stage after XE).")
    num_samples: int = _f(
        1,
        "Captions sampled per item, each scored against the item's greedy caption (Rennie et al.: 1; later "
        "SCST work samples 5 and uses the mean of the others as baseline, which is not implemented).",
    )
    max_tokens: int = _f(
        20,
        "Decoding steps of the sampled and greedy captions (EOS included). Every rank decodes exactly this "
        "many (ZeRO-3: the same forward passes on every rank), tokens after EOS are padding.",
    )
    temperature: float = _f(1.0, "Sampling temperature; the loss uses the log-probs of the tempered policy.")
    weight: float = _f(1.0, "Weight of scst_loss in the total loss.")
    replace_generation: bool = _f(
        True,
        "True: SCST replaces the generation objective (Rennie et al.'s second stage; "
        "objectives.generation_weight is not used, the cross-entropy is not computed); False: the SCST term "
        "is added to objectives.generation_weight x the cross-entropy.",
    )
    df: Literal["train", "batch"] = _f(
        "train",
        "CIDEr-D document frequencies of the reward: over every item of the training corpora (one pass over "
        "their json members at the first SCST step, as SCST's reference code precomputes them), or over the "
        "references of each micro-batch (no pass; noisy idf for small batches).",
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        bad = {
            k: v for k, v in {"num_samples": self.num_samples, "max_tokens": self.max_tokens}.items() if v < 1
        }
        if not self.temperature > 0:
            bad["temperature"] = self.temperature
        if self.enabled and not self.weight > 0:
            bad["weight"] = self.weight
        if bad:
            raise ValueError(
                "task.scst: num_samples and max_tokens must be >= 1, temperature > 0 and (when enabled) "
                f"weight > 0; got {bad}"
            )

    def check_task(self, task_name: str) -> None:
        """Refuse SCST for a task other than captioning (its batches carry no references)."""
        if self.enabled and task_name != SCST_TASK:
            raise ValueError(
                f"task.scst.enabled=true needs task.name={SCST_TASK} (got task.name={task_name}): SCST "
                "rewards captions against the references the captioning task's batches carry"
            )
