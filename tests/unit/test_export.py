"""mico_ds.checkpoint.formats: sharded writer, and branch exports checked against timm and transformers.

The exports are built from a tiny random MiCoModel's state dict (no DeepSpeed here; the integration test
tests/integration/test_convert.py does the same on a real 2-rank ZeRO-3 checkpoint).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mico_ds.checkpoint.formats.hf_llama import export_text
from mico_ds.checkpoint.formats.safetensors import load_state_dict, plan_shards, save_state_dict
from mico_ds.checkpoint.formats.timm import (
    encoder_to_timm_names,
    export_vision,
    timm_to_encoder_state_dict,
    timm_vit_args,
)
from mico_ds.cli.common import parse_size
from mico_ds.config import VisionConfig
from mico_ds.models.mico import MiCoModel
from tests.helpers.tiny import make_tiny_config


def test_parse_size() -> None:
    assert parse_size("5GB") == 5_000_000_000
    assert parse_size("500MiB") == 500 * 2**20
    assert parse_size("1.5kb") == 1500
    assert parse_size("123") == 123 and parse_size(7) == 7
    with pytest.raises(ValueError, match="not a size: '5 apples'"):
        parse_size("5 apples")


def test_plan_shards_is_greedy_in_order() -> None:
    sizes = {"a": 40, "b": 40, "c": 30, "d": 200, "e": 10}
    assert plan_shards(sizes, 100) == [["a", "b"], ["c"], ["d"], ["e"]]
    assert plan_shards(sizes, None) == [list(sizes)]
    with pytest.raises(ValueError, match="> 0"):
        plan_shards(sizes, 0)


@pytest.mark.parametrize("safe", [True, False])
def test_save_state_dict_shards_and_reads_back(tmp_path: Path, safe: bool) -> None:
    torch.manual_seed(0)
    flat = torch.randn(10_000)  # like a ZeRO flat group: tensors below are views into it
    sd = {
        "x.weight": flat[:4000].view(40, 100),
        "x.bias": flat[4000:4100],
        "y": flat[4100:7000],
        "n": torch.arange(1000),  # int64: 8000 bytes
    }
    progress = []
    files = save_state_dict(
        sd, tmp_path, max_shard_size=16_000, safe=safe, progress=lambda *a: progress.append(a)
    )
    ext = "safetensors" if safe else "bin"
    base = "model" if safe else "pytorch_model"
    assert [f.name for f in files] == [f"{base}-{i:05d}-of-00003.{ext}" for i in (1, 2, 3)] + [
        f"{base}.{ext}.index.json"
    ]
    assert [p[:2] for p in progress] == [(1, 3), (2, 3), (3, 3)]
    index = json.loads(files[-1].read_text())
    assert index["metadata"]["total_size"] == 4 * 7000 + 8 * 1000
    assert index["weight_map"] == {
        "x.weight": files[0].name, "x.bias": files[1].name, "y": files[1].name, "n": files[2].name
    }  # fmt: skip
    # each file holds its own tensors only, not the whole flat buffer the views came from
    assert files[0].stat().st_size < 4 * 4000 + 4096
    back = load_state_dict(tmp_path)
    assert back.keys() == sd.keys()
    for k in sd:
        torch.testing.assert_close(back[k], sd[k], rtol=0, atol=0)
    one = tmp_path / "one"
    assert [f.name for f in save_state_dict(sd, one, safe=safe)] == [f"{base}.{ext}"]
    assert load_state_dict(one).keys() == sd.keys()


def test_timm_names_invert_timm_to_encoder() -> None:
    """encoder -> timm names is the inverse of the existing timm -> encoder mapping."""
    cfg = make_tiny_config()
    model = MiCoModel.from_run_config(cfg, _special(96))
    timm_map, extra = encoder_to_timm_names(list(model.encoder.state_dict()))
    timm_sd = {t: model.encoder.state_dict()[e] for t, e in timm_map.items()}
    back = timm_to_encoder_state_dict(timm_sd, model.encoder)
    for k, v in back.items():
        if not k.startswith(("tokenizers.normal", "tokenizers.depth", "tokenizers.audio")):
            torch.testing.assert_close(v, model.encoder.state_dict()[k], rtol=0, atol=0)
    assert sorted(extra) == sorted(
        k for k in model.encoder.state_dict() if k.startswith("tokenizers.") and ".rgb." not in k
    )


def test_timm_args_keep_the_mlp_width_of_vit_g() -> None:
    # ViT-g/14: 6144 / 1408 does not survive int(1408 * ratio) in floating point
    from mico_ds.config import InputConfig

    args = timm_vit_args(
        VisionConfig(patch_size=14, width=1408, depth=40, heads=16, mlp_dim=6144), InputConfig()
    )
    assert int(args["embed_dim"] * args["mlp_ratio"]) == 6144
    args = timm_vit_args(VisionConfig(width=768, mlp_dim=3072), InputConfig())
    assert args["mlp_ratio"] == 4.0


def _special(vocab: int):
    from tests.helpers.tiny import make_tiny_special

    return make_tiny_special(vocab)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory):
    from mico_ds.data.tokenizer import Tokenizer, train_sentencepiece

    words = ["red", "green", "blue", "star", "circle", "square", "moves", "left", "right", "up", "down"]
    caps = [" ".join(words[(i * 7 + j) % len(words)] for j in range(6)) for i in range(200)]
    path = train_sentencepiece(caps, tmp_path_factory.mktemp("tok"), vocab_size=300)
    return Tokenizer.from_path(path)


@pytest.fixture(scope="module")
def trained(tokenizer) -> MiCoModel:
    torch.manual_seed(0)
    model = MiCoModel.from_run_config(make_tiny_config(), tokenizer.special).eval()
    with torch.no_grad():  # move every parameter off its init (zeros, ones) so nothing matches by luck
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model


def test_vision_export_loads_in_timm_with_same_features(trained: MiCoModel, tmp_path: Path) -> None:
    import timm
    from timm.models.vision_transformer import VisionTransformer

    cfg = make_tiny_config()  # the config the fixture's model was built from
    out = export_vision(trained.state_dict(), cfg.model, cfg.inputs, tmp_path / "vision")
    conf = json.loads((out / "config.json").read_text())
    vit = VisionTransformer(**conf["model_args"]).eval()
    vit.load_state_dict(load_state_dict(out), strict=True)
    by_name = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        ours = trained.encoder(x, "image", pool=False)
        torch.testing.assert_close(vit.forward_features(x), ours)
        torch.testing.assert_close(by_name.forward_features(x), ours)
    assert conf["pretrained_cfg"]["mean"] == list(cfg.inputs.image_mean)
    side = load_state_dict(out / "omni_tokenizers.safetensors")
    assert sorted(side) == [
        f"tokenizers.{m}.proj.{p}" for m in ("audio", "depth", "normal") for p in ("bias", "weight")
    ]
    torch.testing.assert_close(
        side["tokenizers.depth.proj.weight"], trained.encoder.tokenizers.depth.proj.weight
    )


def test_text_export_loads_in_transformers_with_same_logits(
    trained: MiCoModel, tokenizer, tmp_path: Path
) -> None:
    from transformers import AutoTokenizer, LlamaForCausalLM

    text_cfg = make_tiny_config().model.text
    out = export_text(trained.state_dict(), text_cfg, tmp_path / "text", tokenizer, max_shard_size=20_000)
    assert (out / "model.safetensors.index.json").is_file()  # sharded: the path from_pretrained must follow
    hf = LlamaForCausalLM.from_pretrained(out, local_files_only=True).eval()
    hf_tok = AutoTokenizer.from_pretrained(out, local_files_only=True)
    texts = ["a red star moves left", "blue circle"]
    ids, mask = tokenizer.encode(texts, max_len=16)
    assert [hf_tok(t, add_special_tokens=False)["input_ids"] for t in texts] == tokenizer.tokenize_ids(texts)
    assert (hf_tok.pad_token_id, hf_tok.bos_token_id, hf_tok.eos_token_id) == (
        tokenizer.special.pad_id, tokenizer.special.bos_id, tokenizer.special.eos_id
    )  # fmt: skip
    with torch.no_grad():
        ours = trained.text.lm_logits(trained.text(ids, mask).hidden)
        theirs = hf(input_ids=ids, attention_mask=mask).logits
    valid = mask.bool()  # right padding: the padded positions' outputs are not used by either
    torch.testing.assert_close(theirs[valid], ours[valid])
    assert hf.config.use_cache and hf.config.vocab_size == tokenizer.special.vocab_size


def test_export_refuses_a_mismatched_config(trained: MiCoModel, tokenizer, tmp_path: Path) -> None:
    cfg = make_tiny_config()
    cfg.model.vision.depth = 3
    with pytest.raises(ValueError, match="do not fit timm VisionTransformer"):
        export_vision(trained.state_dict(), cfg.model, cfg.inputs, tmp_path / "v")
    cfg = make_tiny_config()
    cfg.model.text.num_layers = 3
    with pytest.raises(ValueError, match=r"2 layers\) do not match the config"):
        export_text(trained.state_dict(), cfg.model.text, tmp_path / "t", tokenizer)
