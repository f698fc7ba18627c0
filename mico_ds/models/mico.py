"""MiCoModel: omni-encoder + multimodal context + Llama text branch + the three objectives.

This is the module ``deepspeed.initialize`` wraps (DESIGN.md §5). Top-level submodules, named so the
trainer can build parameter groups by prefix:

    encoder      OmniEncoder: shared ViT + per-modality tokenizers        (vision branch)
    context      MultimodalContext: E_C, E_M, E_Pos, E_Sam + [CTX] fusion
    text         TextBranch: LlamaForCausalLM                              (text branch)
    proj_z       ProjectionHead: z -> contrastive space
    proj_t       ProjectionHead: pooled text feature -> contrastive space
    match_head   MatchHead: LLM hidden state -> matching logit
    prefix_proj  PrefixProjector: fused context tokens -> LLM prefix embeddings
    logit_scale  LogitScale: learnable inverse temperature (log-parameterized)

ZeRO-3 rules this file keeps: parameters are only read inside the ``forward`` of the module that owns
them (ZeRO-3 gathers a module's parameters in its forward pre-hook), the root owns no parameter of
its own (so the evaluation methods below, which are not ``forward``, are safe), and which modules and
collectives run depends only on the config and on the batch's modality set, which is the same on
every rank at a given step (one corpus per step, chosen by a schedule every rank computes).

Shape legend: B local batch, L text tokens, P prefix tokens, D ViT width, H Llama hidden, E embed_dim.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mico_ds.config import RunConfig
from mico_ds.data.schema import MODALITIES, SAMPLE_SOURCE, TEXT_IDS, TEXT_MASK, SpecialTokens
from mico_ds.distributed import all_gather_no_grad, all_gather_with_grad, get_rank
from mico_ds.kernels.contrastive import sample_hard_negatives_tiled
from mico_ds.models.context import MultimodalContext
from mico_ds.models.heads import LogitScale, MatchHead, PrefixProjector, ProjectionHead
from mico_ds.models.omni_encoder import OmniEncoder
from mico_ds.models.text_branch import TextBranch, last_valid_index
from mico_ds.objectives.contrastive import contrastive_loss, in_batch_top1
from mico_ds.objectives.generation import generation_loss, mask_caption_tokens
from mico_ds.objectives.matching import gather_texts, matching_labels, matching_loss, sample_hard_negatives

LOSS_KEYS = ("contrastive_loss", "matching_loss", "generation_loss")

# Random streams of one forward pass (each gets its own generator).
_STREAM_MATCHING = 1
_STREAM_GENERATION = 2


def present_modalities(batch: dict[str, Any]) -> list[str]:
    """Knowledge modalities present in a batch, in canonical order."""
    return [m for m in MODALITIES if batch.get(m) is not None]


class MiCoModel(nn.Module):
    """The MiCo model and its pretraining objectives (MiCo Eq. 1-6).

    Args:
        cfg: the run config (model sizes, input geometry, objective weights, train.seed).
        special: the tokenizer's vocabulary size and special ids.

    Attributes the trainer may set:
        step: the optimizer step; seeds the masking and hard-negative sampling together with
            ``cfg.train.seed``, the rank and the micro-batch index (use :meth:`set_step`, or put
            ``batch["step"]``: a new value there calls ``set_step``).
        contrastive_impl: None (from ``cfg.model.kernels``) or an explicit ``contrastive_loss`` impl.
    """

    def __init__(self, cfg: RunConfig, special: SpecialTokens) -> None:
        super().__init__()
        m, o = cfg.model, cfg.objectives
        weights = {k: getattr(o, f"{k.split('_')[0]}_weight") for k in LOSS_KEYS}
        if any(w < 0 for w in weights.values()) or not any(w > 0 for w in weights.values()):
            raise ValueError(f"objectives weights must be >= 0 with at least one > 0, got {weights}")
        if m.context.prefix_tokens is not None and m.context.prefix_tokens < 1:
            raise ValueError(
                f"model.context.prefix_tokens must be >= 1 or null, got {m.context.prefix_tokens}"
            )
        self.cfg = cfg
        self.special = special
        self.weights = weights
        self.encoder = OmniEncoder(m.vision, cfg.inputs, m.context.tokens_per_frame)
        self.context = MultimodalContext(m.vision.width, m.context, m.vision, kernels=m.kernels)
        self.text = TextBranch(m.text, special)
        h = self.text.hidden_size
        self.proj_z = ProjectionHead(m.vision.width, m.embed_dim)
        self.proj_t = ProjectionHead(h, m.embed_dim)
        self.match_head = MatchHead(h)
        self.prefix_proj = PrefixProjector(m.vision.width, h)
        self.logit_scale = LogitScale(o.init_temperature, o.max_logit_scale)
        self.seed = cfg.train.seed
        self.step = 0
        self._micro = 0
        self.contrastive_impl: str | None = None

    # ------------------------------------------------------------------ seeding / config

    def set_step(self, step: int) -> None:
        """Set the optimizer step (seeds this step's masking / sampling); resets the micro-batch index."""
        self.step = int(step)
        self._micro = 0

    def _generator(self, device: torch.device, stream: int) -> torch.Generator:
        """A generator seeded from (train.seed, step, micro-batch, rank, stream): reproducible runs,
        independent draws per rank and per objective."""
        key = [self.seed, self.step, self._micro, get_rank(), stream]
        seed = int(np.random.SeedSequence(key).generate_state(1, dtype=np.uint64)[0])
        return torch.Generator(device=device).manual_seed(seed)

    def _contrastive_impl(self, device: torch.device) -> str:
        if self.contrastive_impl is not None:
            return self.contrastive_impl
        k = self.cfg.model.kernels
        if k == "auto":
            return "triton" if device.type == "cuda" else "torch"
        return k

    # ------------------------------------------------------------------ building blocks

    def _check_batch(self, batch: dict[str, Any]) -> list[str]:
        present = present_modalities(batch)
        if not present:
            raise ValueError(f"batch carries none of the modalities {MODALITIES}; keys: {sorted(batch)}")
        b = batch[present[0]].shape[0]
        for key in [*present, TEXT_IDS, TEXT_MASK]:
            if key not in batch:
                raise ValueError(f"batch is missing {key!r}; keys: {sorted(batch)}")
            if batch[key].shape[0] != b:
                raise ValueError(
                    f"batch[{key!r}] has batch size {batch[key].shape[0]}, batch[{present[0]!r}] has {b}"
                )
        if batch[TEXT_IDS].shape != batch[TEXT_MASK].shape or batch[TEXT_IDS].ndim != 2:
            raise ValueError(
                f"batch text_ids {tuple(batch[TEXT_IDS].shape)} and "
                f"text_mask {tuple(batch[TEXT_MASK].shape)} must both be (B, L)"
            )
        return present

    def encode_context(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """Knowledge modalities -> (z (B, D), fused context tokens (B, 1 + L_ctx, D)), MiCo Eq. 1/3."""
        present = present_modalities(batch)
        if not present:
            raise ValueError(f"batch carries none of the modalities {MODALITIES}; keys: {sorted(batch)}")
        tokens = {m: self.encoder(batch[m], m) for m in present}
        return self.context(tokens, batch.get(SAMPLE_SOURCE))

    def _select_prefix(self, fused: torch.Tensor) -> torch.Tensor:
        """[CTX] + context tokens, average-pooled to ``model.context.prefix_tokens`` in total if set."""
        n = self.cfg.model.context.prefix_tokens
        if n is None or n >= fused.shape[1]:
            return fused
        if n == 1:
            return fused[:, :1]
        pooled = F.adaptive_avg_pool1d(fused[:, 1:].transpose(1, 2), n - 1).transpose(1, 2)
        return torch.cat([fused[:, :1], pooled], dim=1)

    # ------------------------------------------------------------------ evaluation interface

    def context_prefix(self, batch: dict[str, Any]) -> torch.Tensor:
        """LLM prefix embeddings (B, P, H) of a batch's knowledge modalities."""
        _, fused = self.encode_context(batch)
        return self.prefix_proj(self._select_prefix(fused))

    def embed_knowledge(self, batch: dict[str, Any]) -> torch.Tensor:
        """L2-normalized knowledge features v_z (B, E) (retrieval)."""
        z, _ = self.encode_context(batch)
        return F.normalize(self.proj_z(z).float(), dim=-1)

    def embed_text(self, text_ids: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        """L2-normalized text features v_t (B, E) (retrieval)."""
        return F.normalize(self.proj_t(self.text.text_features(text_ids, text_mask)).float(), dim=-1)

    def matching_scores(
        self, batch_or_prefix: dict[str, Any] | torch.Tensor, text_ids: torch.Tensor, text_mask: torch.Tensor
    ) -> torch.Tensor:
        """Matching logits (B,) of pairs (knowledge_i, text_i) (retrieval re-ranking).

        Args:
            batch_or_prefix: a batch (its modalities are encoded) or prefix embeddings (B, P, H) from
                :meth:`context_prefix`, e.g. cached for the top-k candidates of each query.
            text_ids, text_mask: (B, L) the texts to pair with.
        """
        prefix = batch_or_prefix if torch.is_tensor(batch_or_prefix) else self.context_prefix(batch_or_prefix)
        out = self.text(text_ids, text_mask, prefix=prefix)
        h = out.hidden[:, prefix.shape[1] :]
        return self.match_head(h[torch.arange(h.shape[0], device=h.device), last_valid_index(text_mask)])

    def next_token_logits(
        self,
        prefix: torch.Tensor | None,
        text_ids: torch.Tensor,
        text_mask: torch.Tensor,
        past_key_values: Any = None,
        use_cache: bool = False,
    ) -> tuple[torch.Tensor, Any]:
        """Logits (B, V) of the token after the last real text token, conditioned on a context prefix.

        Without a cache: ``prefix`` (B, P, H) from :meth:`context_prefix`, ``text_ids``/``text_mask``
        (B, L) the right-padded text so far. Incremental decoding: the first call passes the prefix,
        the start tokens and ``use_cache=True``; later calls pass ``prefix=None``, only the new tokens
        (B, 1), the mask of the WHOLE sequence so far (prefix + all text, (B, P + L_so_far)) and the
        returned cache (reorder it for beam search with the transformers Cache API).

        Returns:
            (logits (B, V) float32, the cache or None).
        """
        out = self.text(
            text_ids, text_mask, prefix=prefix, past_key_values=past_key_values, use_cache=use_cache
        )
        if past_key_values is None:
            last = last_valid_index(out.mask)
        else:  # only new positions were fed: the last of them
            last = torch.full((text_ids.shape[0],), text_ids.shape[1] - 1, device=text_ids.device)
        h = out.hidden[torch.arange(text_ids.shape[0], device=text_ids.device), last]
        return self.text.lm_logits(h).float(), out.past_key_values

    # ------------------------------------------------------------------ training forward

    def forward(self, batch: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Compute the weighted MiCo objectives on one batch (schema: mico_ds/data/schema.py).

        Returns:
            losses: ``contrastive_loss``, ``matching_loss``, ``generation_loss`` (zero, detached, for a
                term whose config weight is 0: it is not computed) and ``loss`` = weighted sum.
            report: detached scalars: logit_scale, context_tokens, and when computed
                retrieval_acc_k2t / retrieval_acc_t2k (in-batch top-1, local rows vs global columns),
                matching_acc, masked_tokens (global count).
        """
        self._check_batch(batch)
        step = batch.get("step")  # the trainer may pass the optimizer step in the batch
        if step is not None and int(step) != self.step:
            self.set_step(int(step))
        ids, mask = batch[TEXT_IDS], batch[TEXT_MASK]
        o, w = self.cfg.objectives, self.weights
        b, rank = ids.shape[0], get_rank()
        z, fused = self.encode_context(batch)
        scale = self.logit_scale()
        losses: dict[str, torch.Tensor] = {}
        report: dict[str, torch.Tensor] = {
            "logit_scale": scale.detach(),
            "context_tokens": torch.tensor(float(fused.shape[1] - 1), device=z.device),
        }

        # Eq. 4: global features (with grad for the loss, without for mining / accuracy). With a
        # tiled kernel (every impl but "naive") nothing below holds the (b, world*b) similarities.
        impl = self._contrastive_impl(z.device)
        if w["contrastive_loss"] > 0 or w["matching_loss"] > 0:
            v_z = F.normalize(self.proj_z(z).float(), dim=-1)
            v_t = F.normalize(self.proj_t(self.text.text_features(ids, mask)).float(), dim=-1)
            z_all, t_all = all_gather_no_grad(v_z.detach()), all_gather_no_grad(v_t.detach())
            report["retrieval_acc_k2t"] = in_batch_top1(v_z.detach(), t_all, rank, o.contrastive_tile)
            report["retrieval_acc_t2k"] = in_batch_top1(v_t.detach(), z_all, rank, o.contrastive_tile)
            if w["contrastive_loss"] > 0:
                losses["contrastive_loss"] = contrastive_loss(
                    v_z, v_t, scale, impl=impl, tile=o.contrastive_tile
                )

        # Eq. 5 and 6 share ONE prefixed decoder pass (one parameter gather of the LLM under ZeRO-3):
        # rows [0, 3b) are matching pairs, rows [3b, 4b) (or [0, b)) the masked captions.
        if w["matching_loss"] > 0 or w["generation_loss"] > 0:
            prefix = self.prefix_proj(self._select_prefix(fused))  # (B, P, H)
            p = prefix.shape[1]
            rows_prefix, rows_ids, rows_mask = [], [], []
            if w["matching_loss"] > 0:
                ids, mask, ids_all, mask_all = gather_texts(ids, mask, self.special.pad_id)
                prefix_all = all_gather_with_grad(prefix)  # negatives' prefixes keep their gradient
                g = self._generator(ids.device, _STREAM_MATCHING)
                pos = torch.arange(b, device=ids.device) + rank * b
                if impl == "naive":
                    sample = sample_hard_negatives
                else:  # Gumbel-max over column tiles: the same distribution, O(b x tile) memory
                    sample = partial(sample_hard_negatives_tiled, tile=o.contrastive_tile)
                neg_t = sample(v_z, t_all, scale.detach(), pos, g)  # a text for each context
                neg_z = sample(v_t, z_all, scale.detach(), pos, g)  # a context for each text
                rows_prefix += [prefix, prefix, prefix_all[neg_z]]
                rows_ids += [ids, ids_all[neg_t], ids]
                rows_mask += [mask, mask_all[neg_t], mask]
            if w["generation_loss"] > 0:
                g = self._generator(ids.device, _STREAM_GENERATION)
                masked_ids, is_masked = mask_caption_tokens(ids, mask, o.mask_ratio, self.special, g)
                rows_prefix.append(prefix)
                rows_ids.append(masked_ids)
                rows_mask.append(mask)
            all_mask = torch.cat(rows_mask)
            out = self.text(torch.cat(rows_ids), all_mask, prefix=torch.cat(rows_prefix))
            h_text = out.hidden[:, p:]  # (R, L, H)
            if w["matching_loss"] > 0:
                last = last_valid_index(all_mask[: 3 * b])
                logits = self.match_head(h_text[torch.arange(3 * b, device=last.device), last])
                labels = matching_labels(b, logits.device)
                losses["matching_loss"] = matching_loss(logits, labels)
                report["matching_acc"] = ((logits.detach() > 0).float() == labels).float().mean()
            if w["generation_loss"] > 0:
                h_gen = h_text[-b:]  # boolean indexing below syncs with the host (data-dependent n)
                logits_nV = self.text.lm_logits(h_gen[is_masked])  # LM head only where it is needed
                losses["generation_loss"], report["masked_tokens"] = generation_loss(
                    logits_nV, ids[is_masked]
                )

        total = sum(w[k] * losses[k] for k in LOSS_KEYS if k in losses)
        for k in LOSS_KEYS:
            losses.setdefault(k, torch.zeros((), device=z.device))
        losses["loss"] = total  # type: ignore[assignment]
        self._micro += 1
        return losses, report
