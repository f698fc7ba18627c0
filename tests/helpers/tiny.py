"""A tiny MiCo configuration and random batches that follow mico_ds/data/schema.py.

Shared by model, objective, kernel and trainer tests:

    cfg = make_tiny_config()
    special = make_tiny_special()
    batch = make_random_batch(cfg, ["image", "audio"], batch_size=4, seed=0)
    model = MiCoModel.from_run_config(cfg, special)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from mico_ds.config import (
    ContextConfig,
    InputConfig,
    ModelConfig,
    ObjectiveConfig,
    RunConfig,
    TextConfig,
    TrainConfig,
    VisionConfig,
)
from mico_ds.data.schema import (
    CAPTIONS,
    CORPUS,
    KEYS,
    MODALITIES,
    SAMPLE_SOURCE,
    TEXT_IDS,
    TEXT_MASK,
    TEXT_SOURCE,
    SpecialTokens,
)

TINY_VOCAB = 96


def make_tiny_special(vocab_size: int = TINY_VOCAB) -> SpecialTokens:
    """Special ids of a tiny vocabulary: pad 0, bos 1, eos 2, <mask> 3; words are 4..vocab_size-1."""
    return SpecialTokens(vocab_size=vocab_size, pad_id=0, bos_id=1, eos_id=2, mask_id=3)


def make_tiny_config(**model_overrides: Any) -> RunConfig:
    """A RunConfig whose model runs forward+backward on CPU in well under a second.

    Geometry: 32x32 images (8x8 patches -> 4x4 grid), 2 video frames, 2 audio clips of 16 mel bins
    x 32 frames (8x8 patches -> 2x4 grid). ViT width 64, 2 blocks; Llama hidden 64, 2 layers with
    grouped-query attention (4 heads, 2 kv heads). ``model_overrides`` set ModelConfig fields.
    """
    inputs = InputConfig(image_size=32, num_frames=2, mel_bins=16, clip_frames=32, num_clips=2)
    model = ModelConfig(
        vision=VisionConfig(patch_size=8, audio_patch_size=8, width=64, depth=2, heads=4, mlp_dim=128),
        context=ContextConfig(
            tokens_per_frame=3, max_context_len=8, max_positions=32, num_sources=4, fusion_layers=1
        ),
        text=TextConfig(
            hidden_size=64,
            num_layers=2,
            num_heads=4,
            num_kv_heads=2,
            intermediate_size=128,
            max_position_embeddings=128,
            attn_implementation="sdpa",
        ),
        embed_dim=32,
        kernels="torch",
    )
    for k, v in model_overrides.items():
        setattr(model, k, v)
    return RunConfig(
        name="tiny",
        inputs=inputs,
        model=model,
        objectives=ObjectiveConfig(),
        train=TrainConfig(seed=0, progress=False),
    )


def make_random_batch(
    cfg: RunConfig,
    modalities: Sequence[str],
    batch_size: int,
    seed: int,
    text_len: int = 12,
    special: SpecialTokens | None = None,
    joined: bool = False,
) -> dict[str, Any]:
    """A random batch with the given modalities, shaped by ``cfg.inputs`` (schema.py legend).

    Captions are BOS + 3..text_len-2 word ids + EOS, right-padded with pad_id. ``sample_source`` is
    all zeros unless ``joined`` (then random rows of E_Sam per modality, and a random ``text_source``
    per token).
    """
    unknown = [m for m in modalities if m not in MODALITIES]
    if unknown or not modalities:
        raise ValueError(f"modalities must be a non-empty subset of {MODALITIES}, got {list(modalities)}")
    special = special or make_tiny_special()
    g = torch.Generator().manual_seed(seed)
    i = cfg.inputs
    b, s = batch_size, i.image_size
    shapes = {
        "image": (b, 3, s, s),
        "video": (b, i.num_frames, 3, s, s),
        "audio": (b, i.num_clips, 1, i.mel_bins, i.clip_frames),
        "depth": (b, 1, s, s),
        "normal": (b, 3, s, s),
    }
    present = [m for m in MODALITIES if m in modalities]
    batch: dict[str, Any] = {m: torch.randn(shapes[m], generator=g) for m in present}
    ids = torch.full((b, text_len), special.pad_id, dtype=torch.long)
    mask = torch.zeros((b, text_len), dtype=torch.long)
    lengths = torch.randint(5, text_len + 1, (b,), generator=g)
    for r, n in enumerate(lengths.tolist()):
        ids[r, 0] = special.bos_id
        ids[r, 1 : n - 1] = torch.randint(4, special.vocab_size, (n - 2,), generator=g)
        ids[r, n - 1] = special.eos_id
        mask[r, :n] = 1
    batch[TEXT_IDS] = ids
    batch[TEXT_MASK] = mask
    if joined:
        src = torch.randint(0, cfg.model.context.num_sources, (b, len(present)), generator=g)
    else:
        src = torch.zeros((b, len(present)), dtype=torch.long)
    batch[SAMPLE_SOURCE] = src
    if joined:  # random per-token sources of the caption (E_Sam of the text features), 0 on padding
        n_src = cfg.model.context.num_sources
        batch[TEXT_SOURCE] = torch.randint(0, n_src, (b, text_len), generator=g) * mask
    batch[KEYS] = [f"sample-{seed}-{r:04d}" for r in range(b)]
    batch[CAPTIONS] = [
        " ".join(str(t) for t in ids[r, 1 : n - 1].tolist()) for r, n in enumerate(lengths.tolist())
    ]
    batch[CORPUS] = "tiny"
    return batch
