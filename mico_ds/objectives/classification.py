"""The classification objective (``task.name=classification``, MiCo Table 10) and its batch-level
augmentation: soft-target cross-entropy of the linear head on the pooled feature z, with

* images (batches of images alone): a horizontal flip per sample, then mixup or CutMix per batch
  (timm's ``Mixup`` in its default ``mode="batch"``: one weight for the batch, sample i mixed with
  sample B-1-i, CutMix's weight corrected to the pasted box's area); targets from timm's
  ``mixup_target`` (label smoothing included), loss timm's ``SoftTargetCrossEntropy``;
* audio: SpecAugment frequency and time masks on every clip's log-mel filterbank, filled with 0, the
  normalized features' mean (AST's choice).

The random draws are our own, not timm's ``Mixup`` (which draws from numpy's and Python's global
generators): every one comes from the forward pass's generator seeded by (train.seed, step, micro,
rank, stream) (``mico_ds.objectives.seeding``), so a resumed run mixes exactly as the uninterrupted
one. They run on the CPU (a few scalars and (B,) / (B, N, F) vectors): no device sync, the same
draws on any device. Evaluation (``model.eval()``) augments nothing.

Shape legend: B batch, C classes, N audio clips, F mel bins, T filterbank frames.
"""

from __future__ import annotations

import enum
from typing import Any

import numpy as np
import torch
from timm.data.mixup import mixup_target
from timm.loss import SoftTargetCrossEntropy

from mico_ds.data.schema import MODALITIES

LABELS = "labels"  # batch key: (B,) int64 class index of each sample (json "label_index")
IMAGE, AUDIO = "image", "audio"


class ClassificationStream(enum.IntEnum):
    """The classification forward's random streams, numbered clear of ``seeding.RandomStream`` (1, 2
    and what it may add) so that no two objectives ever share a generator."""

    IMAGE_AUG = 101  # flips, then the mixup / CutMix draw
    SPEC_AUGMENT = 102


def stream_generator(model: Any, stream: ClassificationStream, step: int, micro: int) -> torch.Generator:
    """A CPU generator for ``stream`` of ``forward(batch, step, micro)`` on this rank."""
    return model.generator(stream, step, micro, "cpu")  # MiCoModel.generator: (seed, step, micro, rank)


# ----------------------------------------------------------------------------- images


def hflip(x_BCHW: torch.Tensor, prob: float, gen: torch.Generator) -> torch.Tensor:
    """Each image flipped left-right with probability ``prob``."""
    flip = (torch.rand(x_BCHW.shape[0], generator=gen) < prob).to(x_BCHW.device)
    return torch.where(flip[:, None, None, None], x_BCHW.flip(-1), x_BCHW)


def draw_mix(
    cfg: Any, shape_HW: tuple[int, int], gen: torch.Generator
) -> tuple[str, float, tuple[int, int, int, int] | None]:
    """One batch's mixing: ("none" | "mixup" | "cutmix", lam, CutMix box (y0, y1, x0, x1) or None).

    timm's ``Mixup._params_per_batch`` and ``cutmix_bbox_and_lam``: mix with ``mixup_prob``; CutMix
    with ``switch_prob`` when both alphas are set; lam ~ Beta(alpha, alpha); the box is a
    sqrt(1 - lam) fraction of each side centred at a uniform pixel, clipped to the image, and lam
    becomes 1 - box area / image area. ``gen`` seeds a numpy generator (torch has no seeded Beta).
    """
    rng = np.random.default_rng(int(torch.randint(0, 2**62, (1,), generator=gen)))
    a_mix, a_cut = cfg.mixup_alpha, cfg.cutmix_alpha
    if (a_mix <= 0 and a_cut <= 0) or not rng.random() < cfg.mixup_prob:
        return "none", 1.0, None
    cut = a_cut > 0 and (a_mix <= 0 or rng.random() < cfg.switch_prob)
    lam = float(rng.beta(a_cut, a_cut) if cut else rng.beta(a_mix, a_mix))
    if not cut:
        return "mixup", lam, None
    h, w = shape_HW
    ratio = np.sqrt(1.0 - lam)
    cut_h, cut_w = int(h * ratio), int(w * ratio)
    cy, cx = int(rng.integers(0, h)), int(rng.integers(0, w))
    y0, y1 = int(np.clip(cy - cut_h // 2, 0, h)), int(np.clip(cy + (cut_h + 1) // 2, 0, h))
    x0, x1 = int(np.clip(cx - cut_w // 2, 0, w)), int(np.clip(cx + (cut_w + 1) // 2, 0, w))
    return "cutmix", 1.0 - (y1 - y0) * (x1 - x0) / float(h * w), (y0, y1, x0, x1)


def apply_mix(
    x_BCHW: torch.Tensor, mode: str, lam: float, box: tuple[int, int, int, int] | None
) -> torch.Tensor:
    """Images mixed with the batch reversed (sample i with B-1-i), as ``draw_mix`` said."""
    if mode == "mixup":
        return x_BCHW * lam + x_BCHW.flip(0) * (1.0 - lam)
    if mode == "cutmix":
        assert box is not None
        y0, y1, x0, x1 = box
        out = x_BCHW.clone()
        out[..., y0:y1, x0:x1] = x_BCHW.flip(0)[..., y0:y1, x0:x1]
        return out
    return x_BCHW


def soft_targets(labels_B: torch.Tensor, num_classes: int, lam: float, smoothing: float) -> torch.Tensor:
    """(B, C) targets of the mixed batch, each row summing to 1 (timm's ``mixup_target``)."""
    return mixup_target(labels_B, num_classes, lam=lam, smoothing=smoothing)


# ----------------------------------------------------------------------------- audio


def band_masks(rows: int, size: int, width: int, count: int, gen: torch.Generator) -> torch.Tensor:
    """(rows, size) bool: ``count`` bands per row, each of width uniform in [0, width] starting
    uniformly where it fits (SpecAugment; torchaudio's ``FrequencyMasking`` / ``TimeMasking``)."""
    out = torch.zeros(rows, size, dtype=torch.bool)
    width = min(width, size)
    pos = torch.arange(size)
    for _ in range(count if width > 0 else 0):
        w = (torch.rand(rows, generator=gen) * (width + 1)).floor().long()
        start = (torch.rand(rows, generator=gen) * (size - w + 1)).floor().long()
        out |= (pos >= start[:, None]) & (pos < (start + w)[:, None])
    return out


def spec_augment(
    x_BN1FT: torch.Tensor, freq_width: int, time_width: int, count: int, gen: torch.Generator
) -> torch.Tensor:
    """Audio clips with ``count`` frequency and ``count`` time masks each, set to 0."""
    b, n, c, f, t = x_BN1FT.shape
    fm = band_masks(b * n, f, freq_width, count, gen).view(b, n, 1, f, 1)
    tm = band_masks(b * n, t, time_width, count, gen).view(b, n, 1, 1, t)
    return x_BN1FT.masked_fill((fm | tm).to(x_BN1FT.device), 0.0)


# ----------------------------------------------------------------------------- the objective


def class_logits(model: Any, batch: dict[str, Any]) -> torch.Tensor:
    """(B, C) float32 logits of ``model.cls_head`` on the pooled feature z (training and evaluation).
    Only submodules are called (their forward gathers their ZeRO-3 parameters)."""
    if getattr(model, "cls_head", None) is None:
        raise ValueError(
            "the model has no classification head: it was not built for task.name=classification "
            "(task.classification.num_classes)"
        )
    z_BD, _ = model.encode_context(batch)
    return model.cls_head(z_BD).float()


def classification_forward(
    model: Any, batch: dict[str, Any], step: int, micro: int
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """MiCoModel's forward for ``task.name=classification``: the text branch does not run.

    In training, images are flipped and mixed and audio masked (module docstring) before encoding.

    Returns:
        losses: ``classification_loss`` (soft-target cross-entropy, mean over the batch) and ``loss``.
        report: ``classification_acc`` (in-batch top-1 against each row's largest target) and
            ``mix_lam`` (1: not mixed).
    """
    cfg = model.classification
    if batch.get(LABELS) is None:
        raise ValueError(f"a classification batch needs {LABELS!r} (B,) class indices; keys: {sorted(batch)}")
    present = [m for m in MODALITIES if batch.get(m) is not None]
    labels_B = batch[LABELS].to(batch[present[0]].device if present else "cpu", torch.int64)
    x = dict(batch)
    lam = 1.0
    # Images alone: a flip or a mix of the image only would break its pairing with the sample's other
    # modalities (depth and normals share the image's crop).
    if model.training and present == [IMAGE]:
        gen = stream_generator(model, ClassificationStream.IMAGE_AUG, step, micro)
        img = hflip(x[IMAGE], cfg.hflip_prob, gen)
        mode, lam, box = draw_mix(cfg, tuple(img.shape[-2:]), gen)
        x[IMAGE] = apply_mix(img, mode, lam, box)
    if model.training and AUDIO in present:
        gen = stream_generator(model, ClassificationStream.SPEC_AUGMENT, step, micro)
        x[AUDIO] = spec_augment(x[AUDIO], cfg.spec_freq_mask, cfg.spec_time_mask, cfg.spec_masks, gen)
    logits_BC = class_logits(model, x)
    targets_BC = soft_targets(labels_B, logits_BC.shape[1], lam, cfg.label_smoothing)
    loss = SoftTargetCrossEntropy()(logits_BC, targets_BC)
    acc = (logits_BC.detach().argmax(-1) == targets_BC.argmax(-1)).float().mean()
    report = {"classification_acc": acc, "mix_lam": torch.tensor(lam, device=loss.device)}
    return {"classification_loss": loss, "loss": loss}, report
