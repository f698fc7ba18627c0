"""MiCoModel built inside deepspeed.zero.Init and trained 2 steps by a ZeRO-3 engine (1 gloo rank).

DeepSpeed partitions each submodule's parameters as soon as its ``__init__`` returns, so any
initialization applied later by a parent would silently be lost; this checks that the partitioned
model holds exactly the weights the same seed gives without ZeRO, that the engine trains it with a
different modality subset per step, and that the evaluation methods (not ``forward``) work on it.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.helpers.ranks import run_ranks

DS_CONFIG = {
    "train_micro_batch_size_per_gpu": 4,
    "gradient_accumulation_steps": 1,
    "gradient_clipping": 1.0,
    "zero_allow_untested_optimizer": True,
    "zero_optimization": {
        "stage": 3,
        "stage3_param_persistence_threshold": 0,  # partition every parameter, however small
        "reduce_bucket_size": 1e5,
        "stage3_prefetch_bucket_size": 1e5,
    },
    "steps_per_print": 1_000_000,
}


def _zero3_worker(rank: int) -> dict[str, object]:
    import deepspeed

    from mico_ds.models.mico import MiCoModel
    from tests.helpers.tiny import make_random_batch, make_tiny_config, make_tiny_special

    deepspeed.init_distributed(dist_backend="gloo")
    cfg, special = make_tiny_config(), make_tiny_special()
    torch.manual_seed(0)
    plain = MiCoModel.from_run_config(cfg, special).eval()
    ref = {n: p.detach().clone() for n, p in plain.named_parameters()}

    torch.manual_seed(0)
    with deepspeed.zero.Init(config_dict_or_path=DS_CONFIG):
        model = MiCoModel.from_run_config(cfg, special)
    model.objective_impl = "naive"
    params = dict(model.named_parameters())
    partitioned = [n for n, p in params.items() if hasattr(p, "ds_id") and p.data.numel() == 0]
    with deepspeed.zero.GatheredParameters(list(params.values())):
        mismatched = [n for n, p in params.items() if not torch.equal(p.data, ref[n])]

    optim = torch.optim.AdamW(model.parameters(), lr=1e-3)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optim, config=DS_CONFIG)

    batch = make_random_batch(cfg, ["image", "audio"], 4, seed=0, joined=True)
    engine.eval()
    with torch.no_grad():  # evaluation methods on the ZeRO-3 module vs the plain model
        eval_diff = max(
            float(
                (
                    engine.module.embed_text(batch["text_ids"], batch["text_mask"])
                    - plain.embed_text(batch["text_ids"], batch["text_mask"])
                )
                .abs()
                .max()
            ),
            float((engine.module.embed_knowledge(batch) - plain.embed_knowledge(batch)).abs().max()),
            float(
                (
                    engine.module.matching_scores(batch, batch["text_ids"], batch["text_mask"])
                    - plain.matching_scores(batch, batch["text_ids"], batch["text_mask"])
                )
                .abs()
                .max()
            ),
        )
    engine.train()
    losses_per_step = []
    for step, mods in enumerate([["image", "audio"], ["video", "depth", "normal"]]):
        batch = make_random_batch(cfg, mods, 4, seed=step, joined=True)
        losses, _ = engine(batch, step=step)
        engine.backward(losses["loss"])
        engine.step()
        losses_per_step.append({k: float(v) for k, v in losses.items()})
    with deepspeed.zero.GatheredParameters(list(params.values())):
        unchanged = [n for n, p in params.items() if torch.equal(p.data, ref[n])]
    return {
        "n_params": len(params),
        "partitioned": partitioned,
        "mismatched": mismatched,
        "eval_diff": eval_diff,
        "losses": losses_per_step,
        "unchanged": unchanged,
    }


@pytest.mark.distributed
def test_zero3_init_same_weights_and_two_train_steps(tmp_path: Path) -> None:
    (r,) = run_ranks(_zero3_worker, 1, tmp_path)
    assert len(r["partitioned"]) == r["n_params"]  # zero.Init really partitioned everything
    assert r["mismatched"] == []
    assert r["eval_diff"] < 1e-5
    for losses in r["losses"]:
        assert all(v == v and abs(v) < 1e4 for v in losses.values()), losses  # finite
        assert losses["loss"] > 0
    # after two AdamW steps only never-used rows' owners stay put: nothing should be fully unchanged
    assert r["unchanged"] == []
