"""The official MiCo release's ``model_step_*.pt`` into a :class:`~mico_ds.models.mico.MiCoModel`.

The release (github.com/invictus717/MiCo, the ViT-g/14 omni-modal checkpoint of its README) is a
plain ``torch.save(model.state_dict())`` of its ``MiCo`` module: an EVA-CLIP model under
``vision_encoder`` (its ``visual`` tower is MiCo's omni-encoder, shared by images, video frames,
depth and audio spectrograms), a BERT-base cross-attention decoder under ``multimodal_encoder`` (its
text and fusion branch), and the heads and embedding tables around them. :func:`mico_release_plan`
turns its key names and shapes (no tensor data) into plan rows of
:mod:`mico_ds.checkpoint.formats.reader`; ``mico_ds.distributed.init_load`` walks them (``--init``).

Names are first normalized as MiCo's own loader does: a ``module.`` prefix dropped, ``evaclip_model``
/ ``clip_model`` read as ``vision_encoder`` and ``video`` as ``vision`` (older checkpoints). Mapped:

=============================================================  ==========================================
release key                                                    mico_ds parameter
=============================================================  ==========================================
``vision_encoder.visual.patch_embed.proj.{weight,bias}``       ``encoder.tokenizers.{rgb,normal}.proj.*``
                                                               (copies); ``encoder.tokenizers.{depth,
                                                               audio}.proj.*`` (filters summed over RGB:
                                                               the response to x, x, x, which is how the
                                                               release reads a spectrogram; audio
                                                               resampled to its patch size)
``vision_encoder.visual.cls_token``                            ``encoder.cls_token``
``vision_encoder.visual.pos_embed``                            ``encoder.pos_embed`` (bicubic to our grid)
``vision_encoder.visual.blocks.N.*``                           ``encoder.blocks.N.*`` (same names)
                                                               (norm1, norm2, attn.qkv.weight, attn.proj,
                                                               mlp.fc1, mlp.fc2)
``vision_encoder.visual.blocks.N.attn.{q_bias,v_bias}``        ``encoder.blocks.N.attn.qkv.bias`` = [q, 0, v]
``vision_encoder.visual.norm.*``                               ``encoder.norm.*``
``contra_temp`` (tau of sim / tau)                             ``logit_scale.log_scale`` = -log(tau)
=============================================================  ==========================================

The vision rows are :func:`mico_ds.checkpoint.formats.timm.timm_plan`'s (the EVA-CLIP converter) on
the ``visual.*`` keys. Not mapped, and reported by name as unused (:data:`UNUSED_GROUPS` says why
for each group): the BERT branch ``multimodal_encoder.*`` (mico_ds's text branch is a Llama: another
architecture, width and vocabulary); ``contra_head_*`` (one bias-free linear layer each, or a linear
layer over concatenated features, against mico_ds's two-layer MLPs ``proj_z`` / ``proj_t`` on other
inputs); ``itm_head.*`` (reads the BERT's 768-wide [CLS] state, LayerNorm and two logits); the
``*_frame_embedding`` / ``*_type_embeddings`` tables and ``hidden_trans_*`` projections (they live
in the BERT's 768-wide cross-attention input, behind a projection from the ViT width, while the
context tables ``context.e_*`` live at the ViT width in front of the fusion blocks: 768 against
1408 for ViT-g, and another feature space where the widths agree); EVA-CLIP's unused image
projection ``visual.head``, text tower and ``logit_scale``. Every mico_ds parameter no row writes
(the context, ``text.*``, ``proj_*``, ``match_head``, ``prefix_proj``, ``text_sam``) keeps the
model's initialization and is listed as added.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

from mico_ds.checkpoint.formats.reader import OPS, Conversion, Shape, target_shapes
from mico_ds.checkpoint.formats.timm import ENCODER_PREFIX, timm_plan

VISION = "vision_encoder.visual."  # the EVA-CLIP vision tower, after MiCo's own renames
TEMPERATURE = "contra_temp"
LOGIT_SCALE = "logit_scale.log_scale"

# Why a release key is not read (first match on its normalized name); the docstring's "Not mapped".
UNUSED_GROUPS: tuple[tuple[str, str, str], ...] = (
    ("multimodal_encoder.*", r"multimodal_encoder\.",
     "the release's BERT-base cross-attention text branch: mico_ds's text branch is a Llama "
     "(model.text), with another architecture, width, vocabulary and position scheme"),
    ("vision_encoder.visual.head.*", r"vision_encoder\.visual\.head\.",
     "EVA-CLIP's image projection into its CLIP space: MiCo's forward never applies it "
     "(return_all_features) and the omni-encoder has no such layer"),
    ("vision_encoder.visual.* (other)", r"vision_encoder\.visual\.",
     "tensors of the EVA tower the omni-encoder recomputes or has no counterpart for (rotary "
     "tables, relative position indices, a k_bias buffer, pooling norms)"),
    ("vision_encoder.text.*", r"vision_encoder\.text\.",
     "EVA-CLIP's text tower, which MiCo deletes after loading; mico_ds's text branch is a Llama"),
    ("vision_encoder.logit_scale", r"vision_encoder\.logit_scale$",
     "EVA-CLIP's own temperature; MiCo trains contra_temp, which is mapped"),
    ("contra_head_*", r"contra_head_",
     "bias-free linear maps of one pooled feature (or of concatenated features) into the release's "
     "contrastive space; proj_z / proj_t are two-layer MLPs on the [CTX] output and on the Llama's "
     "pooled text: no layer of theirs computes the same function"),
    ("itm_head.*", r"itm_head\.",
     "the matching head reads the BERT's 768-wide [CLS] state (Linear, GELU, LayerNorm, two logits); "
     "match_head reads the Llama's hidden state (model.text.hidden_size) and gives one logit"),
    ("hidden_trans_*", r"hidden_trans_",
     "projections from the ViT width into the BERT's 768-wide cross-attention input; the mico_ds "
     "context fuses at the ViT width, and prefix_proj maps into the Llama's width"),
    ("*_frame_embedding, *_type_embeddings", r"(.*\.)?\w+_(frame_embedding|type_embeddings)$",
     "per-frame and per-modality tables of the BERT's 768-wide input space (added after "
     "hidden_trans_*); context.e_ctx / e_mod / e_pos live at the ViT width in front of the fusion "
     "blocks (1408 for ViT-g), another feature space even where the widths agree"),
    ("other", r"",
     "no module of MiCo's released model (model/mico.py) and no counterpart in mico_ds"),
)  # fmt: skip


def _neg_log(ts: list[torch.Tensor], shape: Shape) -> torch.Tensor:
    """MiCo divides similarities by a learned tau; mico_ds multiplies by exp(log_scale): -log(tau)."""
    tau = ts[0].float().reshape(shape)
    if not bool((tau > 0).all()):
        raise ValueError(f"{TEMPERATURE} = {tau.tolist()} is not a positive temperature")
    return -torch.log(tau)


# The reader's registry of plan operations: every rank imports this adapter before walking a plan.
OPS.setdefault("neg_log", _neg_log)


@dataclass
class ReleasePlan:
    """Rows to load, and what is left on each side."""

    rows: list[Conversion]
    added: list[str]  # model parameters no row writes: they keep the model's initialization
    unused: list[str]  # release keys no row reads (exact names, as in the file)
    reasons: dict[str, str] = field(default_factory=dict)  # UNUSED_GROUPS label -> why


def normalized_names(keys: Iterable[str]) -> dict[str, str]:
    """release key -> the name MiCo's loader gives it (``module.`` stripped, old names renamed)."""
    out = {}
    for k in keys:
        n = k[len("module.") :] if k.startswith("module.") else k
        n = n.replace("video", "vision").replace("evaclip_model", "vision_encoder")
        out[k] = n.replace("clip_model", "vision_encoder")
    return out


def is_mico_release(keys: Iterable[str]) -> bool:
    """Whether a state dict looks like the release's (an EVA-CLIP tower under ``vision_encoder.visual``)."""
    return any(n.startswith(VISION) for n in normalized_names(keys).values())


def _named_back(err: ValueError, sub_to_key: dict[str, str]) -> str:
    """timm_plan's message with each ``visual.*`` name it quotes replaced by the release's own key."""
    return re.sub(r"(?<![\w.])visual\.[\w.]+", lambda m: sub_to_key.get(m.group(0), m.group(0)), str(err))


def _vision_rows(
    source_shapes: dict[str, Shape], names: dict[str, str], encoder: nn.Module, where: str
) -> list[Conversion]:
    """timm_plan's EVA rows for the ``visual.*`` keys, renamed to the release's keys and ``encoder.*``."""
    sub_to_key = {names[k][len("vision_encoder.") :]: k for k in names if names[k].startswith(VISION)}
    if "visual.conv1.weight" in sub_to_key:
        raise ValueError(
            f"{where}: the release's vision tower has OpenAI CLIP's layout (visual.conv1, "
            "visual.transformer.resblocks); only the EVA-CLIP towers (visual.patch_embed, visual.blocks) "
            "are converted"
        )
    sub_shapes = {s: tuple(source_shapes[k]) for s, k in sub_to_key.items()}
    try:
        plan = timm_plan(sub_shapes, encoder, where)  # type: ignore[arg-type]
    except ValueError as e:
        raise ValueError(_named_back(e, sub_to_key)) from None
    return [
        Conversion(ENCODER_PREFIX + c.target, tuple(sub_to_key[s] for s in c.sources), c.op, c.args)
        for c in plan
    ]


def mico_release_plan(source_shapes: dict[str, Shape], model: nn.Module, where: str) -> ReleasePlan:
    """The plan from the release's key names and shapes into ``model`` (a MiCoModel, possibly ZeRO-3
    partitioned: full shapes are read from ``ds_shape``).

    Raises:
        ValueError: naming ``where``, each release key whose shape does not fit and both shapes.
    """
    names = normalized_names(source_shapes)
    want = target_shapes(model)
    rows = _vision_rows(source_shapes, names, model.encoder, where)
    temp = [k for k, n in names.items() if n == TEMPERATURE]
    if temp and LOGIT_SCALE in want:
        got, shape = tuple(source_shapes[temp[0]]), want[LOGIT_SCALE]
        if math.prod(got) != 1 or math.prod(shape) != 1:
            raise ValueError(
                f"{where}: {temp[0]} {got} does not fit {LOGIT_SCALE} {shape}: one temperature each"
            )
        rows.append(Conversion(LOGIT_SCALE, (temp[0],), "neg_log"))
    read = {s for c in rows for s in c.sources}
    written = {c.target for c in rows}
    unused = [k for k in source_shapes if k not in read]
    reasons: dict[str, str] = {}
    for k in unused:
        label, _, why = next(g for g in UNUSED_GROUPS if re.match(g[1], names[k]))
        reasons.setdefault(label, why)
    return ReleasePlan(rows, [n for n in want if n not in written], unused, reasons)
