"""Pretrained checkpoint formats -> our modules (plain, single process): timm ViT, EVA-style ViT,
sharded Hugging Face Llama (safetensors and .bin). References: timm's own checkpoint loading and
forward, transformers' from_pretrained. The ZeRO-3 path is tests/integration/test_pretrained_zero3.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from timm.models._manipulate import adapt_input_conv
from timm.models.eva import Eva
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn
from transformers import LlamaConfig, LlamaForCausalLM

from mico_ds.checkpoint.formats.hf_llama import load_hf_llama
from mico_ds.checkpoint.formats.reader import CheckpointReader
from mico_ds.checkpoint.formats.timm import load_timm_checkpoint, timm_plan
from mico_ds.config import InputConfig, TextConfig, VisionConfig
from mico_ds.models.omni_encoder import OmniEncoder
from mico_ds.models.text_branch import TextBranch, pretrained_llama_config
from tests.helpers.tiny import make_tiny_special

D, P, IMG = 32, 8, 32  # our encoder: 4x4 grid


def _encoder(audio_patch: int = P, depth: int = 2, pre_norm: bool = False) -> OmniEncoder:
    v = VisionConfig(
        patch_size=P,
        audio_patch_size=audio_patch,
        width=D,
        depth=depth,
        heads=2,
        mlp_dim=64,
        pre_norm=pre_norm,
    )
    return OmniEncoder(v, InputConfig(image_size=IMG, mel_bins=16, clip_frames=32), tokens_per_frame=2).eval()


def _perturbed(m: torch.nn.Module) -> torch.nn.Module:
    """timm zero-initializes biases: perturb every tensor so each one matters in the comparisons."""
    torch.manual_seed(3)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return m.eval()


def _timm_vit(img: int, num_classes: int = 0, pre_norm: bool = False) -> VisionTransformer:
    torch.manual_seed(1)
    return _perturbed(
        VisionTransformer(
            img_size=img,
            patch_size=P,
            embed_dim=D,
            depth=2,
            num_heads=2,
            mlp_ratio=2.0,
            num_classes=num_classes,
            pre_norm=pre_norm,
        )  # fmt: skip
    )


def test_timm_checkpoint_at_another_image_size_matches_timm_loading(tmp_path: Path) -> None:
    src = _timm_vit(img=56, num_classes=5)  # 7x7 grid -> ours 4x4; the head is dropped
    path = tmp_path / "vit.pth"
    torch.save({"model": src.state_dict()}, path)  # a training checkpoint wrapper
    enc = _encoder()
    load_timm_checkpoint(enc, path)
    ref = _timm_vit(img=IMG, num_classes=5)
    ref.load_state_dict(checkpoint_filter_fn(src.state_dict(), ref))  # timm's own resampling
    x = torch.randn(2, 3, IMG, IMG)
    with torch.no_grad():
        torch.testing.assert_close(enc(x, "image", pool=False), ref.forward_features(x))
        torch.testing.assert_close(enc.pos_embed, ref.pos_embed)


def test_clip_style_pre_norm(tmp_path: Path) -> None:
    """timm's CLIP ViTs (vit_*_clip_224.laion2b) normalize tokens before the blocks (norm_pre)."""
    src = _timm_vit(img=IMG, pre_norm=True)
    save_file(src.state_dict(), str(tmp_path / "clip.safetensors"))
    with pytest.raises(ValueError, match="set model.vision.pre_norm=true"):
        load_timm_checkpoint(_encoder(), tmp_path / "clip.safetensors")
    enc = _encoder(pre_norm=True)
    load_timm_checkpoint(enc, tmp_path / "clip.safetensors")
    x = torch.randn(2, 3, IMG, IMG)
    with torch.no_grad():
        torch.testing.assert_close(enc(x, "image", pool=False), src.forward_features(x))


def test_one_channel_tokenizers_sum_the_rgb_filters(tmp_path: Path) -> None:
    """A 1-channel input x gets exactly the RGB filters' response to the grey image (x, x, x)."""
    src = _timm_vit(img=IMG)
    save_file(src.state_dict(), str(tmp_path / "vit.safetensors"))
    enc = _encoder()
    load_timm_checkpoint(enc, tmp_path / "vit.safetensors")
    w = src.patch_embed.proj.weight
    for tok in ("depth", "audio"):
        torch.testing.assert_close(enc.tokenizers[tok].proj.weight, adapt_input_conv(1, w))
    x = torch.randn(2, 1, IMG, IMG)
    with torch.no_grad():
        torch.testing.assert_close(enc.tokenizers["depth"](x), enc.tokenizers["rgb"](x.expand(-1, 3, -1, -1)))
        torch.testing.assert_close(enc.tokenizers["normal"].proj.weight, w)


def test_audio_patch_size_is_resampled_with_flexivit_resize(tmp_path: Path) -> None:
    from timm.layers import resample_patch_embed

    src = _timm_vit(img=IMG)
    save_file(src.state_dict(), str(tmp_path / "vit.safetensors"))
    enc = _encoder(audio_patch=16)
    load_timm_checkpoint(enc, tmp_path / "vit.safetensors")
    expect = resample_patch_embed(adapt_input_conv(1, src.patch_embed.proj.weight), [16, 16])
    torch.testing.assert_close(enc.tokenizers["audio"].proj.weight, expect)
    assert enc.tokenizers["depth"].proj.weight.shape[-2:] == (8, 8)


def test_eva_style_clip_checkpoint_matches_timm_eva(tmp_path: Path) -> None:
    """EVA layout: qkv without bias + q_bias / v_bias; an EVA-CLIP file holds visual.* and a text tower."""
    torch.manual_seed(2)
    eva = _perturbed(
        Eva(
            img_size=IMG,
            patch_size=P,
            embed_dim=D,
            depth=2,
            num_heads=2,
            mlp_ratio=2.0,
            qkv_fused=True,
            global_pool="token",
            num_classes=0,
        )  # fmt: skip
    )
    sd = {f"visual.{k}": v for k, v in eva.state_dict().items()}
    sd["text.token_embedding.weight"] = torch.randn(10, D)  # the CLIP text tower: not ours
    sd["logit_scale"] = torch.ones(())
    save_file(sd, str(tmp_path / "eva_clip.safetensors"))
    enc = _encoder()
    load_timm_checkpoint(enc, tmp_path / "eva_clip.safetensors")
    q, v = eva.blocks[0].attn.q_bias, eva.blocks[0].attn.v_bias
    torch.testing.assert_close(enc.blocks[0].attn.qkv.bias, torch.cat([q, torch.zeros_like(q), v]))
    x = torch.randn(2, 3, IMG, IMG)
    with torch.no_grad():
        torch.testing.assert_close(enc(x, "image", pool=False), eva.forward_features(x))


def test_checkpoints_that_do_not_fit_are_named() -> None:
    sd = _timm_vit(img=IMG).state_dict()
    wide = {k: torch.zeros(*(s * 2 if s == D else s for s in v.shape)) for k, v in sd.items()}
    with pytest.raises(
        ValueError, match=r"wide.pth.*cls_token \(1, 1, 32\) cannot be made .* \[\(1, 1, 64\)\]"
    ):
        timm_plan({k: tuple(v.shape) for k, v in wide.items()}, _encoder(), "wide.pth")
    shallow = {k: tuple(v.shape) for k, v in sd.items() if not k.startswith("blocks.1.")}
    with pytest.raises(ValueError, match=r"shallow.pth.*does not provide: \['blocks\.1\."):
        timm_plan(shallow, _encoder(), "shallow.pth")
    eva02 = {k: tuple(v.shape) for k, v in sd.items()} | {"blocks.0.attn.q_proj.weight": (D, D)}
    with pytest.raises(ValueError, match=r"unknown.*blocks\.0\.attn\.q_proj\.weight"):
        timm_plan(eva02, _encoder(), "eva02.pth")


# ----------------------------------------------------------------------------- Hugging Face Llama


def _text_cfg(pretrained: str | None = None, **kw: object) -> TextConfig:
    base = dict(hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=64,
                max_position_embeddings=64)  # fmt: skip
    base.update(kw)
    return TextConfig(pretrained=pretrained, **base)  # type: ignore[arg-type]


def _hf_llama(vocab: int = 90, tie: bool = False) -> LlamaForCausalLM:
    torch.manual_seed(4)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=tie, rope_theta=500000.0)  # fmt: skip
    return LlamaForCausalLM(cfg).eval()


def test_sharded_safetensors_directory_loads_shard_by_shard(tmp_path: Path) -> None:
    src = _hf_llama()
    src.save_pretrained(tmp_path / "llama", max_shard_size="16KB")
    index = json.loads((tmp_path / "llama" / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 3
    special = make_tiny_special()  # 96 = 90 + the tokenizer's added tokens
    tb = TextBranch(_text_cfg(str(tmp_path / "llama")), special).eval()
    assert tb.llm.config.rope_parameters["rope_theta"] == 500000.0  # RoPE from the checkpoint's config

    opened: list[list[Path]] = []
    real_close = CheckpointReader.close

    def spy(self: CheckpointReader) -> None:
        opened.append(list(self.files_opened))
        real_close(self)

    CheckpointReader.close = spy  # type: ignore[method-assign]
    try:
        load_hf_llama(tb, tmp_path / "llama")
    finally:
        CheckpointReader.close = real_close  # type: ignore[method-assign]
    assert [p.name for p in opened[-1]] == shards  # each shard opened once, in order

    sd = src.state_dict()
    for name, p in tb.llm.named_parameters():
        ref = sd[name]
        if name in ("model.embed_tokens.weight", "lm_head.weight"):
            torch.testing.assert_close(p[90:], ref.mean(0, keepdim=True).expand(6, -1))
            p = p[:90]
        torch.testing.assert_close(p, ref, msg=name)
    ids = torch.randint(4, 90, (2, 9))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        torch.testing.assert_close(tb(ids, mask).hidden, src.model(input_ids=ids).last_hidden_state)
        torch.testing.assert_close(tb.lm_logits(tb(ids, mask).hidden)[..., :90], src(input_ids=ids).logits)


def test_bin_shards_and_tied_embeddings(tmp_path: Path) -> None:
    """pytorch_model-*.bin shards + index (older checkpoints); a tied checkpoint has no lm_head."""
    src = _hf_llama(tie=True)
    d = tmp_path / "llama"
    d.mkdir()
    src.config.save_pretrained(d)
    sd = {k: v for k, v in src.state_dict().items() if k != "lm_head.weight"}
    keys = sorted(sd)
    halves = {"pytorch_model-00001-of-00002.bin": keys[: len(keys) // 2],
              "pytorch_model-00002-of-00002.bin": keys[len(keys) // 2 :]}  # fmt: skip
    for f, ks in halves.items():
        torch.save({k: sd[k] for k in ks}, d / f)
    weight_map = {k: f for f, ks in halves.items() for k in ks}
    (d / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    tb = TextBranch(_text_cfg(str(d)), make_tiny_special())
    load_hf_llama(tb, d)
    emb = src.model.embed_tokens.weight
    torch.testing.assert_close(tb.llm.lm_head.weight[:90], emb)
    torch.testing.assert_close(
        tb.llm.model.layers[1].mlp.down_proj.weight, src.model.layers[1].mlp.down_proj.weight
    )


def test_pretrained_config_must_match_the_recipe(tmp_path: Path) -> None:
    _hf_llama().save_pretrained(tmp_path / "llama")
    with pytest.raises(
        ValueError, match=r"model\.text\.num_layers=3 vs num_hidden_layers=2.*intermediate_size=48"
    ):
        pretrained_llama_config(_text_cfg(str(tmp_path / "llama"), num_layers=3, intermediate_size=48),
                                make_tiny_special())  # fmt: skip
    with pytest.raises(ValueError, match="vocab_size=90 > the tokenizer's 80"):
        pretrained_llama_config(_text_cfg(str(tmp_path / "llama")), make_tiny_special(80))
    with pytest.raises(ValueError, match="no such checkpoint"):
        CheckpointReader(tmp_path / "missing")
