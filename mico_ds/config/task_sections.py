"""The sections of a task's own settings (``task.<name>``), one per task that has any."""

from __future__ import annotations

from dataclasses import dataclass

from mico_ds.config.base import Section, _f


@dataclass
class ClassificationConfig(Section):
    """``task.name=classification`` (MiCo Table 10): a linear head on the pooled context feature,
    trained with soft-target cross-entropy; mixup / CutMix and flips for images, SpecAugment masks for
    audio (docs/classification.md)."""

    num_classes: int = _f(
        0,
        "Classes of the linear head: the length of the shards' classes.json (tools/make_shards.py --format "
        "imagefolder | labels-csv); task.name=classification needs it >= 2.",
    )
    label_smoothing: float = _f(
        0.1, "Label smoothing of the soft targets: the class gets 1 - s + s/C, every other class s/C."
    )
    mixup_alpha: float = _f(0.8, "Images: mixup's blend weight ~ Beta(alpha, alpha) (0: no mixup; DeiT 0.8).")
    cutmix_alpha: float = _f(1.0, "Images: CutMix's kept area ~ Beta(alpha, alpha) (0: no CutMix; DeiT 1.0).")
    mixup_prob: float = _f(1.0, "Images: probability that a training batch is mixed (mixup or CutMix).")
    switch_prob: float = _f(
        0.5, "Images: probability that a mixed batch takes CutMix rather than mixup (when both alphas > 0)."
    )
    hflip_prob: float = _f(0.5, "Images: probability that a training image is flipped left-right.")
    spec_freq_mask: int = _f(
        12, "Audio: SpecAugment frequency-mask width, uniform in [0, F] mel bins (0: none; AST's 24 of 128)."
    )
    spec_time_mask: int = _f(
        96, "Audio: SpecAugment time-mask width, uniform in [0, T] filterbank frames (0: none; AST's ESC-50)."
    )
    spec_masks: int = _f(1, "Audio: masks of each kind (frequency, time) drawn per training clip.")
    eval_samples: int = _f(
        1024,
        "Held-out items classified at each evaluation, split over the ranks (they are held in memory, as "
        "every evaluation task's items are).",
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        probs = {k: getattr(self, k) for k in ("mixup_prob", "switch_prob", "hflip_prob")}
        names = ("num_classes", "mixup_alpha", "cutmix_alpha", "spec_freq_mask", "spec_time_mask")
        nonneg = {k: getattr(self, k) for k in (*names, "spec_masks")}
        bad = {k: v for k, v in probs.items() if not 0 <= v <= 1}
        bad |= {k: v for k, v in nonneg.items() if not v >= 0}
        if not 0 <= self.label_smoothing < 1:
            bad["label_smoothing"] = self.label_smoothing
        if self.eval_samples < 1:
            bad["eval_samples"] = self.eval_samples
        if bad:
            raise ValueError(
                f"task.classification: probabilities must lie in [0, 1], label_smoothing in [0, 1), "
                f"eval_samples >= 1 and the rest >= 0; got {bad}"
            )
