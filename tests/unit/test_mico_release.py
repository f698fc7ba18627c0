"""The official MiCo release's ``model_step_*.pt`` through ``--init`` (``formats.mico_release``).

The checkpoint here has the release's key names at reduced sizes: the vision tower is a real timm
``Eva`` (EVA-CLIP's layout: qkv.weight + q_bias / v_bias, a CLIP head) under
``vision_encoder.visual.``, the text branch a real Hugging Face ``BertForMaskedLM`` with
cross-attention under ``multimodal_encoder.``, and the heads and tables have the shapes MiCo's
``model/mico.py`` gives them (``MiCo.__init__``).
"""

from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path

import pytest
import torch
from timm.models.eva import Eva
from transformers import BertConfig, BertForMaskedLM

from mico_ds.checkpoint.formats.mico_release import is_mico_release, mico_release_plan
from mico_ds.checkpoint.formats.reader import CheckpointReader, load_plan_into
from mico_ds.config import VisionConfig
from mico_ds.distributed.init_load import init_from
from mico_ds.models.mico import MiCoModel
from tests.helpers.tiny import make_tiny_config, make_tiny_special

IMG, P, V = 42, 14, 32  # a 3x3 grid of 14-pixel patches; ViT width V
M, C, TAU = 16, 12, 0.05  # the release's BERT width, contrastive width, learned temperature


def _model() -> MiCoModel:
    cfg = make_tiny_config(
        vision=VisionConfig(patch_size=P, audio_patch_size=8, width=V, depth=2, heads=2, mlp_dim=64)
    )
    cfg.inputs = dataclasses.replace(cfg.inputs, image_size=IMG)
    torch.manual_seed(0)
    return MiCoModel.from_run_config(cfg, make_tiny_special()).eval()


def _eva() -> Eva:
    """EVA-CLIP's vision tower at width V, with its CLIP head (num_classes = the CLIP width)."""
    torch.manual_seed(1)
    eva = Eva(img_size=IMG, patch_size=P, embed_dim=V, depth=2, num_heads=2, mlp_ratio=2.0,
              qkv_fused=True, global_pool="token", num_classes=24)  # fmt: skip
    with torch.no_grad():  # timm zero-initializes biases: make every tensor matter
        for prm in eva.parameters():
            prm.add_(0.05 * torch.randn_like(prm))
    return eva.eval()


def _bert_sd() -> dict[str, torch.Tensor]:
    cfg = BertConfig(
        hidden_size=M, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, vocab_size=40,
        max_position_embeddings=24, is_decoder=True, add_cross_attention=True,
    )  # fmt: skip
    sd = BertForMaskedLM(cfg).state_dict()
    sd["bert.embeddings.position_ids"] = torch.arange(24)[None]  # a persistent buffer in MiCo's bert.py
    return sd


# MiCo.__init__ (model/mico.py): heads and tables around the two branches, and their shapes.
HEADS: dict[str, tuple[int, ...]] = {
    **{f"contra_head_{m}.linear.weight": (C, M) for m in "ts"},
    **{f"contra_head_{m}.linear.weight": (C, V) for m in "vad"},
    "contra_head_va.weight": (C, 2 * V), "contra_head_va.bias": (C,),
    "contra_head_id.weight": (C, 2 * V), "contra_head_id.bias": (C,),
    "contra_head_vs.weight": (C, V + M), "contra_head_vs.bias": (C,),
    "contra_head_vas.weight": (C, 2 * V + M), "contra_head_vas.bias": (C,),
    "itm_head.linear1.weight": (M, M), "itm_head.linear1.bias": (M,),
    "itm_head.layernorm.weight": (M,), "itm_head.layernorm.bias": (M,),
    "itm_head.linear2.weight": (2, M), "itm_head.linear2.bias": (2,),
    "vision_frame_embedding": (1, 8, M), "audio_frame_embedding": (1, 4, M),
    "depth_frame_embedding": (1, 1, M),
    **{f"hidden_trans_{m}_multimodal.0.weight": (M, V) for m in ("vision", "audio", "depth")},
    "hidden_trans_subtitle_multimodal.0.weight": (M, M),
    **{f"hidden_trans_{m}_multimodal.{i}.bias": (M,) for m in ("vision", "audio", "depth", "subtitle")
       for i in (0, 1)},
    **{f"hidden_trans_{m}_multimodal.1.weight": (M,) for m in ("vision", "audio", "depth", "subtitle")},
    **{f"{m}_type_embeddings": (1, 1, M) for m in ("vision", "audio", "depth", "subtitle")},
}  # fmt: skip


def _release(eva: Eva) -> dict[str, torch.Tensor]:
    """A release state dict: EVA-CLIP (vision tower + its logit_scale), the BERT branch, the heads."""
    g = torch.Generator().manual_seed(2)
    sd = {f"vision_encoder.visual.{k}": v for k, v in eva.state_dict().items() if not k.endswith("k_bias")}
    sd["vision_encoder.logit_scale"] = torch.tensor(math.log(1 / 0.07))
    sd |= {f"multimodal_encoder.{k}": v for k, v in _bert_sd().items()}
    sd |= {k: 0.02 * torch.randn(s, generator=g) for k, s in HEADS.items()}
    sd["contra_temp"] = torch.tensor(TAU)
    return sd


def _save(sd: dict, path: Path) -> str:
    torch.save(sd, path)
    return str(path)


def test_release_plan_gives_timm_eva_features_and_names_what_is_unused(tmp_path: Path) -> None:
    eva = _eva()
    sd = _release(eva)
    reader = CheckpointReader(_save(sd, tmp_path / "model_step_300000.pt"))
    assert is_mico_release(reader.keys())
    model = _model()
    plan = mico_release_plan(reader.shapes(), model, "release")
    load_plan_into(model, plan.rows, reader)
    x, d = torch.randn(2, 3, IMG, IMG), torch.randn(2, 1, IMG, IMG)
    tol = {"atol": 1e-5, "rtol": 1e-5}
    with torch.no_grad():
        torch.testing.assert_close(model.encoder(x, "image", pool=False), eva.forward_features(x), **tol)
        # a 1-channel map through the summed filters = the RGB tower on (x, x, x), as MiCo reads spectrograms
        grey = eva.forward_features(d.expand(-1, 3, -1, -1))
        torch.testing.assert_close(model.encoder(d, "depth", pool=False), grey, **tol)
    assert model.logit_scale.log_scale.item() == pytest.approx(-math.log(TAU))

    read = {s for c in plan.rows for s in c.sources}
    assert set(plan.unused) == set(sd) - read and not set(plan.unused) & read
    assert {k for k in sd if k.startswith("multimodal_encoder.")} <= set(plan.unused)
    assert {k for k in HEADS} <= set(plan.unused)
    assert {"vision_encoder.visual.head.weight", "vision_encoder.logit_scale"} <= set(plan.unused)
    assert "multimodal_encoder.*" in plan.reasons and "contra_head_*" in plan.reasons
    assert "other" not in plan.reasons  # every release key has a known reason
    targets = {c.target for c in plan.rows}
    assert {n for n, _ in model.named_parameters() if n.startswith("encoder.")} <= targets
    assert set(plan.added) == {n for n, _ in model.named_parameters()} - targets
    assert {"context.e_ctx", "match_head.net.0.weight", "proj_z.net.0.weight"} <= set(plan.added)
    assert any(a.startswith("text.") for a in plan.added)


def _wrapped(sd: dict[str, torch.Tensor]) -> dict:
    """A training script's {"model": ...} with DistributedDataParallel's ``module.`` prefix."""
    return {"model": {f"module.{k}": v for k, v in sd.items()}}


def _old_names(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The names MiCo's loader renames: evaclip_model -> vision_encoder, video -> vision."""
    return {k.replace("vision_encoder", "evaclip_model").replace("vision", "video"): v for k, v in sd.items()}


def test_init_from_loads_the_release_state_dict(tmp_path: Path) -> None:
    eva = _eva()
    sd = _release(eva)
    x = torch.randn(2, 3, IMG, IMG)
    with torch.no_grad():
        want = eva.forward_features(x)
    for i, layout in enumerate((sd, _wrapped(sd), _old_names(sd))):
        model = _model()
        report = init_from(model, _save(layout, tmp_path / f"model_step_{i}.pt"), zero3=False)
        assert report.kind == "mico_release", i
        assert "encoder.blocks.1.attn.qkv.bias" in report.loaded and "logit_scale.log_scale" in report.loaded
        assert "context.e_mod" in report.added and "match_head.net.2.bias" in report.added
        assert len(report.unused) == len(sd) - 33  # read: the EVA tower but its head (32), contra_temp
        assert any("multimodal_encoder.bert.encoder.layer.0.crossattention" in k for k in report.unused)
        assert "multimodal_encoder.*" in report.reasons and "multimodal_encoder" in report.summary()
        with torch.no_grad():
            torch.testing.assert_close(model.encoder(x, "image", pool=False), want, atol=1e-5, rtol=1e-5)


def test_a_release_tensor_that_does_not_fit_is_named(tmp_path: Path) -> None:
    sd = _release(_eva())
    bad = dict(sd)
    bad["vision_encoder.visual.blocks.1.mlp.fc1.weight"] = torch.zeros(48, V)
    named = r"^--init .*vision_encoder\.visual\.blocks\.1\.mlp\.fc1\.weight.*48, 32"
    with pytest.raises(ValueError, match=named):
        init_from(_model(), _save(bad, tmp_path / "model_step_1.pt"), zero3=False)
    bad = dict(sd, contra_temp=torch.tensor([0.05, 0.07]))
    with pytest.raises(ValueError, match=re.escape("contra_temp (2,) does not fit logit_scale.log_scale")):
        init_from(_model(), _save(bad, tmp_path / "model_step_2.pt"), zero3=False)
    bad = dict(sd, contra_temp=torch.tensor(-0.1))
    with pytest.raises(ValueError, match=r"log_scale: contra_temp .* not a positive temperature"):
        init_from(_model(), _save(bad, tmp_path / "model_step_3.pt"), zero3=False)
