"""Zero-shot retrieval between knowledge contexts and texts from the contrastive features.

``retrieval_metrics`` is a pure function of the two feature matrices; ``evaluate_retrieval`` runs a
model over an evaluation loader on every rank, gathers the features, and reports R@1/5/10 both ways.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from mico_ds import distributed as mdist


def _ranks_of_positive(sim: torch.Tensor) -> torch.Tensor:
    """0-based rank of the diagonal entry in each row of ``sim`` (N, N), ties counted pessimistically."""
    pos = sim.diagonal().unsqueeze(1)
    return (sim > pos).sum(dim=1) + ((sim == pos).sum(dim=1) - 1)


def retrieval_metrics(
    k_feats: torch.Tensor, t_feats: torch.Tensor, prefix: str = "retrieval/"
) -> dict[str, float]:
    """R@1/5/10 and median rank for text->knowledge (t2k) and knowledge->text (k2t).

    Row i of ``k_feats`` (N, E) and of ``t_feats`` (N, E) are a matching pair; features are L2-normalized.
    Chance R@1 is 1/N.
    """
    if k_feats.shape != t_feats.shape:
        raise ValueError(
            f"feature shapes differ: knowledge {tuple(k_feats.shape)} vs text {tuple(t_feats.shape)}"
        )
    sim = k_feats.float() @ t_feats.float().T  # (N knowledge, N text)
    out: dict[str, float] = {f"{prefix}n": float(sim.shape[0])}
    for name, s in (("t2k", sim.T), ("k2t", sim)):
        r = _ranks_of_positive(s)
        for k in (1, 5, 10):
            out[f"{prefix}{name}_r{k}"] = (r < k).float().mean().item() * 100
        out[f"{prefix}{name}_medr"] = r.float().median().item() + 1
    return out


@torch.no_grad()
def evaluate_retrieval(
    model: Any, batches: Iterable[dict[str, Any]], num_batches: int, max_samples: int
) -> dict[str, float]:
    """Embed ``num_batches`` batches on every rank (the same count everywhere: ZeRO-3 gathers
    parameters collectively) and compute retrieval over the gathered features.

    ``model`` exposes embed_knowledge(batch) and embed_text(ids, mask); batches carry ``valid`` (B,) bool
    when a rank pads its share with repeated samples.
    """
    ks, ts, valid = [], [], []
    it = iter(batches)
    for _ in range(num_batches):
        batch = next(it)
        ks.append(model.embed_knowledge(batch).float())
        ts.append(model.embed_text(batch["text_ids"], batch["text_mask"]).float())
        valid.append(batch["valid"].to(ks[-1].device))
    k = mdist.all_gather_variable(torch.cat(ks))
    t = mdist.all_gather_variable(torch.cat(ts))
    v = mdist.all_gather_variable(torch.cat(valid).to(torch.uint8)).bool()
    k, t = k[v][:max_samples], t[v][:max_samples]
    return retrieval_metrics(k, t)
