"""timm / EVA ViT checkpoints in and out of the omni-encoder (``MiCoModel.encoder``).

In: :func:`timm_plan` converts a timm ``VisionTransformer`` or (EVA-)CLIP vision tower into the
encoder's parameters (a plan of :mod:`mico_ds.checkpoint.formats.reader`; under ZeRO-3 it is walked by
``mico_ds.distributed.zero_load``). Out: :func:`export_vision` writes the encoder as a timm model
directory (``timm.create_model("local-dir:DIR", pretrained=True)``).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from mico_ds.checkpoint.formats.reader import (
    CheckpointReader,
    Conversion,
    DictReader,
    check_plan,
    load_plan_into,
    materialize,
    target_shapes,
)
from mico_ds.checkpoint.formats.safetensors import Renamed, TensorLike, owning, save_state_dict
from mico_ds.config import InputConfig, ModelConfig, VisionConfig
from mico_ds.models.omni_encoder import OmniEncoder

log = logging.getLogger("mico_ds")

ENCODER_PREFIX = "encoder."  # MiCoModel.encoder: the omni-encoder ViT (vision branch)
TIMM_ARCH = "vit_base_patch16_224"  # any timm ViT entry point: every size argument is overridden


# Checkpoint keys with no counterpart here: classifier heads, timm Eva's all-zero k_bias buffer,
# rotary tables (EVA-02; a checkpoint that needs them fails on its rope-specific weights instead).
_TIMM_IGNORED = ("head.", "head_drop.", "fc_norm.", "pre_logits.", "attn_pool.")
_TIMM_IGNORED_SUFFIX = (".attn.k_bias", "rope.freqs", ".rope.freqs", "relative_position_index")


def _timm_keys(keys: list[str]) -> dict[str, str]:
    """checkpoint key -> timm-layout key: keep only an (EVA-)CLIP checkpoint's vision tower
    (``visual.``), strip wrapper prefixes (``module.``, ``encoder.``)."""
    if any(k.startswith("visual.") for k in keys):
        keys = [k for k in keys if k.startswith("visual.")]
    out = {}
    for k in keys:
        name = k
        for pre in ("visual.", "module.", "encoder."):
            if name.startswith(pre):
                name = name[len(pre) :]
        out[k] = name
    return out


def timm_plan(
    source_shapes: dict[str, tuple[int, ...]], encoder: OmniEncoder, where: str = "checkpoint"
) -> list[Conversion]:
    """Conversion plan (:mod:`~mico_ds.checkpoint.formats.reader`) from a timm ViT / EVA checkpoint.

    * ``patch_embed.proj`` starts all four tokenizers: RGB and normal copy it; the 1-channel depth and
      audio tokenizers get the RGB filters SUMMED over channels (exactly the response of the RGB
      filters to a grey image x, x, x; timm's ``adapt_input_conv``, AST), resampled to the audio patch
      size when it differs (FlexiViT pseudo-inverse resize).
    * ``pos_embed`` is resampled (bicubic, timm) from the checkpoint's square grid to ours.
    * EVA-style attention biases (``q_bias``, ``v_bias``, no k bias) become ``qkv.bias`` = [q, 0, v].
    * ``norm_pre`` (CLIP's ln_pre; timm's ``vit_*_clip_*`` checkpoints) needs ``model.vision.pre_norm``;
      CLIP's bias-free patch embedding gives zero tokenizer biases.
    * An (EVA-)CLIP checkpoint's text tower is skipped (only ``visual.*`` is read); classifier heads
      are dropped; ``fc_norm`` stands in for a missing final ``norm`` (mean-pooling checkpoints).

    Raises:
        ValueError: naming ``where`` and every key or shape that does not fit ``encoder``.
    """
    names = _timm_keys(list(source_shapes))
    by_name = {v: k for k, v in names.items()}
    plan: list[Conversion] = []
    used: set[str] = set()

    def add(target: str, sources: tuple[str, ...], op: str = "copy", **args: object) -> None:
        plan.append(Conversion(target, tuple(by_name[s] for s in sources), op, dict(args)))
        used.update(sources)

    has_norm = "norm.weight" in by_name
    if "norm_pre.weight" in by_name and encoder.norm_pre is None:
        raise ValueError(
            f"{where}: the checkpoint normalizes tokens before the blocks (norm_pre, CLIP's ln_pre): "
            f"set model.vision.pre_norm=true"
        )
    for name in names.values():
        if name in used:
            continue
        if name.startswith("patch_embed.proj."):
            leaf = name[len("patch_embed.proj.") :]
            for tok in ("rgb", "normal"):
                add(f"tokenizers.{tok}.proj.{leaf}", (name,))
            for tok in ("depth", "audio"):
                add(f"tokenizers.{tok}.proj.{leaf}", (name,), "sum_in_chans" if leaf == "weight" else "copy")
            if leaf == "weight" and "patch_embed.proj.bias" not in by_name:  # CLIP: no bias
                for tok in ("rgb", "normal", "depth", "audio"):
                    add(f"tokenizers.{tok}.proj.bias", (name,), "zero_bias")
        elif name == "pos_embed":
            add("pos_embed", (name,), "pos_embed", new_grid=list(encoder.grid), prefix=1)
        elif name.endswith(".attn.q_bias"):
            base = name[: -len("q_bias")]
            add(f"{base}qkv.bias", (name, f"{base}v_bias"), "qkv_bias")
        elif name.startswith("fc_norm.") and not has_norm:
            add("norm." + name[len("fc_norm.") :], (name,))
        elif name.startswith(_TIMM_IGNORED) or name.endswith(_TIMM_IGNORED_SUFFIX):
            used.add(name)
        elif not name.endswith(".attn.v_bias"):
            add(name, (name,))
    if not has_norm and any(n.startswith("fc_norm.") for n in names.values()):
        log.warning("%s: no final norm; fc_norm (mean-pooling checkpoint) becomes the encoder's norm", where)
    check_plan(plan, source_shapes, target_shapes(encoder), where)
    return plan


def timm_to_encoder_state_dict(sd: dict[str, torch.Tensor], encoder: OmniEncoder) -> dict[str, torch.Tensor]:
    """A timm / EVA ViT state dict converted to ours in memory (see :func:`timm_plan`)."""
    reader = DictReader(sd)
    shapes = target_shapes(encoder)
    plan = timm_plan(reader.shapes(), encoder, "state dict")
    return {c.target: materialize(c, reader, shapes[c.target]) for c in plan}


def load_timm_checkpoint(encoder: OmniEncoder, path: str | Path) -> None:
    """Load a local timm / EVA ViT checkpoint (.safetensors / .pth / .bin) into a plain ``encoder``.

    Tensors are read and converted one at a time (:func:`timm_plan`). Under ZeRO-3 the trainer loads
    through ``mico_ds.distributed.zero_load`` instead, one gathered parameter at a time.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"model.vision.pretrained={str(path)!r} is not a file")
    reader = CheckpointReader(path)
    try:
        load_plan_into(encoder, timm_plan(reader.shapes(), encoder, str(path)), reader)
    finally:
        reader.close()


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
    tensors: Mapping[str, TensorLike],
    model: ModelConfig,
    inputs: InputConfig,
    out_dir: str | Path,
    max_shard_size: int | None = None,
) -> Path:
    """Write the omni-encoder as a timm model directory (see the module docstring); returns it."""
    import timm
    from timm.models._hub import save_config_for_hf

    out = Path(out_dir)
    enc = {k[len(ENCODER_PREFIX) :]: k for k in tensors if k.startswith(ENCODER_PREFIX)}
    if not enc:
        raise ValueError(f"no {ENCODER_PREFIX}* tensors in the state dict: not a MiCoModel checkpoint?")
    timm_map, extra = encoder_to_timm_names(list(enc))
    args = timm_vit_args(model.vision, inputs)
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
        "input_size": (3, inputs.image_size, inputs.image_size),
        "mean": tuple(inputs.image_mean),
        "std": tuple(inputs.image_std),
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

        side = {k: owning(tensors[enc[v]].contiguous()) for k, v in extra.items()}
        save_file(side, str(out / "omni_tokenizers.safetensors"), metadata={"format": "pt"})
    return out
