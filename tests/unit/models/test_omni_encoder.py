"""Omni-encoder: parity with timm's VisionTransformer, per-modality shapes, folding, meta build."""

from __future__ import annotations

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

from mico_ds.checkpoint.formats.timm import timm_to_encoder_state_dict
from mico_ds.config import InputConfig, VisionConfig
from mico_ds.models.omni_encoder import OmniEncoder, pool_grid_shape

D, P, IMG = 64, 8, 32


def _encoder(tokens_per_frame: int = 5, **vision: object) -> OmniEncoder:
    v = VisionConfig(patch_size=P, audio_patch_size=P, width=D, depth=2, heads=4, mlp_dim=4 * D, **vision)
    i = InputConfig(image_size=IMG, num_frames=3, mel_bins=16, clip_frames=48, num_clips=2)
    torch.manual_seed(0)
    return OmniEncoder(v, i, tokens_per_frame).eval()


def _timm(in_chans: int = 3, dynamic: bool = False) -> VisionTransformer:
    torch.manual_seed(1)
    return VisionTransformer(
        img_size=IMG,
        patch_size=P,
        in_chans=in_chans,
        embed_dim=D,
        depth=2,
        num_heads=4,
        mlp_ratio=4.0,
        class_token=True,
        num_classes=0,
        dynamic_img_size=dynamic,
    ).eval()


def _load_timm(enc: OmniEncoder, ref: VisionTransformer) -> None:
    # strict: every parameter of ours comes from the timm model (the mapping covers all keys)
    enc.load_state_dict(timm_to_encoder_state_dict(ref.state_dict(), enc), strict=True)


def test_image_path_matches_timm_forward_features() -> None:
    enc, ref = _encoder(), _timm()
    _load_timm(enc, ref)
    x = torch.randn(3, 3, IMG, IMG)
    with torch.no_grad():
        torch.testing.assert_close(enc(x, "image", pool=False), ref.forward_features(x))
        # video frames are images: each frame through timm, stacked
        v = torch.randn(2, 3, 3, IMG, IMG)
        torch.testing.assert_close(enc(v, "video", pool=False), ref.forward_features(v.flatten(0, 1)))


def test_spectrogram_resamples_the_image_position_table_like_timm() -> None:
    """timm with dynamic_img_size resamples pos_embed to the input grid with the same call."""
    enc, ref = _encoder(), _timm(in_chans=1, dynamic=True)
    sd = ref.state_dict()
    sd = {k: v for k, v in sd.items() if not k.startswith("patch_embed.")}
    sd.update(
        {
            f"tokenizers.audio.proj.{k.split('.')[-1]}": v
            for k, v in ref.state_dict().items()
            if "patch_embed" in k
        }
    )
    missing, unexpected = enc.load_state_dict(sd, strict=False)
    assert not unexpected and all(k.startswith("tokenizers.") and "audio" not in k for k in missing)
    spec = torch.randn(2, 2, 1, 16, 48)  # (B, N, 1, F, Tm): grid 2 x 6, not the 4 x 4 image grid
    with torch.no_grad():
        ours = enc(spec, "audio", pool=False)
        torch.testing.assert_close(ours, ref.forward_features(spec.flatten(0, 1)))
    assert ours.shape == (4, 1 + 2 * 6, D)


def test_pooled_tokens_are_cls_and_grid_means() -> None:
    enc = _encoder(tokens_per_frame=5)  # CLS + 4 pooled tokens on a 4x4 grid -> 2x2 windows
    x = torch.randn(2, 3, IMG, IMG)
    with torch.no_grad():
        full = enc(x, "image", pool=False)  # (2, 17, D)
        pooled = enc(x, "image")
    grid = full[:, 1:].reshape(2, 4, 4, D)  # row-major patches
    expect = [full[:, 0]]
    for r in (0, 2):
        for c in (0, 2):
            expect.append(grid[:, r : r + 2, c : c + 2].mean(dim=(1, 2)))
    torch.testing.assert_close(pooled, torch.stack(expect, dim=1))


@pytest.mark.parametrize(
    ("modality", "shape", "frames"),
    [
        ("image", (2, 3, IMG, IMG), 1),
        ("video", (2, 3, 3, IMG, IMG), 3),
        ("audio", (2, 2, 1, 16, 48), 2),
        ("depth", (2, 1, IMG, IMG), 1),
        ("normal", (2, 3, IMG, IMG), 1),
    ],
)
def test_shapes_per_modality(modality: str, shape: tuple[int, ...], frames: int) -> None:
    enc = _encoder(tokens_per_frame=3)
    out = enc(torch.randn(shape), modality)
    assert out.shape == (2, frames * 3, D)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize(("modality", "still"), [("video", "image"), ("audio", "audio")])
def test_frames_and_clips_are_encoded_independently(modality: str, still: str) -> None:
    enc = _encoder(tokens_per_frame=3)
    x = torch.randn(2, 3, 3, IMG, IMG) if modality == "video" else torch.randn(2, 2, 1, 16, 48)
    with torch.no_grad():
        folded = enc(x, modality)
        each = [enc(x[:, f] if still == "image" else x[:, f : f + 1], still) for f in range(x.shape[1])]
    torch.testing.assert_close(folded, torch.cat(each, dim=1))


def test_tokenizers_per_modality() -> None:
    enc = _encoder()
    x = torch.randn(1, 3, IMG, IMG)
    with torch.no_grad():
        # normal maps have their own 3-channel tokenizer (different weights -> different output)
        assert not torch.allclose(enc(x, "image"), enc(x, "normal"))
        enc.tokenizers["normal"].load_state_dict(enc.tokenizers["rgb"].state_dict())
        torch.testing.assert_close(enc(x, "image"), enc(x, "normal"))
    assert enc.tokenizers["depth"].proj.weight.shape[1] == 1
    assert enc.tokenizers["audio"].proj.weight.shape[1] == 1


def test_bad_inputs_raise() -> None:
    enc = _encoder()
    with pytest.raises(ValueError, match="depth"):
        enc(torch.randn(1, 3, IMG, IMG), "depth")
    with pytest.raises(ValueError, match="video"):
        enc(torch.randn(1, 3, IMG, IMG), "video")
    with pytest.raises(ValueError, match="patch size"):
        enc(torch.randn(1, 3, IMG + 4, IMG), "image")
    with pytest.raises(ValueError, match="unknown modality"):
        enc(torch.randn(1, 3, IMG, IMG), "lidar")
    with pytest.raises(ValueError, match="image_size"):
        OmniEncoder(VisionConfig(patch_size=7), InputConfig(image_size=32), 5)


def test_grad_checkpointing_same_outputs_and_grads() -> None:
    x = torch.randn(2, 2, 3, IMG, IMG)
    grads = []
    for ckpt in (False, True):
        enc = _encoder(grad_checkpointing=ckpt).train()
        enc(x, "video").square().sum().backward()
        grads.append({n: p.grad.clone() for n, p in enc.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], msg=n)


def test_pool_grid_shape_follows_aspect() -> None:
    assert pool_grid_shape(4, (14, 14)) == (2, 2)
    assert pool_grid_shape(4, (4, 32)) == (1, 4)  # spectrogram: pool along time
    assert pool_grid_shape(6, (8, 8)) == (2, 3)
    assert pool_grid_shape(7, (8, 8)) == (1, 7)


def test_vit_g14_builds_on_meta_with_exact_parameter_count() -> None:
    v = VisionConfig(patch_size=14, audio_patch_size=16, width=1408, depth=40, heads=16, mlp_dim=6144)
    i = InputConfig(image_size=224, mel_bins=64, clip_frames=512)
    with torch.device("meta"):
        enc = OmniEncoder(v, i, tokens_per_frame=5)
    d, m, p, pa = 1408, 6144, 14, 16
    block = (3 * d * d + 3 * d) + (d * d + d) + (d * m + m) + (m * d + d) + 4 * d
    tokenizers = 2 * (3 * p * p * d + d) + (p * p * d + d) + (pa * pa * d + d)
    expected = 40 * block + tokenizers + d + (1 + 16 * 16) * d + 2 * d
    assert sum(x.numel() for x in enc.parameters()) == expected
    assert 0.95e9 < expected < 1.1e9  # "about 1.0B" (ViT-g/14, Zhai et al. 2022: 1011M)
    assert enc.blocks[0].mlp.fc1.out_features == 6144  # not int(1408 * 6144 / 1408) rounding
