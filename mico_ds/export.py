"""Turn a consolidated MiCoModel state dict into files other code loads: sharded safetensors, timm, HF.

Everything here works on a *mapping of tensor-likes*: objects with ``shape``, ``dtype`` and
``contiguous()`` (a ``torch.Tensor``, or DeepSpeed's lazy ``GatheredTensor`` that gathers one
parameter from the ZeRO-3 partitions when asked). Writers materialize one output shard at a time and
drop it before the next, so peak memory is about one shard, not the model. This module does not
import DeepSpeed; reading ZeRO checkpoints is ``mico_ds.train.convert``.

    save_state_dict(tensors, "out/", max_shard_size=parse_size("5GB"))   # model*.safetensors (+ index)
    export_branches(tensors, cfg, "out/branches", tokenizer)             # out/branches/{vision,text}

Outputs of :func:`export_branches`:

    vision/   timm: config.json (timm's Hugging Face format) + model.safetensors, a
              ``timm.models.vision_transformer.VisionTransformer`` state dict
              (``timm.create_model("local-dir:vision", pretrained=True)``), and
              omni_tokenizers.safetensors: the depth / normal / audio patch embeddings timm has no slot for
    text/     Hugging Face: config.json, generation_config.json, model*.safetensors, tokenizer files
              (``LlamaForCausalLM.from_pretrained("text")``, ``AutoTokenizer.from_pretrained("text")``)
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol

import torch

from mico_ds.config import InputConfig, RunConfig, VisionConfig

log = logging.getLogger(__name__)

ENCODER_PREFIX = "encoder."  # MiCoModel.encoder: the omni-encoder ViT (vision branch)
TEXT_PREFIX = "text.llm."  # MiCoModel.text.llm: the LlamaForCausalLM (text branch)
TIMM_ARCH = "vit_base_patch16_224"  # any timm ViT entry point: every size argument is overridden
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?)B?\s*$", re.IGNORECASE)


class TensorLike(Protocol):
    """A tensor or a lazy stand-in that becomes one on ``contiguous()``."""

    shape: torch.Size
    dtype: torch.dtype

    def contiguous(self) -> torch.Tensor: ...


def parse_size(text: str | int) -> int:
    """``"5GB"`` -> 5_000_000_000, ``"500MiB"`` -> 524_288_000, ``123`` -> 123 (bytes).

    Decimal units as Hugging Face's ``max_shard_size``; ``KiB``/``MiB``/``GiB`` are binary.
    """
    if isinstance(text, int):
        return text
    m = _SIZE_RE.match(text)
    if not m:
        raise ValueError(f"not a size: {text!r} (use e.g. 5GB, 500MB, 2GiB or a number of bytes)")
    value, unit, binary = float(m.group(1)), m.group(2).upper(), bool(m.group(3))
    power = "KMGT".find(unit) + 1 if unit else 0
    return int(value * (1024 if binary else 1000) ** power)


def nbytes(t: TensorLike, dtype: torch.dtype | None = None) -> int:
    dt = dtype if dtype is not None and t.dtype.is_floating_point else t.dtype
    return int(torch.Size(t.shape).numel()) * torch.empty((), dtype=dt).element_size()


def plan_shards(sizes: Mapping[str, int], max_bytes: int | None) -> list[list[str]]:
    """Group names, in order, into shards of at most ``max_bytes`` (a bigger tensor gets its own shard),
    the greedy rule of ``huggingface_hub.split_torch_state_dict_into_shards``."""
    if max_bytes is None:
        return [list(sizes)]
    if max_bytes <= 0:
        raise ValueError(f"max shard size must be > 0 bytes, got {max_bytes}")
    shards: list[list[str]] = []
    cur: list[str] = []
    used = 0
    for name, n in sizes.items():
        if cur and used + n > max_bytes:
            shards.append(cur)
            cur, used = [], 0
        cur.append(name)
        used += n
    if cur or not shards:
        shards.append(cur)
    return shards


def _file_names(n: int, safe: bool) -> tuple[list[str], str]:
    base, ext = ("model", "safetensors") if safe else ("pytorch_model", "bin")
    if n == 1:
        return [f"{base}.{ext}"], f"{base}.{ext}.index.json"
    return [f"{base}-{i:05d}-of-{n:05d}.{ext}" for i in range(1, n + 1)], f"{base}.{ext}.index.json"


def _owning(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself when it owns exactly its storage, else a copy: a view into a bigger buffer (a flat
    ZeRO partition) would make ``torch.save`` write the whole buffer and safetensors refuse it."""
    if t.storage_offset() == 0 and t.untyped_storage().nbytes() == t.numel() * t.element_size():
        return t
    return t.clone()


def save_state_dict(
    tensors: Mapping[str, TensorLike],
    out_dir: str | Path,
    *,
    max_shard_size: int | None = None,
    safe: bool = True,
    dtype: torch.dtype | None = None,
    progress: Callable[[int, int, str], None] | None = None,
) -> list[Path]:
    """Write ``tensors`` as Hugging Face-style weight files, one shard in memory at a time.

    Args:
        tensors: name -> tensor-like, written in this order.
        out_dir: created if missing; existing weight files of the same names are replaced.
        max_shard_size: bytes per file; above it ``model-0000i-of-0000n.safetensors`` files and a
            ``model.safetensors.index.json`` (``pytorch_model*.bin`` with ``safe=False``). None: one file.
        safe: safetensors (True) or ``torch.save`` pickles (False).
        dtype: cast floating-point tensors (integer buffers keep theirs); None keeps each dtype.
        progress: called as ``progress(shard_index, num_shards, file_name)`` after each file.

    Returns:
        The files written (the index last, when there is one).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sizes = {k: nbytes(t, dtype) for k, t in tensors.items()}
    groups = plan_shards(sizes, max_shard_size)
    names, index_name = _file_names(len(groups), safe)
    written: list[Path] = []
    for i, (fname, keys) in enumerate(zip(names, groups)):
        shard: dict[str, torch.Tensor] = {}
        for k in keys:
            t = tensors[k].contiguous()
            if dtype is not None and t.is_floating_point():
                t = t.to(dtype)
            shard[k] = _owning(t)
        tmp = out / f".{fname}.tmp{os.getpid()}"
        if safe:
            from safetensors.torch import save_file

            save_file(shard, str(tmp), metadata={"format": "pt"})
        else:
            torch.save(shard, tmp)
        os.replace(tmp, out / fname)
        written.append(out / fname)
        del shard  # this shard's tensors are freed before the next is gathered
        if progress is not None:
            progress(i + 1, len(groups), fname)
    if len(groups) > 1:
        index = {
            "metadata": {"total_size": sum(sizes.values())},
            "weight_map": {k: fname for fname, keys in zip(names, groups) for k in keys},
        }
        (out / index_name).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        written.append(out / index_name)
    return written


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read what :func:`save_state_dict` wrote: a directory (index or single file) or one file."""
    p = Path(path)
    if p.is_dir():
        for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
            if (p / index).is_file():
                files = sorted(set(json.loads((p / index).read_text())["weight_map"].values()))
                break
        else:
            files = [f for f in ("model.safetensors", "pytorch_model.bin") if (p / f).is_file()][:1]
            if not files:
                raise ValueError(f"{p}: no model.safetensors, pytorch_model.bin or index file")
        out: dict[str, torch.Tensor] = {}
        for f in files:
            out.update(load_state_dict(p / f))
        return out
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(p))
    return torch.load(p, map_location="cpu", weights_only=True)


class Renamed(Mapping):
    """A read-only view of ``source`` under new names (``mapping``: new name -> source name)."""

    def __init__(self, source: Mapping[str, TensorLike], mapping: Mapping[str, str]) -> None:
        self.source, self.mapping = source, dict(mapping)

    def __getitem__(self, key: str) -> TensorLike:
        return self.source[self.mapping[key]]

    def __iter__(self):
        return iter(self.mapping)

    def __len__(self) -> int:
        return len(self.mapping)


# ----------------------------------------------------------------------------- vision branch (timm)


def encoder_to_timm_names(encoder_keys: list[str]) -> tuple[dict[str, str], dict[str, str]]:
    """Inverse of ``timm_to_encoder_state_dict``: our encoder keys -> timm ``VisionTransformer`` keys.

    The RGB tokenizer becomes ``patch_embed``; CLS, position table, blocks and final norm keep their
    names. The other tokenizers (depth, normal, audio) have no place in a timm ViT: they are returned
    separately (second mapping, names unchanged).

    Returns:
        (timm name -> encoder name, extra name -> encoder name).
    """
    timm_map: dict[str, str] = {}
    extra: dict[str, str] = {}
    for k in encoder_keys:
        if k.startswith("tokenizers.rgb.proj."):
            timm_map["patch_embed.proj." + k[len("tokenizers.rgb.proj.") :]] = k
        elif k.startswith("tokenizers."):
            extra[k] = k
        else:
            timm_map[k] = k
    return timm_map, extra


def timm_vit_args(vision: VisionConfig, inputs: InputConfig) -> dict[str, Any]:
    """Keyword arguments of a timm ``VisionTransformer`` with our encoder's architecture (no head).

    timm sizes the MLP as ``int(width * mlp_ratio)``; when ``mlp_dim / width`` does not survive that
    round trip in floating point (ViT-g/14: 6144 / 1408) half a unit is added so it does.
    """
    ratio = vision.mlp_dim / vision.width
    if int(vision.width * ratio) != vision.mlp_dim:
        ratio = (vision.mlp_dim + 0.5) / vision.width
    return {
        "img_size": inputs.image_size,
        "patch_size": vision.patch_size,
        "in_chans": 3,
        "embed_dim": vision.width,
        "depth": vision.depth,
        "num_heads": vision.heads,
        "mlp_ratio": ratio,
        "qkv_bias": vision.qkv_bias,
        "class_token": True,
        "global_pool": "token",
        "num_classes": 0,
    }


def export_vision(
    tensors: Mapping[str, TensorLike], cfg: RunConfig, out_dir: str | Path, max_shard_size: int | None = None
) -> Path:
    """Write the omni-encoder as a timm model directory (see the module docstring); returns it."""
    import timm
    from timm.models._hub import save_config_for_hf

    out = Path(out_dir)
    enc = {k[len(ENCODER_PREFIX) :]: k for k in tensors if k.startswith(ENCODER_PREFIX)}
    if not enc:
        raise ValueError(f"no {ENCODER_PREFIX}* tensors in the state dict: not a MiCoModel checkpoint?")
    timm_map, extra = encoder_to_timm_names(list(enc))
    args = timm_vit_args(cfg.model.vision, cfg.inputs)
    with torch.device("meta"):  # only the architecture: checks names and shapes, allocates nothing
        ref = timm.create_model(TIMM_ARCH, pretrained=False, **args)
    want = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    have = {k: tuple(tensors[enc[v]].shape) for k, v in timm_map.items()}
    if want != have:
        missing, unexpected = sorted(set(want) - set(have)), sorted(set(have) - set(want))
        wrong = sorted(k for k in set(want) & set(have) if want[k] != have[k])
        raise ValueError(
            f"encoder tensors do not fit timm VisionTransformer({args}): missing {missing[:6]}, "
            f"unexpected {unexpected[:6]}, shape mismatch {[(k, have[k], want[k]) for k in wrong[:6]]}"
        )
    out.mkdir(parents=True, exist_ok=True)
    data_config = {
        "input_size": (3, cfg.inputs.image_size, cfg.inputs.image_size),
        "mean": tuple(cfg.inputs.image_mean),
        "std": tuple(cfg.inputs.image_std),
        "interpolation": "bicubic",  # mico_ds' eval transform: shorter side to S (bicubic), center crop
        "crop_pct": 1.0,
        "crop_mode": "center",
    }
    save_config_for_hf(ref, str(out / "config.json"), model_args=args, data_config=data_config)
    conf = json.loads((out / "config.json").read_text())
    conf["pretrained_cfg"]["tag"] = "mico_ds"
    conf["pretrained_cfg"].pop("license", None)  # the entry point's, not ours
    conf["mico_ds"] = {"source": "MiCoModel.encoder", "extra_tokenizers": "omni_tokenizers.safetensors"}
    (out / "config.json").write_text(json.dumps(conf, indent=2) + "\n")
    src = Renamed({k: tensors[v] for k, v in enc.items()}, timm_map)
    save_state_dict(src, out, max_shard_size=max_shard_size)
    if extra:  # small: the patch embeddings of the depth, normal and audio tokenizers
        from safetensors.torch import save_file

        side = {k: _owning(tensors[enc[v]].contiguous()) for k, v in extra.items()}
        save_file(side, str(out / "omni_tokenizers.safetensors"), metadata={"format": "pt"})
    return out


# ----------------------------------------------------------------------------- text branch (HF)


def text_llama_config(tensors: Mapping[str, TensorLike], cfg: RunConfig, special: Any):
    """The ``LlamaConfig`` of the trained text branch, checked against the tensors' shapes."""
    from transformers import LlamaConfig

    from mico_ds.models.text_branch import llama_config

    t = cfg.model.text
    if t.pretrained and (Path(t.pretrained) / "config.json").is_file():
        conf = LlamaConfig.from_pretrained(t.pretrained, local_files_only=True)
        conf.vocab_size = special.vocab_size  # the tokenizer's added <pad>/<mask> rows
        conf.pad_token_id = special.pad_id
    else:
        conf = llama_config(t, special)
    conf.use_cache = True  # the exported model is for inference / generation
    conf.architectures = ["LlamaForCausalLM"]
    emb = tensors.get(TEXT_PREFIX + "model.embed_tokens.weight")
    layer_re = re.compile(re.escape(TEXT_PREFIX) + r"model\.layers\.(\d+)\.")
    layers = {int(m.group(1)) for k in tensors if (m := layer_re.match(k))}
    got = (tuple(emb.shape) if emb is not None else None, len(layers))
    want = ((conf.vocab_size, conf.hidden_size), conf.num_hidden_layers)
    if got != want:
        raise ValueError(
            f"text branch tensors (embed_tokens {got[0]}, {got[1]} layers) do not match the config "
            f"(vocab_size x hidden_size {want[0]}, num_hidden_layers {want[1]}): wrong config or tokenizer"
        )
    return conf


def export_text(
    tensors: Mapping[str, TensorLike],
    cfg: RunConfig,
    out_dir: str | Path,
    tokenizer: Any,
    max_shard_size: int | None = None,
) -> Path:
    """Write the Llama text branch as a Hugging Face directory (weights, config, tokenizer); returns it.

    Args:
        tokenizer: a ``mico_ds.data.tokenizer.Tokenizer`` (its special ids and vocabulary are the model's).
    """
    from transformers import GenerationConfig

    out = Path(out_dir)
    names = {k[len(TEXT_PREFIX) :]: k for k in tensors if k.startswith(TEXT_PREFIX)}
    if not names:
        raise ValueError(f"no {TEXT_PREFIX}* tensors in the state dict: not a MiCoModel checkpoint?")
    conf = text_llama_config(tensors, cfg, tokenizer.special)
    # check names against transformers' own module (on the meta device: nothing allocated)
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        ref = LlamaForCausalLM(conf)
    want = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    have = {k: tuple(tensors[v].shape) for k, v in names.items()}
    if want != have:
        raise ValueError(
            f"text branch does not fit LlamaForCausalLM: missing {sorted(set(want) - set(have))[:6]}, "
            f"unexpected {sorted(set(have) - set(want))[:6]}, shape mismatch "
            f"{[(k, have[k], want[k]) for k in sorted(set(want) & set(have)) if want[k] != have[k]][:6]}"
        )
    out.mkdir(parents=True, exist_ok=True)
    conf.save_pretrained(str(out))
    s = tokenizer.special
    GenerationConfig(bos_token_id=s.bos_id, eos_token_id=s.eos_id, pad_token_id=s.pad_id).save_pretrained(
        str(out)
    )
    save_state_dict(Renamed(tensors, names), out, max_shard_size=max_shard_size)
    tokenizer.save_pretrained(out)
    return out


def export_branches(
    tensors: Mapping[str, TensorLike],
    cfg: RunConfig,
    out_dir: str | Path,
    tokenizer: Any,
    max_shard_size: int | None = None,
) -> dict[str, Path]:
    """Both branches: ``out_dir/vision`` (timm) and ``out_dir/text`` (Hugging Face)."""
    out = Path(out_dir)
    return {
        "vision": export_vision(tensors, cfg, out / "vision", max_shard_size),
        "text": export_text(tensors, cfg, out / "text", tokenizer, max_shard_size),
    }
