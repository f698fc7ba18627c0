"""Omni-modal matching with hard negatives (MiCo Eq. 5), ALBEF-style mining over the global batch.

For each local context one negative text, and for each local text one negative context, are drawn
from the softmax of the GLOBAL similarities (local rows vs all-gathered columns, no gradient through
the sampling) with the positive excluded, so negatives may live on another rank. The matching head
scores 3b pairs per rank (b positives, b context-with-negative-text, b text-with-negative-context) and
the loss is the mean binary cross-entropy over them. All ranks hold the same b, so the rank-averaged
gradient (DeepSpeed) is the gradient of the global mean.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mico_ds.distributed import all_gather_no_grad, dist_max
from mico_ds.objectives.contrastive import resolve_impl


@torch.no_grad()
def sample_hard_negatives(
    q_local: torch.Tensor,
    k_global: torch.Tensor,
    logit_scale: torch.Tensor | float,
    positive_idx: torch.Tensor,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Draw one hard negative per query from softmax(scale * q @ k^T) with the positive removed.

    Args:
        q_local: (b, E) queries of this rank.
        k_global: (n, E) candidate keys (all ranks), n >= 2.
        logit_scale: inverse temperature of the sampling softmax.
        positive_idx: (b,) global index of each query's positive (never drawn).
        generator: a torch.Generator on the queries' device (reproducible draws).

    Returns:
        (b,) int64 global indices into ``k_global``.
    """
    if k_global.shape[0] < 2:
        raise ValueError(
            f"hard-negative mining needs at least 2 candidates in the global batch, got {k_global.shape[0]} "
            "(raise the batch size or set objectives.matching_weight=0)"
        )
    scale = torch.as_tensor(logit_scale, device=q_local.device).detach().float()  # no host sync
    sim = scale * (q_local.float() @ k_global.float().T)  # (b, n)
    sim[torch.arange(q_local.shape[0], device=sim.device), positive_idx] = float("-inf")
    probs = torch.softmax(sim, dim=1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


def mine_hard_negatives(
    q_local: torch.Tensor,
    k_global: torch.Tensor,
    logit_scale: torch.Tensor,
    positive_idx: torch.Tensor,
    generator: torch.Generator,
    impl: str = "naive",
    tile: int = 1024,
) -> torch.Tensor:
    """One hard negative per query, by the objectives' implementation (:func:`resolve_impl`): the
    softmax of the full similarities ("naive"), or Gumbel-max over column tiles (the same
    distribution, O(b x tile) memory: ``mico_ds.kernels.contrastive.sample_hard_negatives_tiled``)."""
    if resolve_impl(impl, q_local.device) == "naive":
        return sample_hard_negatives(q_local, k_global, logit_scale, positive_idx, generator)
    from mico_ds.kernels.contrastive import sample_hard_negatives_tiled

    return sample_hard_negatives_tiled(q_local, k_global, logit_scale, positive_idx, generator, tile=tile)


@torch.no_grad()
def gather_texts(
    text_ids: torch.Tensor, text_mask: torch.Tensor, pad_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """All-gather (no grad) token ids and masks whose length may differ across ranks.

    Pads to the global maximum length first (one scalar all-reduce; its ``.item()`` is a host sync).

    Returns:
        (ids_local, mask_local, ids_all, mask_all): local tensors padded to the global length L_g,
        and the (world*b, L_g) gathered ones.
    """
    length = torch.tensor([text_ids.shape[1]], device=text_ids.device)
    lg = int(dist_max(length).item())  # host sync
    pad = lg - text_ids.shape[1]
    if pad:
        text_ids = F.pad(text_ids, (0, pad), value=pad_id)
        text_mask = F.pad(text_mask, (0, pad), value=0)
    return text_ids, text_mask, all_gather_no_grad(text_ids), all_gather_no_grad(text_mask)


def matching_labels(b: int, device: torch.device | str) -> torch.Tensor:
    """Labels of the 3b pairs in the order the model scores them: b positives, then 2b negatives."""
    return torch.cat([torch.ones(b, device=device), torch.zeros(2 * b, device=device)])


def matching_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean binary cross-entropy over the scored pairs (MiCo Eq. 5). logits, labels: (3b,)."""
    dtype = torch.promote_types(logits.dtype, torch.float32)
    return F.binary_cross_entropy_with_logits(logits.to(dtype), labels.to(dtype))
