"""Pretrained weights into a 2-rank ZeRO-3 engine (deepspeed launcher, gloo), from the real formats.

The test writes a tiny timm ``VisionTransformer`` (48x48 images: a 6x6 grid against the debug recipe's
4x4) as safetensors and a tiny ``LlamaForCausalLM`` with ``save_pretrained(max_shard_size=...)`` (several
shards + model.safetensors.index.json, a vocabulary 2 rows smaller than the tokenizer's). Each rank
(tests/integration/pretrained_worker.py) builds the engine with the trainer's ``build_engine`` and checks
values, outputs, the frozen / slower branch and what was gathered while loading.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mico_ds.config import load_config
from tests.helpers.train import REPO, env, free_port

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

SOURCE_VOCAB, VOCAB = 94, 96  # Llama-2 has 32000; our tokenizer adds <pad> and <mask>
ZERO3 = {
    "train_micro_batch_size_per_gpu": "auto",
    "gradient_accumulation_steps": "auto",
    "train_batch_size": "auto",
    "gradient_clipping": "auto",
    "zero_optimization": {
        "stage": 3,
        "stage3_param_persistence_threshold": 0,  # partition every parameter, however small
        "reduce_bucket_size": 1e5,
        "stage3_prefetch_bucket_size": 1e5,
        "stage3_max_live_parameters": 1e6,
        "stage3_max_reuse_distance": 1e6,
    },
    "steps_per_print": 1_000_000,
}


def write_checkpoints(d: Path) -> dict:
    from safetensors.torch import save_file
    from timm.models.vision_transformer import VisionTransformer
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = load_config("debug")
    v, t = cfg.model.vision, cfg.model.text
    torch.manual_seed(11)
    vit = VisionTransformer(
        img_size=48, patch_size=v.patch_size, embed_dim=v.width, depth=v.depth, num_heads=v.heads,
        mlp_ratio=v.mlp_dim / v.width, num_classes=10,  # a head, which loading drops
    )  # fmt: skip
    with torch.no_grad():  # timm zero-initializes biases and pos_embed is tiny: make every tensor count
        for p in vit.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    save_file({k: x.contiguous() for k, x in vit.state_dict().items()}, str(d / "vit.safetensors"))
    llama = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=SOURCE_VOCAB, hidden_size=t.hidden_size, intermediate_size=t.intermediate_size,
            num_hidden_layers=t.num_layers, num_attention_heads=t.num_heads, num_key_value_heads=t.num_heads,
            max_position_embeddings=t.max_position_embeddings, tie_word_embeddings=False,
        )
    )  # fmt: skip
    llama.save_pretrained(d / "llama", max_shard_size="20KB")
    (d / "zero3.json").write_text(json.dumps(ZERO3))
    meta = {"vocab": VOCAB, "source_vocab": SOURCE_VOCAB}
    (d / "meta.json").write_text(json.dumps(meta))
    return meta


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> list[dict]:
    d = tmp_path_factory.mktemp("pretrained")
    write_checkpoints(d)
    out = d / "out"
    out.mkdir()
    cmd = [
        sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2",
        "--master_port", str(free_port()), "--no_local_rank",
        "--module", "tests.integration.pretrained_worker", "--ckpt", str(d), "--out", str(out),
    ]  # fmt: skip
    p = subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, f"--- stdout\n{p.stdout[-5000:]}\n--- stderr\n{p.stderr[-5000:]}"
    res = [torch.load(out / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    res[0]["shards"] = len(
        set(json.loads((d / "llama/model.safetensors.index.json").read_text())["weight_map"].values())
    )
    return res


def test_the_checkpoint_has_several_shards(results: list[dict]) -> None:
    assert results[0]["shards"] >= 3


def test_parameters_stay_partitioned(results: list[dict]) -> None:
    for r in results:
        assert r["all_partitioned"]
        assert 0.45 < r["local_fraction"] < 0.55  # each rank holds its half, not the model


def test_gathered_values_equal_timm_and_transformers_loading(results: list[dict]) -> None:
    for r in results:
        assert r["encoder_unchecked"] == []  # every encoder parameter has a reference
        bad = {k: v for k, v in r["encoder_diff"].items() if v > 1e-6}
        assert not bad, bad
        bad = {k: v for k, v in r["text_diff"].items() if v > 1e-6}
        assert not bad, bad
        assert any(k.endswith("[new rows]") for k in r["text_diff"])


def test_outputs_match_the_reference_modules(results: list[dict]) -> None:
    for r in results:
        assert r["vit_out_diff"] < 1e-4, r["vit_out_diff"]
        assert r["llm_out_diff"] < 1e-4, r["llm_out_diff"]


def test_frozen_vision_and_slower_text_branch(results: list[dict]) -> None:
    for r in results:
        assert not r["encoder_requires_grad"]
        assert r["encoder_max_change"] == 0.0
        assert r["text_changed"]
        assert r["group_lrs"] == [pytest.approx(1e-3 * 0.5), pytest.approx(1e-3)]
        assert r["text_step_lr"] == pytest.approx(1e-3 * 0.5, rel=1e-3)
        assert r["head_step_lr"] == pytest.approx(1e-3, rel=1e-3)


def test_one_parameter_gathered_at_a_time_and_one_pass_per_shard(results: list[dict]) -> None:
    r0 = results[0]
    assert r0["available_during_load"], "rank 0 converted no tensor"
    # whenever rank 0 converts a tensor, DeepSpeed holds exactly one gathered (non-persistent) parameter
    assert {n for n, _ in r0["available_during_load"]} == {1}
    assert max(numel for _, numel in r0["available_during_load"]) <= max(r0["largest_param"].values())
    assert results[1]["available_during_load"] == []  # only rank 0 reads and converts
    reports = {r["branch"]: r for r in r0["reports"]}
    assert reports["text"]["files_read"] == r0["shards"]
    assert reports["encoder"]["files_read"] == 1
    for b in ("encoder", "text"):
        assert reports[b]["max_gathered_numel"] == r0["largest_param"][b]


def test_persistent_parameters_load_too(results: list[dict]) -> None:
    """The second load uses the debug recipe's zero3_cpu.json. Persistence (parameters below
    stage3_param_persistence_threshold kept whole) starts at deepspeed.initialize, after the load: the
    engine gathers them from the partitions the load wrote, and they must hold the checkpoint's values."""
    for r in results:
        assert r["persistent_at_load"] == 0
        assert r["persistent_count"] > 0
        assert r["reload_max_diff"] == 0.0, r["reload_bad"]
