"""The grounding diagnostic: own- vs other-context generation loss and matching preference."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mico_ds.eval.grounding import evaluate_grounding
from mico_ds.models.mico import MiCoModel
from mico_ds.objectives.generation import mask_caption_tokens
from tests.helpers.tiny import make_random_batch, make_tiny_config, make_tiny_special


def _model() -> MiCoModel:
    torch.manual_seed(0)
    return MiCoModel.from_run_config(make_tiny_config(), make_tiny_special()).eval()


def _batch(model: MiCoModel, seed: int, valid: list[bool]) -> dict:
    b = make_random_batch(make_tiny_config(), ["image", "audio"], len(valid), seed=seed)
    b["valid"] = torch.tensor(valid)
    return b


def test_own_context_loss_is_the_masked_cross_entropy_and_the_other_is_the_rolled_context() -> None:
    model = _model()
    batch = _batch(model, 1, [True, True, True, False])  # the padding row is neither used nor counted
    res = evaluate_grounding(model, [batch], mask_ratio=0.6, seed=3)
    ids, mask = batch["text_ids"], batch["text_mask"]
    g = torch.Generator().manual_seed(3 * 1_000_003)  # the task's seed for batch 0 on rank 0
    masked, is_masked = mask_caption_tokens(ids, mask, 0.6, model.special, g)
    is_masked[3] = False
    with torch.no_grad():
        prefix = model.context_prefix(batch)
        losses = []
        for pf in (prefix, prefix[[2, 0, 1, 3]]):
            h = model.text(masked, mask, prefix=pf).hidden[:, pf.shape[1] :]
            losses.append(F.cross_entropy(model.text.lm_logits(h[is_masked]), ids[is_masked]).item())
        own = model.matching_scores(prefix, ids, mask)[:3]
        other = model.matching_scores(prefix[[2, 0, 1, 3]], ids, mask)[:3]
    assert res["grounding/n"] == 3
    assert abs(res["grounding/gen_loss_own"] - losses[0]) < 1e-5
    assert abs(res["grounding/gen_loss_other"] - losses[1]) < 1e-5
    assert res["grounding/gen_gain"] != 0  # a random model's output depends on its prefix
    assert res["grounding/match_pairwise_acc"] == int((own > other).sum()) / 3


def test_a_text_branch_that_cannot_see_the_context_gains_nothing() -> None:
    model = _model()
    with torch.no_grad():
        for p in model.prefix_proj.parameters():
            p.zero_()  # every item's prefix is the same (zero) vector: nothing to read
    batches = [_batch(model, 2, [True] * 4), _batch(model, 3, [True, False, False, False])]
    res = evaluate_grounding(model, batches, mask_ratio=0.6)
    assert res["grounding/n"] == 4  # a batch with one valid item has nothing to roll: not counted
    assert res["grounding/gen_gain"] == 0.0
    assert res["grounding/match_pairwise_acc"] == 0.0  # equal logits are not a preference


def test_no_countable_items_gives_no_figures() -> None:
    model = _model()
    assert evaluate_grounding(model, [_batch(model, 4, [True, False])], mask_ratio=0.6) == {}
