"""Does the text branch read the multimodal context? A diagnostic for the prefixed LLM passes.

Retrieval only tests the contrastive features; captioning and matching go through the LLM with the
context as a prefix, and a small or young model can learn both as a pure language model that ignores
the prefix. This task measures that directly on held-out items, each with its own context and with the
context of another item of the same batch (rolled by one):

- ``grounding/gen_loss_own`` / ``gen_loss_other``: the generation objective's loss (MiCo Eq. 6: the
  same seeded 60% masking, cross-entropy at the masked positions) with the right and with a wrong
  context; ``gen_gain`` = other - own, in nats per masked token (0: the context is not used);
- ``grounding/match_pairwise_acc``: the fraction of items whose matching logit (Eq. 5) is higher with
  their own context than with the wrong one (0.5: the matching head does not look at the context).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F

from mico_ds import distributed as mdist
from mico_ds.data import schema
from mico_ds.objectives.generation import mask_caption_tokens


@torch.no_grad()
def evaluate_grounding(
    model: Any,
    batches: Iterable[dict[str, Any]],
    mask_ratio: float,
    seed: int = 0,
    prefix: str = "grounding/",
) -> dict[str, float]:
    """Own-context vs other-context generation loss and matching preference, summed over all ranks.

    Every rank must pass the same number of batches (ZeRO-3); items with ``valid`` False and batches
    with fewer than 2 valid items (nothing to roll) run the same passes but are not counted.
    """
    sums = torch.zeros(5, dtype=torch.float64)  # CE own, CE other, masked tokens, pos > neg, items
    device: torch.device | str = "cpu"
    for i, batch in enumerate(batches):
        ids, mask = batch[schema.TEXT_IDS], batch[schema.TEXT_MASK]
        device = ids.device
        valid = batch.get("valid", torch.ones(ids.shape[0], dtype=torch.bool, device=ids.device))
        keep = valid.nonzero().flatten()
        prefix_emb = model.context_prefix(batch)
        # the other context: the next valid item's (padding rows keep their own, and are not counted)
        other = torch.arange(ids.shape[0], device=ids.device)
        if keep.numel() > 1:
            other[keep] = keep.roll(1)
        g = torch.Generator(device=ids.device).manual_seed(seed * 1_000_003 + i * 7919 + mdist.get_rank())
        masked, is_masked = mask_caption_tokens(ids, mask, mask_ratio, model.special, g)
        is_masked &= valid[:, None]
        ce = []
        for pf in (prefix_emb, prefix_emb[other]):
            h = model.text(masked, mask, prefix=pf).hidden[:, pf.shape[1] :]
            logits = model.text.lm_logits(h[is_masked]).float()
            ce.append(F.cross_entropy(logits, ids[is_masked], reduction="sum"))
        own = model.matching_scores(prefix_emb, ids, mask)
        wrong = model.matching_scores(prefix_emb[other], ids, mask)
        if keep.numel() > 1:
            sums += torch.tensor(
                [
                    float(ce[0]),
                    float(ce[1]),
                    float(is_masked.sum()),
                    float((own[keep] > wrong[keep]).sum()),
                    float(keep.numel()),
                ],
                dtype=torch.float64,
            )
    total = mdist.all_reduce_sum(sums.to(device)).cpu()
    if total[4] == 0:
        return {}
    own_loss, other_loss = float(total[0] / total[2]), float(total[1] / total[2])
    return {
        f"{prefix}gen_loss_own": own_loss,
        f"{prefix}gen_loss_other": other_loss,
        f"{prefix}gen_gain": other_loss - own_loss,
        f"{prefix}match_pairwise_acc": float(total[3] / total[4]),
        f"{prefix}n": float(total[4]),
    }
