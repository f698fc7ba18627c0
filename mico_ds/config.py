"""Typed run configuration: YAML recipes + dotted CLI overrides, loaded strictly.

A recipe is a YAML file under ``mico_ds/recipes/`` (or any path) whose top-level keys are the
sections of :class:`RunConfig`. Unknown keys are errors naming the key and the section; each field's
``help`` metadata is its documentation (``python -m mico_ds.train --help-config`` prints it).

    cfg = load_config("demo", overrides=["optim.lr=3e-4", "train.max_steps=100"])
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mico_ds.data.schema import MODALITIES

RECIPE_DIR = Path(__file__).parent / "recipes"


def _f(default: Any, help: str) -> Any:
    """A dataclass field with a help string (mutable defaults via factory)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"help": help})
    return field(default=default, metadata={"help": help})


# ----------------------------------------------------------------------------- inputs / data


@dataclass
class InputConfig:
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


@dataclass
class CorpusConfig:
    """One training corpus: its shards, what it carries, its batch size and share of steps."""

    name: str = _f("corpus", "Corpus name (logged, and a key in checkpoints).")
    shards: str = _f("", "Brace-expandable shard URLs or paths (relative to data.root), or pipe: commands.")
    modalities: list[str] = _f(["image"], f"Modalities every sample must carry; subset of {MODALITIES}.")
    batch_size: int = _f(8, "Per-rank batch size of this corpus (appendix B.2: each corpus has its own).")
    steps: int | None = _f(None, "Number of steps drawn from this corpus (B.2); default: share by weight.")
    weight: float = _f(1.0, "Relative share of steps when steps is not set.")
    joined_from: list[str] = _f(
        [], "Build samples by joining one pair from each named single-pair corpus (MiCo Eq. 3)."
    )
    source_id: int = _f(0, "Row of the sampling embedding E_Sam used when this corpus is a part of a join.")


@dataclass
class DataConfig:
    """Shard streams, mixing and data-loader workers."""

    root: str = _f("data", "Directory shard paths are relative to.")
    corpora: list[CorpusConfig] = _f([], "Training corpora, mixed step by step by a seeded schedule.")
    val_shards: str | None = _f(None, "Held-out shards for in-training retrieval evaluation.")
    val_modalities: list[str] = _f(["image"], "Modalities of the held-out samples used for evaluation.")
    tokenizer: str = _f(
        "", "SentencePiece tokenizer.model (Llama-2's, or one trained by tools/train_tokenizer.py)."
    )
    text_max_len: int = _f(64, "Maximum text tokens (concatenated captions) per sample.")
    num_workers: int = _f(2, "Data-loader worker processes per rank and corpus.")
    shuffle_buffer: int = _f(256, "Samples in each worker's shuffle buffer (flushed at chunk ends).")
    shards_per_chunk: int = _f(4, "Shards a worker interleaves at once; resume replays at most one chunk.")
    max_skip_rate: float = _f(0.05, "Fraction of unreadable samples above which the run stops with an error.")
    min_samples_for_skip_rate: int = _f(200, "Samples seen before the skip-rate bound is enforced.")
    generate_demo: bool = _f(False, "Generate the built-in demo corpus under root when it is missing.")
    demo_num_train: int = _f(2048, "Training samples of the generated demo corpus.")
    demo_num_val: int = _f(256, "Held-out samples of the generated demo corpus (unique captions).")


# ----------------------------------------------------------------------------- model


@dataclass
class VisionConfig:
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
class ContextConfig:
    """Multimodal context construction (MiCo Eq. 1 and 3) and the fusion layers that pool it."""

    tokens_per_frame: int = _f(5, "Tokens kept per frame/clip: CLS + (n-1) adaptive-pooled patch tokens.")
    max_context_len: int = _f(64, "Rows of each context embedding table E_C (tokens per modality).")
    max_positions: int = _f(512, "Rows of the shared position embedding E_Pos (tokens of all modalities).")
    num_sources: int = _f(8, "Rows of the sampling embedding E_Sam (Eq. 3).")
    fusion_layers: int = _f(2, "Transformer blocks fusing the context with a [CTX] token.")
    prefix_tokens: int | None = _f(None, "Context tokens passed to the LLM as prefix (None: all).")


@dataclass
class TextConfig:
    """The Llama-2 interface branch (transformers)."""

    pretrained: str | None = _f(None, "Local Hugging Face Llama directory; None builds from the sizes below.")
    hidden_size: int = _f(4096, "Llama hidden size.")
    num_layers: int = _f(32, "Decoder layers.")
    num_heads: int = _f(32, "Attention heads.")
    num_kv_heads: int | None = _f(None, "Key/value heads (grouped-query attention); None = num_heads.")
    intermediate_size: int = _f(11008, "MLP hidden size.")
    max_position_embeddings: int = _f(4096, "RoPE context length.")
    rms_norm_eps: float = _f(1e-5, "RMSNorm epsilon.")
    attn_implementation: str = _f("sdpa", "transformers attention backend: sdpa | eager | flash_attention_2.")
    grad_checkpointing: bool = _f(False, "Activation checkpointing of every decoder layer.")
    pooling: str = _f("mean", "Text feature for contrastive learning: mean (over tokens) | last.")


@dataclass
class ModelConfig:
    """The MiCo model: omni-encoder, context, text branch, heads."""

    vision: VisionConfig = _f(None, "Omni-encoder ViT.")
    context: ContextConfig = _f(None, "Multimodal context.")
    text: TextConfig = _f(None, "Text branch.")
    embed_dim: int = _f(512, "Contrastive projection dimension.")
    kernels: str = _f("auto", "Fused kernels: auto (Triton on CUDA, PyTorch elsewhere) | triton | torch.")

    def __post_init__(self) -> None:
        self.vision = self.vision or VisionConfig()
        self.context = self.context or ContextConfig()
        self.text = self.text or TextConfig()
        if self.kernels not in ("auto", "triton", "torch"):
            raise ValueError(f"model.kernels must be auto|triton|torch, got {self.kernels!r}")


@dataclass
class ObjectiveConfig:
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


# ----------------------------------------------------------------------------- training


@dataclass
class OptimConfig:
    """AdamW and the learning-rate schedule."""

    lr: float = _f(1e-4, "Peak learning rate (paper: 1e-4).")
    weight_decay: float = _f(0.01, "Decoupled weight decay, applied to matrices (ndim >= 2) only.")
    betas: list[float] = _f([0.9, 0.98], "Adam betas.")
    eps: float = _f(1e-8, "Adam epsilon.")
    schedule: str = _f("linear", "warmup then linear decay (paper) | cosine | constant.")
    warmup_steps: int = _f(1000, "Linear warmup steps.")
    min_lr_ratio: float = _f(0.0, "Final learning rate as a fraction of the peak.")
    grad_clip: float = _f(1.0, "Global gradient-norm clip (0 disables).")
    grad_accum: int = _f(1, "Gradient accumulation steps per optimizer step.")
    vision_lr_scale: float = _f(1.0, "Learning-rate multiplier of the vision branch (0 freezes it).")
    text_lr_scale: float = _f(1.0, "Learning-rate multiplier of the text branch (0 freezes it).")


@dataclass
class TrainConfig:
    """The training loop."""

    max_steps: int = _f(1000, "Optimizer steps to train.")
    seed: int = _f(0, "Global seed (model init, data order, masking).")
    ds_config: str = _f("zero3_cpu.json", "DeepSpeed JSON in ds_configs/ (or a path): engine settings only.")
    precision: str = _f("auto", "auto (bf16 on CUDA with bf16 support, else fp32) | bf16 | fp32.")
    log_every: int = _f(10, "Steps between metric records.")
    save_every: int = _f(500, "Steps between checkpoints (0: only at the end).")
    eval_every: int = _f(0, "Steps between in-training evaluations (0: only at the end).")
    max_minutes: float = _f(
        0.0, "Wall-clock budget: save and exit cleanly after this many minutes (0: none)."
    )
    deterministic: bool = _f(False, "Deterministic algorithms (for golden-loss tests).")
    dist_timeout_s: float = _f(600.0, "Process-group timeout: a dead rank ends the job within this time.")
    progress: bool = _f(True, "Progress bar on rank 0.")
    record_keys: bool = _f(
        False, "Debug: write the sample keys of every micro-batch to RUN_DIR/keys/rank{R}.jsonl."
    )


@dataclass
class CheckpointConfig:
    """Checkpoint retention."""

    keep_last: int = _f(3, "Keep the newest K checkpoints.")
    keep_every: int = _f(0, "Also keep every checkpoint whose step is a multiple of M (0: none).")


EVAL_TASKS: tuple[str, ...] = ("retrieval", "captioning", "qa", "grounding")


@dataclass
class EvalConfig:
    """Evaluation on data.val_shards: in training (every train.eval_every steps and at the end) and by
    ``python -m mico_ds.eval`` (MiCo appendix B.3 protocol)."""

    tasks: list[str] = _f(
        ["retrieval", "captioning", "qa"],
        f"Evaluation tasks, a subset of {list(EVAL_TASKS)} (grounding: does the LLM read the context?).",
    )
    max_samples: int = _f(256, "Held-out items evaluated for retrieval (all of their captions).")
    batch_size: int = _f(32, "Per-rank evaluation batch size (items, texts, or reranked pairs).")
    rerank_k: int = _f(50, "Retrieval: top-k candidates reranked by the matching head (paper: 50; 0: off).")
    caption_samples: int = _f(64, "Captioning: held-out items captioned.")
    num_beams: int = _f(3, "Beam size for captioning and QA (paper: 3; 1 = greedy).")
    caption_max_tokens: int | None = _f(
        None, "Captioning: most generated tokens (EOS included); None: data.text_max_len - 1."
    )
    length_penalty: float = _f(1.0, "Beam score = sum log-prob / length**length_penalty.")
    qa_samples: int = _f(32, "QA: held-out items whose questions are answered (every question of each).")
    qa_max_tokens: int = _f(8, "QA: most generated answer tokens (EOS included).")
    use_cache: bool = _f(True, "Decode with the KV cache (False: recompute the whole sequence each step).")

    def __post_init__(self) -> None:
        bad = [t for t in self.tasks if t not in EVAL_TASKS]
        if bad:
            raise ValueError(f"eval.tasks has unknown {bad}; known: {list(EVAL_TASKS)}")
        sizes = {
            "max_samples": self.max_samples,
            "batch_size": self.batch_size,
            "caption_samples": self.caption_samples,
            "num_beams": self.num_beams,
            "qa_samples": self.qa_samples,
            "qa_max_tokens": self.qa_max_tokens,
        }
        if self.caption_max_tokens is not None:
            sizes["caption_max_tokens"] = self.caption_max_tokens
        small = {k: v for k, v in sizes.items() if v < 1}
        if small or self.rerank_k < 0:
            raise ValueError(
                f"eval sizes must be >= 1 (rerank_k >= 0): got {small or {'rerank_k': self.rerank_k}}"
            )


@dataclass
class RunConfig:
    """A whole run: one YAML recipe resolves to this."""

    name: str = _f("run", "Run name.")
    inputs: InputConfig = _f(None, "Input geometry.")
    data: DataConfig = _f(None, "Data.")
    model: ModelConfig = _f(None, "Model.")
    objectives: ObjectiveConfig = _f(None, "Objectives.")
    optim: OptimConfig = _f(None, "Optimizer.")
    train: TrainConfig = _f(None, "Training loop.")
    checkpoint: CheckpointConfig = _f(None, "Checkpoints.")
    eval: EvalConfig = _f(None, "Evaluation.")
    launch: dict[str, Any] = _f({}, "Launcher hints (e.g. nproc for the demo); not read by the trainer.")

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            if getattr(self, f.name) is None:
                setattr(self, f.name, _resolve_type(f.type)())
        for c in self.data.corpora:
            bad = [m for m in c.modalities if m not in MODALITIES]
            if bad:
                raise ValueError(f"data.corpora[{c.name}].modalities has unknown {bad}; known: {MODALITIES}")
        names = [c.name for c in self.data.corpora]
        for c in self.data.corpora:
            missing = [j for j in c.joined_from if j not in names]
            if missing:
                raise ValueError(f"data.corpora[{c.name}].joined_from names unknown corpora {missing}")


# ----------------------------------------------------------------------------- loading


def _resolve_type(tp: Any) -> Any:
    if isinstance(tp, str):
        tp = eval(tp, globals())  # annotations are strings under `from __future__ import annotations`
    return tp


def _build(tp: Any, value: Any, where: str) -> Any:
    """Construct ``tp`` from plain YAML data, strictly (unknown keys raise)."""
    tp = _resolve_type(tp)
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _build(args[0], value, where)
    if dataclasses.is_dataclass(tp):
        if value is None:
            return tp()
        if not isinstance(value, dict):
            raise ValueError(f"{where}: expected a mapping, got {value!r}")
        fields = {f.name: f for f in dataclasses.fields(tp)}
        unknown = sorted(set(value) - set(fields))
        if unknown:
            raise ValueError(
                f"{where}: unknown key(s) {unknown}; valid keys of {tp.__name__}: {sorted(fields)}"
            )
        kwargs = {k: _build(fields[k].type, v, f"{where}.{k}" if where else k) for k, v in value.items()}
        return tp(**kwargs)
    if origin is list:
        (inner,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ValueError(f"{where}: expected a list, got {value!r}")
        return [_build(inner, v, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ValueError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is float and not isinstance(value, bool):
        try:  # YAML 1.1 reads "3e-4" (no dot) as a string: the field's type decides
            return float(value)
        except (TypeError, ValueError):
            raise ValueError(f"{where}: expected a number, got {value!r}") from None
    if tp is Any:
        return value
    if tp in (int, str, bool) and not isinstance(value, tp):
        raise ValueError(f"{where}: expected {tp.__name__}, got {value!r}")
    return value


def to_dict(cfg: Any) -> Any:
    """Plain (YAML-serializable) form of a config."""
    return dataclasses.asdict(cfg)


def find_recipe(name_or_path: str) -> Path:
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") and p.exists():
        return p
    q = RECIPE_DIR / f"{name_or_path}.yaml"
    if q.exists():
        return q
    known = sorted(x.stem for x in RECIPE_DIR.glob("*.yaml"))
    raise ValueError(f"recipe {name_or_path!r} not found (not a file, not one of {known})")


def list_recipes() -> list[str]:
    return sorted(x.stem for x in RECIPE_DIR.glob("*.yaml"))


def _set_dotted(d: dict, dotted: str, value: Any) -> None:
    """Set ``a.b.c`` in nested dicts; an integer part indexes a list (``data.corpora.0.weight``)."""
    parts = dotted.split(".")
    cur: Any = d
    for i, p in enumerate(parts):
        last = i == len(parts) - 1
        if isinstance(cur, list):
            if not p.isdigit() or int(p) >= len(cur):
                raise ValueError(
                    f"override {dotted}: {'.'.join(parts[:i])} is a list of {len(cur)}, "
                    f"{p!r} is not an index into it"
                )
            if last:
                cur[int(p)] = value
                return
            cur = cur[int(p)]
            continue
        if last:
            cur[p] = value
            return
        if cur.get(p) is None:
            cur[p] = {}
        if not isinstance(cur[p], (dict, list)):
            raise ValueError(f"override {dotted}: {p} is not a section")
        cur = cur[p]


def parse_override(text: str) -> tuple[str, Any]:
    """``"optim.lr=3e-4"`` or ``"--optim.lr=3e-4"`` -> ("optim.lr", 3e-4) (value parsed as YAML)."""
    text = text[2:] if text.startswith("--") else text
    if "=" not in text:
        raise ValueError(f"override {text!r} must look like section.key=value")
    key, raw = text.split("=", 1)
    return key, (yaml.safe_load(raw) if raw != "" else "")


def parse_args_and_overrides(p: Any, argv: list[str]) -> tuple[Any, list[str]]:
    """``p.parse_known_args(argv)`` where everything left over must be a ``--section.key=value``
    override; anything else is an argparse error. ``p``: an ``argparse.ArgumentParser``."""
    args, rest = p.parse_known_args(argv)
    bad = [a for a in rest if not a.startswith("--") or "=" not in a]
    if bad:
        p.error(f"unrecognized arguments {bad}; config overrides look like --section.key=value")
    return args, rest


def load_config(recipe: str, overrides: list[str] | None = None) -> RunConfig:
    """Load a recipe (name or path), apply dotted overrides, validate strictly."""
    path = find_recipe(recipe)
    raw = yaml.safe_load(path.read_text()) or {}
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: a recipe must be a mapping of sections")
    for ov in overrides or []:
        k, v = parse_override(ov)
        _set_dotted(raw, k, v)
    try:
        return _build(RunConfig, raw, "")
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None


def config_from_dict(raw: dict) -> RunConfig:
    """Rebuild a RunConfig from its plain form (e.g. a run directory's config.yaml)."""
    return _build(RunConfig, raw, "")


def help_text(tp: Any = RunConfig, prefix: str = "") -> str:
    """Every configurable key with its type, default and help line."""
    lines = []
    tp = _resolve_type(tp)
    for f in dataclasses.fields(tp):
        ftp = _resolve_type(f.type)
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(ftp):
            lines.append(f"[{key}] {f.metadata.get('help', '')}")
            lines.append(help_text(ftp, key + "."))
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        lines.append(f"  --{key}={default!r}  ({getattr(ftp, '__name__', ftp)}) {f.metadata.get('help', '')}")
    return "\n".join(lines)
