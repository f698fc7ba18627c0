"""One rank of tests/integration/test_pretrained_zero3.py (run under the `deepspeed` launcher, gloo).

Builds the debug-size MiCo model through the trainer's own ``build_engine`` (zero.Init + pretrained
loading + engine), with a timm ViT checkpoint at another image size and a sharded Hugging Face Llama
directory, then: gathers the partitions and compares them with timm's / transformers' own loading of
the same files, compares encoder and text outputs with the reference modules, trains 2 steps with
``optim.vision_lr_scale=0`` and ``optim.text_lr_scale=0.5``, and loads once more directly while
recording which parameters DeepSpeed holds gathered whenever a tensor is converted.

    python -m deepspeed.launcher.runner --num_gpus 2 --no_local_rank \\
        --module tests.integration.pretrained_worker --ckpt DIR --out DIR
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

LR = 1e-3
TEXT_SCALE = 0.5


def _ref_vit(ckpt: Path, cfg):
    """timm's own loading of the checkpoint into a ViT at our image size (resamples pos_embed)."""
    from safetensors.torch import load_file
    from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn

    v = cfg.model.vision
    ref = VisionTransformer(
        img_size=cfg.inputs.image_size, patch_size=v.patch_size, embed_dim=v.width, depth=v.depth,
        num_heads=v.heads, mlp_ratio=v.mlp_dim / v.width, num_classes=10,
    ).eval()  # fmt: skip
    ref.load_state_dict(checkpoint_filter_fn(load_file(str(ckpt)), ref), strict=True)
    return ref


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--ckpt", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()

    import deepspeed
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus
    from transformers import LlamaForCausalLM

    from mico_ds import distributed as mdist
    from mico_ds.config import load_config
    from mico_ds.distributed import zero_load as pre
    from mico_ds.distributed.ds_config import resolve_ds_config
    from mico_ds.distributed.engine import build_engine, init_distributed
    from mico_ds.models.mico import MiCoModel
    from tests.helpers.tiny import make_random_batch, make_tiny_special

    meta = json.loads((args.ckpt / "meta.json").read_text())
    cfg = load_config(
        "debug",
        [
            f"model.vision.pretrained={args.ckpt / 'vit.safetensors'}",
            f"model.text.pretrained={args.ckpt / 'llama'}",
            f"train.ds_config={args.ckpt / 'zero3.json'}",
            "optim.vision_lr_scale=0.0",
            f"optim.text_lr_scale={TEXT_SCALE}",
            f"optim.lr={LR}",
            "optim.warmup_steps=1",
            "optim.weight_decay=0.0",
            "optim.grad_clip=0.0",
            "train.precision=fp32",
        ],
    )
    special = make_tiny_special(meta["vocab"])
    init_distributed(cfg.train.dist_timeout_s)
    rank = mdist.get_rank()
    torch.manual_seed(0)
    engine, _, _ = build_engine(cfg, lambda: MiCoModel.from_run_config(cfg, special))
    model = engine.module
    out: dict = {"rank": rank}

    # 1. every parameter is partitioned: this rank holds about half of each
    params = dict(model.named_parameters())
    out["all_partitioned"] = all(p.data.numel() == 0 and hasattr(p, "ds_id") for p in params.values())
    out["local_fraction"] = sum(p.ds_tensor.numel() for p in params.values()) / sum(
        p.ds_numel for p in params.values()
    )

    # 2. gathered values vs timm's / transformers' own loading of the same files
    ref_vit = _ref_vit(args.ckpt / "vit.safetensors", cfg)
    ref_llm = LlamaForCausalLM.from_pretrained(str(args.ckpt / "llama"), dtype=torch.float32).eval()
    from timm.models._manipulate import adapt_input_conv

    rgb_w = ref_vit.patch_embed.proj.weight
    expect_enc = {f"blocks.{k}": v for k, v in ref_vit.blocks.state_dict().items()}
    expect_enc.update(
        {
            "pos_embed": ref_vit.pos_embed, "cls_token": ref_vit.cls_token,
            "norm.weight": ref_vit.norm.weight, "norm.bias": ref_vit.norm.bias,
            "tokenizers.rgb.proj.weight": rgb_w, "tokenizers.normal.proj.weight": rgb_w,
            "tokenizers.depth.proj.weight": adapt_input_conv(1, rgb_w),
            "tokenizers.audio.proj.weight": adapt_input_conv(1, rgb_w),
        }
    )  # fmt: skip
    expect_enc.update(
        {
            f"tokenizers.{t}.proj.bias": ref_vit.patch_embed.proj.bias
            for t in ("rgb", "normal", "depth", "audio")
        }
    )
    old_v = meta["source_vocab"]
    expect_txt = {f"llm.{k}": v for k, v in ref_llm.state_dict().items()}
    enc_p, txt_p = dict(model.encoder.named_parameters()), dict(model.text.named_parameters())
    with deepspeed.zero.GatheredParameters(list(model.parameters())):
        out["encoder_diff"] = {
            k: (enc_p[k].detach() - v.detach()).abs().max().item() for k, v in expect_enc.items()
        }
        out["encoder_unchecked"] = sorted(set(enc_p) - set(expect_enc))
        diffs = {}
        for k, v in expect_txt.items():
            mine = txt_p[k].detach()
            if v.shape[0] == old_v and mine.shape[0] == meta["vocab"]:  # grown vocabulary rows
                diffs[k + "[new rows]"] = (mine[old_v:] - v.mean(0)).abs().max().item()
                mine = mine[:old_v]
            diffs[k] = (mine - v.detach()).abs().max().item()
        out["text_diff"] = diffs
        before = {n: p.detach().clone() for n, p in params.items()}
    loaded = {n: t for n, t in before.items() if n.startswith(("encoder.", "text."))}

    # 3. outputs of the partitioned model vs the reference modules
    engine.eval()
    g = torch.Generator().manual_seed(5 + rank)
    x = torch.randn(2, 3, cfg.inputs.image_size, cfg.inputs.image_size, generator=g)
    ids = torch.randint(4, old_v, (2, 7), generator=g)
    mask = torch.ones_like(ids)
    with torch.no_grad():
        out["vit_out_diff"] = (
            (model.encoder(x, "image", pool=False) - ref_vit.forward_features(x)).abs().max().item()
        )
        h_ref = ref_llm.model(input_ids=ids, attention_mask=mask).last_hidden_state
        out["llm_out_diff"] = (model.text(ids, mask).hidden - h_ref).abs().max().item()
    engine.train()

    # 4. two steps: the vision branch frozen, the text branch at half the learning rate
    out["encoder_requires_grad"] = any(p.requires_grad for p in model.encoder.parameters())
    out["group_lrs"] = sorted({round(gr["lr"], 12) for gr in engine.optimizer.param_groups})
    deltas = []
    for step in range(2):
        batch = make_random_batch(cfg, ["image", "audio"], 4, seed=10 * step + rank)
        losses, _ = engine(batch, step=step)
        engine.backward(losses["loss"])
        engine.step()
        with deepspeed.zero.GatheredParameters(list(model.parameters())):
            now = {n: p.detach().clone() for n, p in params.items()}
        deltas.append({n: (now[n] - before[n]).abs() for n in now})
        before = now
    d0 = deltas[0]
    out["encoder_max_change"] = max(d[n].max().item() for d in deltas for n in d if n.startswith("encoder."))
    # Adam's first step moves each element by lr * g / (|g| + eps) = lr (for g != 0): the median |dw|
    # of a matrix is its group's learning rate.
    q = "text.llm.model.layers.0.self_attn.q_proj.weight"
    out["text_step_lr"] = d0[q][d0[q] > 0].median().item()
    out["head_step_lr"] = d0["proj_t.net.0.weight"][d0["proj_t.net.0.weight"] > 0].median().item()
    out["text_changed"] = deltas[1][q].max().item() > 0

    # 5. a direct load with the debug recipe's zero3_cpu.json (small parameters persistent), recording
    # what DeepSpeed holds gathered whenever a tensor is converted
    ds = resolve_ds_config(load_config("debug", ["train.precision=fp32"]), mdist.get_world_size())
    torch.manual_seed(1)  # other random values than the first model: the load must overwrite them
    with deepspeed.zero.Init(config_dict_or_path=ds):
        fresh = MiCoModel.from_run_config(cfg, special)
    fresh_params = list(fresh.parameters())
    out["persistent_at_load"] = sum(bool(p.ds_persist) for p in fresh_params)
    seen: list[tuple[int, int]] = []
    real = pre.materialize

    def watched(conv, reader, shape):
        avail = [p for p in fresh_params if p.ds_status == ZeroParamStatus.AVAILABLE and not p.ds_persist]
        seen.append((len(avail), sum(p.ds_numel for p in avail)))
        return real(conv, reader, shape)

    pre.materialize = watched
    try:
        reports = pre.load_pretrained(fresh, cfg.model, zero3=True)
    finally:
        pre.materialize = real
    out["available_during_load"] = seen
    out["reports"] = [r.__dict__ for r in reports]
    out["largest_param"] = {
        "encoder": max(p.ds_numel for p in fresh.encoder.parameters()),
        "text": max(p.ds_numel for p in fresh.text.parameters()),
    }
    out["total_numel"] = sum(p.ds_numel for p in fresh_params)
    # deepspeed.initialize marks the small parameters persistent and gathers them from the partitions
    # the load wrote: they must hold the checkpoint's values too
    deepspeed.initialize(model=fresh, optimizer=torch.optim.AdamW(fresh.parameters()), config=ds)
    out["persistent_count"] = sum(bool(p.ds_persist) for p in fresh_params)
    fresh_named = dict(fresh.named_parameters())
    with deepspeed.zero.GatheredParameters(fresh_params):
        diffs = {n: (fresh_named[n].detach() - t).abs().max().item() for n, t in loaded.items()}
    out["reload_max_diff"] = max(diffs.values())
    out["reload_bad"] = {n: d for n, d in diffs.items() if d > 0}
    torch.save(out, args.out / f"rank{rank}.pt")


if __name__ == "__main__":
    from mico_ds import distributed as mdist
    from mico_ds.distributed.launch import exit_now

    main()
    mdist.destroy()
    exit_now(0)  # without the interpreter's teardown of live Gloo groups (distributed/launch.py)
