"""MiCoModel: forward/backward per modality subset, objective wiring against hand-built references,
evaluation interface, determinism, full-size meta build, 2 gloo ranks."""

from __future__ import annotations

import dataclasses
from functools import partial
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from mico_ds.config import InputConfig, ModelConfig, RunConfig, TextConfig, VisionConfig
from mico_ds.data.schema import MODALITIES, TEXT_IDS, TEXT_MASK, TEXT_SOURCE, SpecialTokens
from mico_ds.kernels.contrastive import sample_hard_negatives_tiled
from mico_ds.models.mico import MiCoModel
from mico_ds.objectives.contrastive import resolve_impl
from mico_ds.objectives.generation import mask_caption_tokens
from mico_ds.objectives.matching import sample_hard_negatives
from mico_ds.objectives.seeding import RandomStream
from tests.helpers.ranks import run_ranks
from tests.helpers.tiny import make_random_batch, make_tiny_config, make_tiny_special

SUBSETS = [["image"], ["video", "audio"], ["depth", "normal"], list(MODALITIES)]
TOKENIZER_OF = {"image": "rgb", "video": "rgb", "audio": "audio", "depth": "depth", "normal": "normal"}


def _model(weights: tuple[float, float, float] = (1.0, 1.0, 1.0), **model_kw: object) -> MiCoModel:
    cfg = make_tiny_config(**model_kw)
    cfg.objectives.contrastive_weight, cfg.objectives.matching_weight, cfg.objectives.generation_weight = (
        weights
    )
    torch.manual_seed(0)
    model = MiCoModel.from_run_config(cfg, make_tiny_special())
    model.objective_impl = "naive"
    return model


@pytest.mark.parametrize("mods", SUBSETS, ids=["+".join(m) for m in SUBSETS])
def test_forward_backward_every_expected_parameter_gets_a_gradient(mods: list[str]) -> None:
    model = _model().train()
    batch = make_random_batch(make_tiny_config(), mods, batch_size=4, seed=1, joined=True)
    losses, report = model(batch)
    assert set(losses) == {"contrastive_loss", "matching_loss", "generation_loss", "loss"}
    for k, v in {**losses, **report}.items():
        assert v.ndim == 0 and torch.isfinite(v), k
    assert all(not v.requires_grad for v in report.values())
    torch.testing.assert_close(
        losses["loss"], losses["contrastive_loss"] + losses["matching_loss"] + losses["generation_loss"]
    )
    losses["loss"].backward()
    used_tokenizers = {TOKENIZER_OF[m] for m in mods}
    for name, p in model.named_parameters():
        tok = name.split(".")[2] if name.startswith("encoder.tokenizers.") else None
        if tok is not None and tok not in used_tokenizers:
            assert p.grad is None, name  # an absent modality's tokenizer is not run
        else:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
            assert torch.isfinite(p.grad).all(), name
    assert float(report["masked_tokens"]) > 0
    assert float(report["context_tokens"]) == sum(
        3 * {"video": 2, "audio": 2}.get(m, 1) for m in mods
    )  # tokens_per_frame=3, 2 frames, 2 clips


@pytest.mark.parametrize(
    ("weights", "no_grad_prefixes"),
    [
        ((1.0, 0.0, 1.0), ["match_head."]),
        ((1.0, 1.0, 0.0), []),
        ((1.0, 0.0, 0.0), ["match_head.", "prefix_proj."]),
        ((0.0, 0.0, 1.0), ["match_head.", "proj_z.", "proj_t.", "logit_scale.", "text_sam."]),
    ],
)
def test_zero_weight_terms_are_skipped(
    weights: tuple[float, float, float], no_grad_prefixes: list[str]
) -> None:
    model = _model(weights).train()
    losses, report = model(make_random_batch(make_tiny_config(), ["image"], 4, seed=2))
    for key, w in zip(("contrastive_loss", "matching_loss", "generation_loss"), weights):
        if w == 0:
            assert float(losses[key]) == 0 and not losses[key].requires_grad
        else:
            assert float(losses[key].detach()) > 0
    losses["loss"].backward()
    for name, p in model.named_parameters():
        if any(name.startswith(pre) for pre in no_grad_prefixes):
            assert p.grad is None, name
    assert ("masked_tokens" in report) == (weights[2] > 0)
    assert ("matching_balanced_acc" in report) == (weights[1] > 0)


def test_text_features_carry_the_sampling_embedding_of_each_token() -> None:
    # MiCo Eq. 3, text side: z_T = pool(f'(x_T) + E_Sam[source of each token]); without text_source
    # every token takes row 0 (text from one corpus), so retrieval features equal training's.
    model = _model().eval()
    batch = make_random_batch(make_tiny_config(), ["image"], 4, seed=5, joined=True)
    ids, mask, src = batch[TEXT_IDS], batch[TEXT_MASK], batch[TEXT_SOURCE]
    with torch.no_grad():
        model.text_sam.weight.normal_()
        hidden = model.text(ids, mask).hidden
        w = model.text_sam.weight
        m = mask.unsqueeze(-1).float()
        want = ((hidden + w[src]) * m).sum(1) / m.sum(1)
        torch.testing.assert_close(model.text_feature(ids, mask, src), want)
        want0 = ((hidden + w[0]) * m).sum(1) / m.sum(1)
        torch.testing.assert_close(model.text_feature(ids, mask), want0)
        torch.testing.assert_close(model.embed_text(ids, mask), F.normalize(model.proj_t(want0), dim=-1))
        # the training forward reads the batch's text_source
        a = model(batch)[0]["contrastive_loss"]
        b = model({k: v for k, v in batch.items() if k != TEXT_SOURCE})[0]["contrastive_loss"]
        assert not torch.isclose(a, b)
        with pytest.raises(ValueError, match="text_source"):
            model.text_feature(ids, mask, src[:, :-1])


def test_loss_is_the_weighted_sum() -> None:
    model = _model((2.0, 0.5, 3.0))
    losses, _ = model(make_random_batch(make_tiny_config(), ["image", "depth"], 4, seed=3))
    expect = (
        2.0 * losses["contrastive_loss"] + 0.5 * losses["matching_loss"] + 3.0 * losses["generation_loss"]
    )
    torch.testing.assert_close(losses["loss"], expect)


def test_invalid_weights_raise() -> None:
    with pytest.raises(ValueError, match="weights"):
        _model((0.0, 0.0, 0.0))
    with pytest.raises(ValueError, match="weights"):
        _model((1.0, -1.0, 0.0))


def test_generation_loss_equals_a_hand_built_reference() -> None:
    """CE only at the masked positions, predicting the original token, prefix in front (Eq. 6)."""
    model = _model((0.0, 0.0, 1.0)).eval()
    batch = make_random_batch(make_tiny_config(), ["video"], 3, seed=4)
    ids, mask = batch["text_ids"], batch["text_mask"]
    g = model.generator(RandomStream.GENERATION, 7, 0, ids.device)  # the draw forward(step=7) will make
    masked_ids, is_masked = mask_caption_tokens(ids, mask, 0.6, model.special, g)
    with torch.no_grad():
        losses, report = model(batch, step=7)
        prefix = model.context_prefix(batch)
        out = model.text(masked_ids, mask, prefix=prefix)
        logits = model.text.lm_logits(out.hidden[:, prefix.shape[1] :])  # (B, L, V)
        targets = ids.masked_fill(~is_masked, -100)  # unmasked positions do not count
        ref = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100)
    torch.testing.assert_close(losses["generation_loss"], ref)
    assert float(report["masked_tokens"]) == int(is_masked.sum())
    assert (masked_ids[is_masked] == model.special.mask_id).all() and is_masked.any()
    # the model's loss differs from CE over every text position: only masked ones count
    with torch.no_grad():
        every = F.cross_entropy(
            logits.flatten(0, 1), ids.masked_fill(mask == 0, -100).flatten(), ignore_index=-100
        )
    assert not torch.allclose(losses["generation_loss"], every)


@pytest.mark.parametrize(
    ("impl", "form", "k"),
    [
        ("naive", "pointwise", 1),
        ("torch", "pointwise", 1),
        ("naive", "listwise", 2),
        ("torch", "listwise", 3),
    ],
)
def test_matching_loss_equals_a_hand_built_reference(impl: str, form: str, k: int) -> None:
    """b(1 + 2k) pairs: positives, each context with k sampled hard-negative texts, each text with k
    sampled hard-negative contexts; mean BCE (Eq. 5) or, listwise, per query the cross-entropy of its
    positive among its 1 + k candidates. The tiled kernels sample by Gumbel-top-k over tiles."""
    model = _model((0.0, 1.0, 0.0)).eval()
    model.objective_impl = impl
    model.objective_cfg.matching_form, model.objective_cfg.matching_negatives = form, k
    tile = model.objective_cfg.contrastive_tile = 3  # several tiles over the 4 candidates
    sample = sample_hard_negatives if impl == "naive" else partial(sample_hard_negatives_tiled, tile=tile)
    batch = make_random_batch(make_tiny_config(), ["image", "audio"], 4, seed=5)
    ids, mask = batch["text_ids"], batch["text_mask"]
    with torch.no_grad():
        v_z, v_t = model.embed_knowledge(batch), model.embed_text(ids, mask)
        scale = model.logit_scale()
        g = model.generator(RandomStream.MATCHING, 3, 0, ids.device)
        pos = torch.arange(4)
        neg_t, ok_t = sample(v_z, v_t, scale, pos, g, num=k)
        neg_z, ok_z = sample(v_t, v_z, scale, pos, g, num=k)
        assert ok_t.all() and ok_z.all()  # random captions: nothing shares a caption hash
        prefix = model.context_prefix(batch)
        s_pos = model.matching_scores(prefix, ids, mask)  # (4,)
        s_t = torch.stack(
            [model.matching_scores(prefix, ids[neg_t[:, j]], mask[neg_t[:, j]]) for j in range(k)], 1
        )
        s_z = torch.stack([model.matching_scores(prefix[neg_z[:, j]], ids, mask) for j in range(k)], 1)
        if form == "pointwise":
            logits = torch.cat([s_pos, s_t.flatten(), s_z.flatten()])
            ref = F.binary_cross_entropy_with_logits(logits, torch.tensor([1.0] * 4 + [0.0] * 8 * k))
        else:
            ref = 0.0
            for neg in (s_t, s_z):
                for i in range(4):
                    row = torch.cat([s_pos[i : i + 1], neg[i]])
                    ref = ref + (torch.logsumexp(row, 0) - row[0]) / 8
        losses, report = model(batch, step=3)
    assert not (neg_t == pos[:, None]).any() and not (neg_z == pos[:, None]).any()
    assert all(len(set(r.tolist())) == k for r in (*neg_t, *neg_z))  # without replacement
    torch.testing.assert_close(losses["matching_loss"], torch.as_tensor(ref, dtype=torch.float32))
    negs = torch.cat([s_t.flatten(), s_z.flatten()])
    pos_acc, neg_acc = (s_pos > 0).float().mean(), (negs <= 0).float().mean()
    torch.testing.assert_close(report["matching_balanced_acc"], (pos_acc + neg_acc) / 2)
    top1 = torch.cat([(s_pos[:, None] > s_t).all(1), (s_pos[:, None] > s_z).all(1)]).float().mean()
    torch.testing.assert_close(report["matching_top1"], top1)


def test_contrastive_term_with_the_configured_kernel_equals_naive() -> None:
    model = _model((1.0, 0.0, 0.0))
    batch = make_random_batch(make_tiny_config(), ["image"], 4, seed=6)
    naive, _ = model(batch)
    model.objective_impl = make_tiny_config().model.kernels  # "torch": the tiled kernel
    assert resolve_impl(model.objective_impl, torch.device("cpu")) == "torch"
    tiled, _ = model(batch)
    torch.testing.assert_close(naive["contrastive_loss"], tiled["contrastive_loss"], rtol=1e-5, atol=1e-5)
    assert resolve_impl("auto", torch.device("cpu")) == "torch"
    assert resolve_impl("auto", torch.device("cuda", 0)) == "triton"


def test_seeded_and_step_dependent() -> None:
    batch = make_random_batch(make_tiny_config(), ["image"], 4, seed=7)
    a, b = _model(), _model()
    la, lb = a(batch, step=5)[0], b(batch, step=5)[0]
    for k in la:
        torch.testing.assert_close(la[k], lb[k])
    # the step (passed by the trainer with every micro-batch) reseeds masking and sampling
    lc = a(batch, step=6)[0]
    assert not torch.allclose(la["generation_loss"], lc["generation_loss"])
    # a second micro-batch of the same step draws new masks
    ld = a(batch, step=6, micro=1)[0]
    assert not torch.allclose(lc["generation_loss"], ld["generation_loss"])


def test_evaluation_interface() -> None:
    model = _model().eval()
    batch = make_random_batch(make_tiny_config(), ["image", "video"], 3, seed=8)
    ids, mask = batch["text_ids"], batch["text_mask"]
    with torch.no_grad():
        v_z, v_t = model.embed_knowledge(batch), model.embed_text(ids, mask)
        assert v_z.shape == v_t.shape == (3, 32)
        torch.testing.assert_close(v_z.norm(dim=1), torch.ones(3))
        torch.testing.assert_close(v_t.norm(dim=1), torch.ones(3))
        prefix = model.context_prefix(batch)
        assert prefix.shape == (3, 1 + 3 + 6, 64)  # [CTX] + image 3 + video 2x3, Llama hidden 64
        s_batch = model.matching_scores(batch, ids, mask)
        torch.testing.assert_close(s_batch, model.matching_scores(prefix, ids, mask))
        # next-token logits = LM head at the last valid text position of the prefixed pass
        logits, cache = model.next_token_logits(prefix, ids, mask)
        assert logits.shape == (3, 96) and cache is None
        h = model.text(ids, mask, prefix=prefix).hidden
        last = mask.sum(1) - 1 + prefix.shape[1]
        torch.testing.assert_close(logits, model.text.lm_logits(h[torch.arange(3), last]))


def test_incremental_decoding_with_cache_matches_recompute() -> None:
    model = _model().eval()
    batch = make_random_batch(make_tiny_config(), ["audio"], 2, seed=9)
    with torch.no_grad():
        prefix = model.context_prefix(batch)
        ids = torch.full((2, 1), model.special.bos_id)
        mask = torch.ones(2, 1, dtype=torch.long)
        logits, cache = model.next_token_logits(prefix, ids, mask, use_cache=True)
        full_mask = torch.ones(2, prefix.shape[1] + 1, dtype=torch.long)
        for _ in range(3):
            nxt = logits.argmax(-1, keepdim=True)
            ids = torch.cat([ids, nxt], dim=1)
            full_mask = torch.cat([full_mask, torch.ones(2, 1, dtype=torch.long)], dim=1)
            logits, cache = model.next_token_logits(
                None, nxt, full_mask, past_key_values=cache, use_cache=True
            )
            ref, _ = model.next_token_logits(prefix, ids, torch.ones_like(ids))
            torch.testing.assert_close(logits, ref, rtol=1e-4, atol=1e-4)


def test_prefix_tokens_limit() -> None:
    model = _model(context=dataclasses.replace(make_tiny_config().model.context, prefix_tokens=4))
    batch = make_random_batch(make_tiny_config(), ["video", "audio"], 2, seed=10)
    with torch.no_grad():
        assert model.context_prefix(batch).shape == (2, 4, 64)
    losses, _ = model(batch)
    assert torch.isfinite(losses["loss"])


def test_bad_batches_raise() -> None:
    model = _model()
    batch = make_random_batch(make_tiny_config(), ["image"], 2, seed=11)
    with pytest.raises(ValueError, match="none of the modalities"):
        model({k: v for k, v in batch.items() if k != "image"})
    with pytest.raises(ValueError, match="batch size"):
        model({**batch, "text_ids": batch["text_ids"][:1], "text_mask": batch["text_mask"][:1]})
    with pytest.raises(ValueError, match="hard-negative"):
        model(make_random_batch(make_tiny_config(), ["image"], 1, seed=11))  # one pair: no negative to mine


def test_full_size_builds_on_meta() -> None:
    """ViT-g/14 + Llama-2-7B, counted without allocating."""
    cfg = RunConfig(
        inputs=InputConfig(image_size=224),
        model=ModelConfig(
            vision=VisionConfig(patch_size=14, width=1408, depth=40, heads=16, mlp_dim=6144),
            text=TextConfig(),  # Llama-2-7B defaults
            embed_dim=512,
        ),
    )
    special = SpecialTokens(vocab_size=32000, pad_id=0, bos_id=1, eos_id=2, mask_id=3)
    with torch.device("meta"):
        model = MiCoModel.from_run_config(cfg, special)
    count = {k: sum(p.numel() for p in getattr(model, k).parameters()) for k in ("encoder", "text")}
    assert count["text"] == 6_738_415_616  # Llama-2-7B
    assert 1.0e9 < count["encoder"] < 1.02e9
    assert all(p.is_meta for p in model.parameters())


def _two_rank_model_worker(rank: int) -> dict[str, object]:
    model = _model()
    model.train()
    # different data and different caption lengths per rank; same modalities (same corpus per step)
    batch = make_random_batch(
        make_tiny_config(), ["image", "audio"], 3, seed=20 + rank, text_len=(9, 14)[rank]
    )
    losses, report = model(batch, step=1)
    losses["loss"].backward()
    grads_finite = all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    local_masked = float(
        sum(int((batch["text_mask"][i].sum() - 1) * 0.6 + 0.5) for i in range(3))
    )  # every real token but BOS is eligible (EOS included)
    return {
        "losses": {k: v.detach() for k, v in losses.items()},
        "report": report,
        "grads_finite": grads_finite,
        "local_masked": local_masked,
        "proj_t_grad": model.proj_t.net[0].weight.grad.clone(),
    }


@pytest.mark.slow
@pytest.mark.distributed
def test_two_gloo_ranks_forward_backward(tmp_path: Path) -> None:
    r0, r1 = run_ranks(_two_rank_model_worker, 2, tmp_path)
    for r in (r0, r1):
        assert all(torch.isfinite(v) for v in r["losses"].values())
        assert r["grads_finite"]
        assert float(r["report"]["masked_tokens"]) == r0["local_masked"] + r1["local_masked"]  # global count
    assert not torch.allclose(r0["proj_t_grad"], r1["proj_t_grad"])
