"""The sections of a run's configuration: one typed dataclass per concern.

Each field's ``help`` metadata is its documentation (``python -m mico_ds.train --help-config``
prints it). Choices are ``Literal`` types, checked when a section is built (by the loader in
``mico_ds.config.loading``, which names the file and the dotted key, or by a direct construction).
Sections hold only serializable values.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

from mico_ds.config.base import Section, _f, _section
from mico_ds.config.eval_task import CheckpointConfig, EvalConfig, TaskConfig
from mico_ds.data.schema import CAPTION_FIELDS, MODALITIES, TEXT_FIELDS, Modality

# ----------------------------------------------------------------------------- inputs / data


@dataclass
class InputConfig(Section):
    """Geometry and normalization of every modality; shared by the data pipeline and the model."""

    image_size: int = _f(224, "Side of the square image / frame / depth / normal input, in pixels.")
    num_frames: int = _f(
        8, "Video frames sampled per clip (uniform segments; random in train, middle in eval)."
    )
    eval_num_frames: int | None = _f(None, "Frames per video at evaluation (default: num_frames).")
    sample_rate: int = _f(16000, "Audio is converted to mono at this rate before the filterbank.")
    mel_bins: int = _f(64, "Kaldi log-mel filterbank bins (MiCo audio processor).")
    clip_frames: int = _f(512, "Filterbank frames (10 ms hop) per audio clip.")
    num_clips: int = _f(1, "Audio clips per sample (uniform segments of the waveform).")
    audio_mean: float = _f(-4.27, "Mean subtracted from log-mel features (AudioSet statistics, as AST).")
    audio_std: float = _f(4.57, "Std the log-mel features are divided by (after the 2x AST scaling).")
    image_mean: list[float] = _f([0.48145466, 0.4578275, 0.40821073], "RGB mean (CLIP).")
    image_std: list[float] = _f([0.26862954, 0.26130258, 0.27577711], "RGB std (CLIP).")
    train_crop_scale: list[float] = _f([0.9, 1.0], "RandomResizedCrop area scale for training images/frames.")


def check_caption_fields(key: str, fields: list[str]) -> None:
    """Raises ValueError naming ``key`` unless ``fields`` is a non-empty list of schema.TEXT_FIELDS."""
    if not fields or any(f not in TEXT_FIELDS for f in fields):
        raise ValueError(f"{key}={fields}: each must be one of {list(TEXT_FIELDS)}, at least one")


@dataclass
class CorpusConfig(Section):
    """One training corpus: its shards, what it carries, its batch size and share of steps."""

    name: str = _f("corpus", "Corpus name (logged, and a key in checkpoints).")
    shards: str = _f("", "Brace-expandable paths (relative to data.root), http(s):// URLs, pipe: commands.")
    modalities: list[Modality] = _f(["image"], f"Modalities every sample must carry; subset of {MODALITIES}.")
    batch_size: int | None = _f(
        None,
        "Per-rank batch size (appendix B.2: each corpus has its own); derived when global_batch_size "
        "is set, else 8.",
    )
    global_batch_size: int | None = _f(
        None,
        "Samples of this corpus per optimizer step over all ranks: batch_size = global_batch_size / "
        "(world size x optim.grad_accum), checked when the world size is known.",
    )
    steps: int | None = _f(None, "Number of steps drawn from this corpus (B.2); default: share by weight.")
    weight: float = _f(1.0, "Relative share of steps when steps is not set.")
    joined_from: list[str] = _f(
        [], "Build samples by joining one pair from each named single-pair corpus (MiCo Eq. 3)."
    )
    source_id: int = _f(0, "Row of the sampling embedding E_Sam used when this corpus is a part of a join.")
    resampled: bool = _f(
        False,
        "Draw each stream's shards with replacement from all shards (OpenCLIP --dataset-resampled): for "
        "corpora of very different sizes and elastic restarts; on a joined corpus, for all its sources.",
    )
    caption_fields: list[str] = _f(
        list(CAPTION_FIELDS),
        f"Caption fields of the json joined into the text (MiCo Eq. 2), in the order {list(TEXT_FIELDS)}; "
        "['omni'] trains on the omni caption (VAST-27M vast_cap, VALOR desc) instead.",
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.batch_size is None and self.global_batch_size is None:
            self.batch_size = 8
        check_caption_fields(f"data.corpora[{self.name}].caption_fields", self.caption_fields)
        for k in ("batch_size", "global_batch_size"):
            v = getattr(self, k)
            if v is not None and v < 1:
                raise ValueError(f"data.corpora[{self.name}].{k} must be >= 1, got {v}")

    def resolve_batch_size(self, world_size: int, grad_accum: int) -> int:
        """Set (and return) the per-rank ``batch_size`` from ``global_batch_size`` for this world size.

        Raises:
            ValueError: naming every factor when the global batch does not split evenly.
        """
        if self.global_batch_size is not None:
            per = world_size * grad_accum
            if self.global_batch_size % per:
                raise ValueError(
                    f"data.corpora[{self.name}].global_batch_size={self.global_batch_size} is not divisible "
                    f"by world_size={world_size} x optim.grad_accum={grad_accum} (= {per}); choose a global "
                    f"batch, GPU count or grad_accum whose product divides it"
                )
            self.batch_size = self.global_batch_size // per
        assert self.batch_size is not None
        return self.batch_size


@dataclass
class DecodeLimits(Section):
    """Caps checked on a member's size or header before it is decoded; a sample past one is a counted
    skip (the reason in brackets), not a worker's memory blow-up. 0 disables a cap. The defaults are
    far above what training media hold."""

    member_bytes: int = _f(
        256 << 20, "Largest member a sample may use, in bytes; larger ones are not read (too_large_member)."
    )
    image_pixels: int = _f(
        89_478_485,
        "Largest image / depth / normal map / frame image, in pixels from its header (too_many_pixels); "
        "the default is Pillow's Image.MAX_IMAGE_PIXELS, and Pillow refuses twice that in any case.",
    )
    video_frames: int = _f(
        54_000, "Most frames of a video (header, else as decoded; 30 min at 30 fps) (too_many_frames)."
    )
    video_pixels: int = _f(
        8192 * 4320, "Largest video frame, width x height in pixels (8K UHD) (too_large_frames)."
    )
    audio_seconds: float = _f(
        3600.0, "Longest audio member, in seconds (header, else counted while decoding) (too_long_audio)."
    )
    json_bytes: int = _f(1 << 20, "Largest caption member (json, txt), in bytes (too_large_json).")

    def __post_init__(self) -> None:
        super().__post_init__()
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if v < 0:
                raise ValueError(f"data.limits.{f.name} must be >= 0 (0: no cap), got {v}")


@dataclass
class DataConfig(Section):
    """Shard streams, mixing and data-loader workers."""

    root: str = _f("data", "Directory shard paths are relative to.")
    corpora: list[CorpusConfig] = _f([], "Training corpora, mixed step by step by a seeded schedule.")
    val_shards: str | None = _f(None, "Held-out shards for in-training retrieval evaluation.")
    test_shards: str | None = _f(
        None,
        "Test split (like data.val_shards): evaluated once when training ends, with the best checkpoint's "
        "weights under checkpoint.keep_best, into summary.json's 'test'.",
    )
    val_modalities: list[Modality] = _f(["image"], "Modalities of the held-out samples used for evaluation.")
    val_caption_fields: list[str] = _f(
        list(CAPTION_FIELDS),
        "Caption fields of the held-out samples' texts (as data.corpora[].caption_fields; [omni] for "
        "VAST-27M's vast_cap or VALOR's desc).",
    )
    tokenizer: str = _f(
        "", "SentencePiece tokenizer.model (Llama-2's, or one trained by tools/train_tokenizer.py)."
    )
    text_max_len: int = _f(64, "Maximum text tokens (concatenated captions) per sample.")
    num_workers: int = _f(2, "Data-loader worker processes per rank and corpus.")
    shuffle_buffer: int = _f(256, "Samples in each worker's shuffle buffer (flushed at chunk ends).")
    shards_per_chunk: int = _f(4, "Shards a worker interleaves at once; resume replays at most one chunk.")
    max_skip_rate: float = _f(0.05, "Fraction of unreadable samples above which the run stops with an error.")
    min_samples_for_skip_rate: int = _f(200, "Samples seen before the skip-rate bound is enforced.")
    shard_retries: int = _f(
        3, "Further reads of a failed remote shard (http(s)://, pipe:) before it is skipped (shard_failed)."
    )
    shard_retry_backoff_s: float = _f(
        1.0, "Seconds before the first retry of a failed remote shard; doubled for each next (at most 60)."
    )
    max_failed_shards: float = _f(
        0.01,
        "Failed remote shards (shard_failed) one data stream may meet in one epoch: a fraction (< 1) of its "
        "shards per epoch, or a count (>= 1); one more stops the run, naming them.",
    )
    limits: DecodeLimits = _section(DecodeLimits, "Caps applied before members are decoded (skip reasons).")

    def __post_init__(self) -> None:
        super().__post_init__()
        for k in ("shard_retries", "shard_retry_backoff_s", "max_failed_shards"):
            if getattr(self, k) < 0:
                raise ValueError(f"data.{k} must be >= 0, got {getattr(self, k)}")
        check_caption_fields("data.val_caption_fields", self.val_caption_fields)
        names = [c.name for c in self.corpora]
        for c in self.corpora:
            missing = [j for j in c.joined_from if j not in names]
            if missing:
                raise ValueError(f"data.corpora[{c.name}].joined_from names unknown corpora {missing}")

    def resolve_batch_sizes(self, world_size: int, grad_accum: int) -> None:
        """Per-rank batch sizes of every corpus for this world size (see CorpusConfig.global_batch_size)."""
        if grad_accum < 1:
            raise ValueError(f"optim.grad_accum must be >= 1, got {grad_accum}")
        if world_size < 1:
            raise ValueError(f"world size must be >= 1, got {world_size}")
        for c in self.corpora:
            c.resolve_batch_size(world_size, grad_accum)


@dataclass
class DemoConfig(Section):
    """The built-in synthetic demo corpus (mico_ds.demo), generated under data.root on first use."""

    generate: bool = _f(False, "Generate the demo corpus under data.root when it is missing.")
    num_train: int = _f(2048, "Training samples of the generated demo corpus.")
    num_val: int = _f(256, "Held-out samples of the generated demo corpus (unique captions).")
    num_tune: int = _f(
        128, "Held-out tuning samples of the generated demo corpus (omni/tune-*.tar, e.g. the rerank weight)."
    )
    num_pair_heldout: int = _f(
        0,
        "image_text val and test items each (image_text/{val,test}-*.tar): the image-text corpus as a "
        "downstream retrieval dataset (0: none).",
    )


# ----------------------------------------------------------------------------- model


@dataclass
class VisionConfig(Section):
    """The shared omni-encoder ViT (timm blocks) and its per-modality tokenizers."""

    patch_size: int = _f(16, "Patch side for images, frames, depth and normal maps.")
    audio_patch_size: int = _f(16, "Patch side on the (mel bins x frames) spectrogram.")
    width: int = _f(768, "Transformer width.")
    depth: int = _f(12, "Number of transformer blocks.")
    heads: int = _f(12, "Attention heads.")
    mlp_dim: int = _f(3072, "MLP hidden size.")
    qkv_bias: bool = _f(True, "Bias in the qkv projection.")
    drop_path: float = _f(0.0, "Stochastic depth rate (linearly increasing over blocks).")
    pre_norm: bool = _f(
        False, "LayerNorm on the embedded tokens before the blocks (CLIP's ln_pre); true for CLIP weights."
    )
    pretrained: str | None = _f(
        None, "Local timm/EVA ViT checkpoint file (.safetensors/.pth/.bin) to initialize the encoder from."
    )
    grad_checkpointing: bool = _f(False, "Activation checkpointing of every block.")


@dataclass
class ContextConfig(Section):
    """Multimodal context construction (MiCo Eq. 1 and 3) and the fusion layers that pool it."""

    tokens_per_frame: int = _f(5, "Tokens kept per frame/clip: CLS + (n-1) adaptive-pooled patch tokens.")
    max_context_len: int = _f(64, "Rows of each context embedding table E_C (tokens per modality).")
    max_positions: int = _f(512, "Rows of the shared position embedding E_Pos (tokens of all modalities).")
    num_sources: int = _f(8, "Rows of the sampling embedding E_Sam (Eq. 3).")
    fusion_layers: int = _f(2, "Transformer blocks fusing the context with a [CTX] token.")
    prefix_tokens: int | None = _f(None, "Context tokens passed to the LLM as prefix (None: all).")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.prefix_tokens is not None and self.prefix_tokens < 1:
            raise ValueError(f"model.context.prefix_tokens must be >= 1 or null, got {self.prefix_tokens}")


@dataclass
class TextConfig(Section):
    """The Llama-2 interface branch (transformers)."""

    pretrained: str | None = _f(None, "Local Hugging Face Llama directory; None builds from the sizes below.")
    hidden_size: int = _f(4096, "Llama hidden size.")
    num_layers: int = _f(32, "Decoder layers.")
    num_heads: int = _f(32, "Attention heads.")
    num_kv_heads: int | None = _f(None, "Key/value heads (grouped-query attention); None = num_heads.")
    intermediate_size: int = _f(11008, "MLP hidden size.")
    max_position_embeddings: int = _f(4096, "RoPE context length.")
    rms_norm_eps: float = _f(1e-5, "RMSNorm epsilon.")
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = _f(
        "sdpa", "transformers attention backend."
    )
    grad_checkpointing: bool = _f(False, "Activation checkpointing of every decoder layer.")
    pooling: Literal["mean", "last"] = _f(
        "mean", "Text feature for contrastive learning: mean over tokens, or last."
    )


@dataclass
class ModelConfig(Section):
    """The MiCo model: omni-encoder, context, text branch, heads."""

    vision: VisionConfig = _section(VisionConfig, "Omni-encoder ViT.")
    context: ContextConfig = _section(ContextConfig, "Multimodal context.")
    text: TextConfig = _section(TextConfig, "Text branch.")
    embed_dim: int = _f(512, "Contrastive projection dimension.")
    init: str | None = _f(
        None,
        "Weights-only start (the trainer's --init): a mico_ds run, checkpoints/ or checkpoint dir (any ZeRO "
        "stage, universal too), consolidated weights (tools/zero_to_fp32.py), or exported branches "
        "(vision/ + text/). Loaded after model.*.pretrained; optimizer, schedule and data start fresh; "
        "a --resume ignores it (the checkpoint holds the weights).",
    )
    kernels: Literal["auto", "triton", "torch"] = _f(
        "auto", "Fused kernels: auto (Triton on CUDA, PyTorch elsewhere), triton, or torch."
    )
    norm_impl: Literal["auto", "apex", "torch"] = _f(
        "auto",
        "LayerNorm/RMSNorm kernels of both branches: apex (NVIDIA apex's fused norms, CUDA), torch "
        "(PyTorch's F.layer_norm / F.rms_norm), or auto (apex on CUDA when it imports, else torch).",
    )


@dataclass
class ObjectiveConfig(Section):
    """The three pretraining objectives (MiCo Eq. 4-6) and their weights."""

    contrastive_weight: float = _f(1.0, "Weight of the omni-modal contrastive loss (Eq. 4).")
    matching_weight: float = _f(1.0, "Weight of the matching loss with hard negatives (Eq. 5).")
    generation_weight: float = _f(1.0, "Weight of the masked causal caption generation loss (Eq. 6).")
    mask_ratio: float = _f(0.6, "Fraction of caption tokens replaced by <mask> for generation (paper: 60%).")
    init_temperature: float = _f(
        0.07, "Initial softmax temperature (tau = 1/temperature, log-parameterized)."
    )
    max_logit_scale: float = _f(100.0, "Clamp of the learnable logit scale, applied in the forward pass.")
    contrastive_tile: int = _f(1024, "Tile size of the memory-efficient contrastive kernel.")
    matching_form: Literal["pointwise", "listwise"] = _f(
        "pointwise",
        "Matching loss: 'pointwise' binary cross-entropy on every pair (Eq. 5), or 'listwise' softmax "
        "cross-entropy over the positive and its matching_negatives mined candidates, both directions "
        "(the task a top-k rerank asks of the head).",
    )
    matching_negatives: int = _f(
        1, "Hard negatives mined per positive and direction (paper: 1), drawn without replacement."
    )
    matching_dedup: bool = _f(
        True,
        "Never mine a candidate that shares the positive's caption text or its source key (json "
        "'video_id', else the sample key): another clip of one video, a repeated caption.",
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        w = self.weights(allow_none=True)
        if any(v < 0 for v in w.values()):
            raise ValueError(f"objectives weights must be >= 0, got {w}")
        if self.matching_negatives < 1:
            raise ValueError(f"objectives.matching_negatives must be >= 1, got {self.matching_negatives}")

    def weights(self, allow_none: bool = False) -> dict[str, float]:
        """``{"contrastive_loss": w, "matching_loss": w, "generation_loss": w}``, checked.

        Raises:
            ValueError: a weight is negative, or none is positive.
        """
        w = {
            "contrastive_loss": self.contrastive_weight,
            "matching_loss": self.matching_weight,
            "generation_loss": self.generation_weight,
        }
        if any(v < 0 for v in w.values()) or not (allow_none or any(v > 0 for v in w.values())):
            raise ValueError(f"objectives weights must be >= 0 with at least one > 0, got {w}")
        return w


# ----------------------------------------------------------------------------- training


@dataclass
class OptimConfig(Section):
    """AdamW and the learning-rate schedule."""

    lr: float = _f(1e-4, "Peak learning rate (paper: 1e-4).")
    weight_decay: float = _f(0.01, "Decoupled weight decay, applied to matrices (ndim >= 2) only.")
    betas: list[float] = _f([0.9, 0.98], "Adam betas.")
    eps: float = _f(1e-8, "Adam epsilon.")
    schedule: Literal["linear", "cosine", "constant"] = _f(
        "linear", "After the warmup: linear decay (paper), cosine decay, or constant."
    )
    warmup_steps: int = _f(1000, "Linear warmup steps.")
    min_lr_ratio: float = _f(0.0, "Final learning rate as a fraction of the peak.")
    grad_clip: float = _f(1.0, "Global gradient-norm clip (0 disables).")
    grad_accum: int = _f(1, "Gradient accumulation steps per optimizer step.")
    vision_lr_scale: float = _f(1.0, "Learning-rate multiplier of the vision branch (0 freezes it).")
    text_lr_scale: float = _f(1.0, "Learning-rate multiplier of the text branch (0 freezes it).")
    impl: Literal["auto", "torch", "apex", "deepspeed"] = _f(
        "auto",
        "AdamW kernel: torch (fused on CUDA), apex (apex FusedAdam, CUDA), deepspeed (DeepSpeed "
        "FusedAdam, JIT-built at start, CUDA), or auto (apex on CUDA when it imports, else torch). With "
        "optimizer offload DeepSpeed's CPU Adam is always used.",
    )


@dataclass
class TrainConfig(Section):
    """The training loop."""

    max_steps: int = _f(1000, "Optimizer steps to train.")
    seed: int = _f(0, "Global seed (model init, data order, masking).")
    ds_config: str = _f(
        "zero3_cpu.json", "DeepSpeed JSON shipped in mico_ds/ds_configs/ (or a path): engine settings only."
    )
    precision: Literal["auto", "bf16", "fp32"] = _f(
        "auto",
        "auto (bf16 on CUDA with bf16 support, else fp32), bf16 or fp32; the one owner of precision: "
        "the DeepSpeed JSON's bf16 block is filled from it.",
    )
    log_every: int = _f(10, "Steps between metric records.")
    save_every: int = _f(500, "Steps between checkpoints (0: only at the end).")
    eval_every: int = _f(0, "Steps between in-training evaluations (0: only at the end).")
    max_minutes: float = _f(
        0.0, "Wall-clock budget: save and exit cleanly after this many minutes (0: none)."
    )
    deterministic: bool = _f(False, "Deterministic algorithms (for golden-loss tests).")
    dist_timeout_s: float = _f(
        600.0, "Process-group timeout: a stopped or hung rank ends the job within this time."
    )
    max_bad_steps: int = _f(
        3,
        "Skipped steps in a row (a non-finite loss or gradient on any rank; each is skipped without "
        "an update) that make the run roll back to its newest checkpoint (0: never roll back).",
    )
    spike_sigmas: float = _f(
        0.0,
        "Loss-spike rule: roll back when a step's loss exceeds the trailing mean by this many standard "
        "deviations (at least 1% of the mean) over train.spike_window steps (0: off).",
    )
    spike_window: int = _f(100, "Steps the spike rule averages over; it is armed once they are seen.")
    max_rollbacks: int = _f(
        3, "Rollbacks (bad steps or spikes) after which the run stops with an error instead."
    )
    progress: bool = _f(True, "Progress bar on rank 0.")
    record_keys: bool = _f(
        False, "Debug: write the sample keys of every micro-batch to RUN_DIR/keys/rank{R}.jsonl."
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        for k in ("max_bad_steps", "spike_sigmas", "max_rollbacks"):
            if getattr(self, k) < 0:
                raise ValueError(f"train.{k} must be >= 0, got {getattr(self, k)}")
        if self.spike_window < 1:
            raise ValueError(f"train.spike_window must be >= 1, got {self.spike_window}")


@dataclass
class RunConfig(Section):
    """A whole run: one YAML recipe resolves to this."""

    name: str = _f("run", "Run name.")
    inputs: InputConfig = _section(InputConfig, "Input geometry.")
    data: DataConfig = _section(DataConfig, "Data.")
    demo: DemoConfig = _section(DemoConfig, "The built-in demo corpus.")
    model: ModelConfig = _section(ModelConfig, "Model.")
    objectives: ObjectiveConfig = _section(ObjectiveConfig, "Objectives.")
    optim: OptimConfig = _section(OptimConfig, "Optimizer.")
    train: TrainConfig = _section(TrainConfig, "Training loop.")
    checkpoint: CheckpointConfig = _section(CheckpointConfig, "Checkpoints.")
    eval: EvalConfig = _section(EvalConfig, "Evaluation.")
    task: TaskConfig = _section(TaskConfig, "Task.")
    launch: dict[str, Any] = _f({}, "Launcher hints (e.g. nproc for the demo); not read by the trainer.")

    def __post_init__(self) -> None:
        super().__post_init__()
        tune = self.eval.rerank_tune_shards
        if tune is not None and tune == self.data.val_shards:
            raise ValueError(
                f"eval.rerank_tune_shards={tune!r} is data.val_shards: the rerank weight must be chosen "
                "on another split than the reported one"
            )
        # classification trains its own head's loss; every other task trains MiCo's objectives
        if self.task.name != "classification":
            self.objectives.weights()


def to_dict(cfg: Any) -> Any:
    """Plain (YAML-serializable) form of a config."""
    return dataclasses.asdict(cfg)
