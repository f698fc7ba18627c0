"""Masked causal caption generation (MiCo Eq. 6), VAST's convention.

A fraction ``mask_ratio`` (paper: 60%) of each caption's eligible tokens (real tokens that are not
BOS/pad; EOS is eligible, so the decoder learns where a caption ends and captioning can stop) is
replaced by ``<mask>`` in the input. The decoder reads the context prefix and the
masked caption with causal attention, and at every masked position the LM head predicts the ORIGINAL
token of that position (BERT-style reconstruction from the prefix and the tokens before it).

Masking is exact, not Bernoulli: each caption gets exactly round(mask_ratio * n_eligible) masked
tokens (round half up), chosen uniformly without replacement from a seeded generator.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mico_ds.data.schema import SpecialTokens
from mico_ds.distributed import all_reduce_sum, get_world_size


def mask_caption_tokens(
    text_ids: torch.Tensor,
    text_mask: torch.Tensor,
    mask_ratio: float,
    special: SpecialTokens,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Replace exactly round(mask_ratio * n_i) eligible tokens of each row by ``special.mask_id``.

    Args:
        text_ids, text_mask: (B, L).
        mask_ratio: fraction in (0, 1].
        special: ids of BOS and pad (never masked), of EOS (maskable: a target like any word) and of <mask>.
        generator: torch.Generator on any device: the noise is drawn there and moved to
            ``text_ids.device`` (from a CPU generator, a CPU and a GPU run draw the same masks).

    Returns:
        masked_ids (B, L) and is_masked (B, L) bool.
    """
    if not 0.0 < mask_ratio <= 1.0:
        raise ValueError(f"objectives.mask_ratio must be in (0, 1], got {mask_ratio}")
    eligible = text_mask.bool()
    for tid in (special.bos_id, special.pad_id):
        eligible &= text_ids != tid
    k = torch.floor(eligible.sum(dim=1).double() * mask_ratio + 0.5).long()  # (B,)
    where = generator.device if generator is not None else text_ids.device
    noise = torch.rand(text_ids.shape, generator=generator, device=where).to(text_ids.device)
    noise = noise.masked_fill(~eligible, 2.0)  # ineligible tokens sort last
    rank = noise.argsort(dim=1).argsort(dim=1)  # rank of each token's noise within its row
    is_masked = rank < k.unsqueeze(1)
    return text_ids.masked_fill(is_masked, special.mask_id), is_masked


def generation_loss(logits_nV: torch.Tensor, targets_n: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy at the masked positions, normalized by the GLOBAL number of masked tokens.

    Returns ``sum_local_CE * world_size / global_masked_count``. DeepSpeed averages gradients over
    ranks (divides by world_size), so the rank-averaged gradient equals the gradient of
    sum_all_ranks_CE / global_masked_count, the mean over every masked token of the global batch,
    whatever the per-rank counts. The per-rank value is therefore not a mean by itself; its average
    over ranks is the global mean.

    Args:
        logits_nV: (n, V) LM logits at this rank's n masked positions.
        targets_n: (n,) original token ids at those positions.

    Returns:
        (loss (), global_count ()) -- the count as a float tensor, for logging.
    """
    dtype = torch.promote_types(logits_nV.dtype, torch.float32)  # log-softmax in fp32 at least
    local_sum = F.cross_entropy(logits_nV.to(dtype), targets_n, reduction="sum")
    count = torch.tensor(float(targets_n.numel()), device=logits_nV.device, dtype=dtype)
    global_count = all_reduce_sum(count)
    return local_sum * get_world_size() / global_count.clamp(min=1.0), global_count


def target_rows(
    text_ids: torch.Tensor, targets: torch.Tensor, mask_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One decoder row per target token, as the captioning decoder generates (``mico_ds.eval.captioning``).

    To generate the token at position t the decoder reads the real tokens before t and ``<mask>`` at t
    under a causal mask; so row r, for the target (i, t), is row i of ``text_ids`` with ``<mask>`` at t
    and predicts the original token there. Under causal attention the tokens after t do not reach it,
    so they stay as they are. (Masking all targets of a row at once would show the later targets
    ``<mask>`` where decoding shows the tokens it generated.)

    Args:
        text_ids: (B, L); targets: (B, L) bool, the positions to predict (a task's ``gen_targets``).

    Returns:
        source row of each new row (R,), masked ids (R, L), is_masked (R, L) (one True per row).
    """
    src, pos = targets.bool().nonzero(as_tuple=True)
    masked = text_ids[src].clone()
    rows = torch.arange(src.shape[0], device=text_ids.device)
    masked[rows, pos] = mask_id
    is_masked = torch.zeros_like(masked, dtype=torch.bool)
    is_masked[rows, pos] = True
    return src, masked, is_masked
