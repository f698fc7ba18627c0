"""MiCoModel: omni-encoder + multimodal context + Llama text branch + the three objectives.

This is the module ``deepspeed.initialize`` wraps (docs/architecture.md, "Model contract"). Top-level
submodules, named so the trainer can build parameter groups by prefix:

    encoder      OmniEncoder: shared ViT + per-modality tokenizers        (vision branch)
    context      MultimodalContext: E_C, E_M, E_Pos, E_Sam + [CTX] fusion
    text         TextBranch: LlamaForCausalLM                              (text branch)
    proj_z       ProjectionHead: z -> contrastive space
    proj_t       ProjectionHead: pooled text feature -> contrastive space
    match_head   MatchHead: LLM hidden state -> matching logit
    prefix_proj  PrefixProjector: fused context tokens -> LLM prefix embeddings
    logit_scale  LogitScale: learnable inverse temperature (log-parameterized)
    cls_head     ClassificationHead: z -> class logits (task.name=classification only)

ZeRO-3 rules this file keeps: parameters are only read inside the ``forward`` of the module that owns
them (ZeRO-3 gathers a module's parameters in its forward pre-hook), the root owns no parameter of
its own (so the evaluation methods below, which are not ``forward``, are safe), and which modules and
collectives run depends only on the config and on the batch's modality set, which is the same on
every rank at a given step (one corpus per step, chosen by a schedule every rank computes).

Shape legend: B local batch, L text tokens, P prefix tokens, D ViT width, H Llama hidden, E embed_dim.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mico_ds.config import InputConfig, ModelConfig, ObjectiveConfig, RunConfig
from mico_ds.config.task_sections import ClassificationConfig
from mico_ds.data.schema import (
    GEN_TARGETS,
    MODALITIES,
    SAMPLE_SOURCE,
    SOURCE_GROUP,
    TEXT_IDS,
    TEXT_MASK,
    TEXT_SOURCE,
    SpecialTokens,
)
from mico_ds.distributed import all_gather_no_grad, all_gather_with_grad, get_rank
from mico_ds.models.context import MultimodalContext
from mico_ds.models.decoder_rows import DecoderRows
from mico_ds.models.heads import LogitScale, MatchHead, PrefixProjector, ProjectionHead, SamplingEmbedding
from mico_ds.models.omni_encoder import OmniEncoder
from mico_ds.models.task_heads import ClassificationHead
from mico_ds.models.text_branch import TextBranch, last_valid_index
from mico_ds.objectives.classification import classification_forward
from mico_ds.objectives.contrastive import contrastive_loss, in_batch_top1
from mico_ds.objectives.generation import generation_loss, mask_caption_tokens, target_rows
from mico_ds.objectives.matching import (
    caption_hash,
    gather_texts,
    listwise_matching_loss,
    matching_labels,
    matching_loss,
    matching_metrics,
    mine_hard_negatives,
)
from mico_ds.objectives.scst import ScstObjective
from mico_ds.objectives.seeding import RandomStream, step_generator

LOSS_KEYS = ("contrastive_loss", "matching_loss", "generation_loss")
MATCHING_ROWS, GENERATION_ROWS = "matching", "generation"


def present_modalities(batch: dict[str, Any]) -> list[str]:
    """Knowledge modalities present in a batch, in canonical order."""
    return [m for m in MODALITIES if batch.get(m) is not None]


@dataclass
class GlobalFeatures:
    """MiCo Eq. 4's inputs: this rank's normalized features (with gradient) and every rank's (without:
    for mining and in-batch accuracy). Shapes (b, E) and (world*b, E)."""

    v_z: torch.Tensor
    v_t: torch.Tensor
    z_all: torch.Tensor
    t_all: torch.Tensor


class MiCoModel(nn.Module):
    """The MiCo model and its pretraining objectives (MiCo Eq. 1-6).

    Args:
        model: sizes of the encoder, context and text branch, and ``kernels``.
        inputs: input geometry (the tokenizers' grids).
        objectives: the objective weights, mask ratio, temperature and tile.
        special: the tokenizer's vocabulary size and special ids.
        seed: ``train.seed``; with the step, micro-batch and rank it seeds masking and mining.

    Attributes:
        objective_impl: which implementation the contrastive loss and the mining run ("auto" from
            ``model.kernels``, or "naive" | "torch" | "triton"; see ``objectives.contrastive.resolve_impl``).
    """

    def __init__(
        self,
        model: ModelConfig,
        inputs: InputConfig,
        objectives: ObjectiveConfig,
        special: SpecialTokens,
        seed: int = 0,
        classification: ClassificationConfig | None = None,
        scst: ScstObjective | None = None,
    ) -> None:
        super().__init__()
        self.objective_cfg = objectives
        # task.name=classification trains its head alone (its check() wants the weights at 0)
        self.classification = classification
        self.weights = objectives.weights() if classification is None else dict.fromkeys(LOSS_KEYS, 0.0)
        self.special = special
        self.seed = seed
        self.scst = scst  # task.scst (objectives.scst); None unless enabled
        if scst is not None and scst.cfg.replace_generation:
            self.weights["generation_loss"] = 0.0  # SCST replaces the cross-entropy (Rennie et al.)
        self.prefix_tokens = model.context.prefix_tokens
        self.objective_impl = model.kernels
        self.encoder = OmniEncoder(model.vision, inputs, model.context.tokens_per_frame)
        self.context = MultimodalContext(
            model.vision.width, model.context, model.vision, kernels=model.kernels
        )
        self.text = TextBranch(model.text, special)
        h = self.text.hidden_size
        self.proj_z = ProjectionHead(model.vision.width, model.embed_dim)
        self.proj_t = ProjectionHead(h, model.embed_dim)
        self.text_sam = SamplingEmbedding(model.context.num_sources, h)
        self.match_head = MatchHead(h)
        self.prefix_proj = PrefixProjector(model.vision.width, h)
        self.logit_scale = LogitScale(objectives.init_temperature, objectives.max_logit_scale)
        if classification is not None:
            self.cls_head = ClassificationHead(model.vision.width, classification.num_classes)

    @classmethod
    def from_run_config(cls, cfg: RunConfig, special: SpecialTokens) -> MiCoModel:
        """The model of a run: its model, input and objective sections and its seed."""
        head = cfg.task.classification if cfg.task.name == "classification" else None
        scst = ScstObjective.from_run_config(cfg)
        return cls(
            cfg.model,
            cfg.inputs,
            cfg.objectives,
            special,
            seed=cfg.train.seed,
            classification=head,
            scst=scst,
        )

    def generator(
        self, stream: RandomStream, step: int, micro: int, device: torch.device | str
    ) -> torch.Generator:
        """The generator ``forward(batch, step, micro)`` draws ``stream`` from on this rank."""
        return step_generator(self.seed, step, micro, get_rank(), stream, device)

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
        n = self.prefix_tokens
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
        return F.normalize(self.proj_t(self.text_feature(text_ids, text_mask)).float(), dim=-1)

    def text_feature(
        self, ids: torch.Tensor, mask: torch.Tensor, text_source: torch.Tensor | None = None
    ) -> torch.Tensor:
        """z_T (B, H) of MiCo Eq. 2-3: the text-only pass, plus E_Sam of each token's source corpus
        (``text_source`` (B, L) of a joined batch; None: row 0, text that came whole from one corpus),
        pooled over the valid tokens."""
        hidden = self.text(ids, mask).hidden
        src = torch.zeros_like(ids) if text_source is None else text_source.to(ids.device, torch.int64)
        if src.shape != ids.shape:
            raise ValueError(
                f"batch['text_source'] has shape {tuple(src.shape)}, batch['text_ids'] {tuple(ids.shape)}"
            )
        return self.text.pool(hidden + self.text_sam(src).to(hidden.dtype), mask)

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

    def forward(
        self, batch: dict[str, Any], step: int = 0, micro: int = 0
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Compute the weighted MiCo objectives on one batch (schema: mico_ds/data/schema.py).

        Args:
            batch: one micro-batch.
            step, micro: the optimizer step and the micro-batch within it; they seed this pass's
                caption masking and hard-negative mining (:meth:`generator`). A batch with a task's
                ``gen_targets`` (``mico_ds.tasks``) trains generation on exactly those tokens, one
                decoder row per target as the decoder generates it (``generation.target_rows``).

        Returns:
            losses: ``contrastive_loss``, ``matching_loss``, ``generation_loss`` (zero, detached, for a
                term whose config weight is 0: it is not computed) and ``loss`` = weighted sum.
            report: detached scalars: logit_scale, context_tokens, and when computed
                retrieval_acc_k2t / retrieval_acc_t2k (in-batch top-1, local rows vs global columns),
                matching_pos_acc / matching_neg_acc / matching_balanced_acc / matching_top1
                (objectives.matching: matching_metrics), masked_tokens (global count).
            With task.scst, ``scst_loss`` (objectives.scst) and the report's scst_reward / scst_baseline.
        """
        if self.classification is not None:  # the linear head on z; the text branch does not run
            return classification_forward(self, batch, step, micro)
        self._check_batch(batch)
        w = self.weights
        ids, mask = batch[TEXT_IDS], batch[TEXT_MASK]
        z, fused = self.encode_context(batch)  # Eq. 1-3
        scale = self.logit_scale()
        losses: dict[str, torch.Tensor] = {}
        report: dict[str, torch.Tensor] = {
            "logit_scale": scale.detach(),
            "context_tokens": torch.tensor(float(fused.shape[1] - 1), device=z.device),
        }
        feats = None
        if w["contrastive_loss"] > 0 or w["matching_loss"] > 0:
            feats = self.global_features(z, ids, mask, batch.get(TEXT_SOURCE))
            report.update(self.in_batch_accuracy(feats))
            if w["contrastive_loss"] > 0:
                losses["contrastive_loss"] = self.contrastive_term(feats, scale)  # Eq. 4
        if w["matching_loss"] > 0 or w["generation_loss"] > 0:
            prefix = self.prefix_proj(self._select_prefix(fused))  # (B, P, H)
            if w["matching_loss"] > 0:  # the texts of every rank, padded to the global length
                ids, mask, ids_all, mask_all = gather_texts(ids, mask, self.special.pad_id)
            rows = DecoderRows()
            if w["matching_loss"] > 0:
                assert feats is not None
                gen = self.generator(RandomStream.MATCHING, step, micro, ids.device)
                valid = self.add_matching_rows(
                    rows, prefix, ids, mask, ids_all, mask_all, feats, scale, gen, batch.get(SOURCE_GROUP)
                )
            gen_ids = ids
            if w["generation_loss"] > 0 and batch.get(GEN_TARGETS) is not None:
                # A task's targets (QA: the answer + EOS), one row per target token (target_rows).
                targets = batch[GEN_TARGETS].to(ids.device)
                targets = F.pad(targets, (0, ids.shape[1] - targets.shape[1]))  # ids padded by matching
                src, masked_ids, is_masked = target_rows(ids, targets, self.special.mask_id)
                rows.add(GENERATION_ROWS, prefix[src], masked_ids, mask[src])
                gen_ids = ids[src]
            elif w["generation_loss"] > 0:
                # (B, L) noise from a CPU generator: the same masks on every device, for a tiny copy.
                gen = self.generator(RandomStream.GENERATION, step, micro, "cpu")
                masked_ids, is_masked = mask_caption_tokens(
                    ids, mask, self.objective_cfg.mask_ratio, self.special, gen
                )
                rows.add(GENERATION_ROWS, prefix, masked_ids, mask)
            all_prefix, all_ids, all_mask = rows.stack()
            h_text = self.text(all_ids, all_mask, prefix=all_prefix).hidden[
                :, all_prefix.shape[1] :
            ]  # (R, L, H)
            if MATCHING_ROWS in rows:  # Eq. 5
                losses["matching_loss"], figures = self.matching_term(
                    rows.take(MATCHING_ROWS, h_text), rows.take(MATCHING_ROWS, all_mask), valid
                )
                report.update(figures)
            if GENERATION_ROWS in rows:  # Eq. 6
                losses["generation_loss"], report["masked_tokens"] = self.generation_term(
                    rows.take(GENERATION_ROWS, h_text), gen_ids, is_masked
                )
        if self.scst is not None:  # SCST: sampled vs greedy captions, CIDEr-D rewards (objectives.scst)
            prefix = self.prefix_proj(self._select_prefix(fused))  # (B, P, H)
            losses["scst_loss"], figures = self.scst(self, batch, prefix, step, micro)
            report.update(figures)
        total = sum(w[k] * losses[k] for k in LOSS_KEYS if k in losses)
        if self.scst is not None:
            total = total + self.scst.weight * losses["scst_loss"]
        for k in LOSS_KEYS:
            losses.setdefault(k, torch.zeros((), device=z.device))
        losses["loss"] = total  # type: ignore[assignment]
        return losses, report

    def global_features(
        self, z: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor, text_source: torch.Tensor | None = None
    ) -> GlobalFeatures:
        """Normalized knowledge and text features, local with gradient and gathered without (Eq. 4).
        With a tiled kernel nothing below holds the (b, world*b) similarities."""
        v_z = F.normalize(self.proj_z(z).float(), dim=-1)
        v_t = F.normalize(self.proj_t(self.text_feature(ids, mask, text_source)).float(), dim=-1)
        return GlobalFeatures(v_z, v_t, all_gather_no_grad(v_z.detach()), all_gather_no_grad(v_t.detach()))

    def in_batch_accuracy(self, f: GlobalFeatures) -> dict[str, torch.Tensor]:
        """In-batch top-1 of local rows against global columns, both directions (logged)."""
        rank, tile = get_rank(), self.objective_cfg.contrastive_tile
        return {
            "retrieval_acc_k2t": in_batch_top1(f.v_z.detach(), f.t_all, rank, tile),
            "retrieval_acc_t2k": in_batch_top1(f.v_t.detach(), f.z_all, rank, tile),
        }

    def contrastive_term(self, f: GlobalFeatures, scale: torch.Tensor) -> torch.Tensor:
        """MiCo Eq. 4: symmetric InfoNCE over the all-gathered batch."""
        return contrastive_loss(
            f.v_z, f.v_t, scale, impl=self.objective_impl, tile=self.objective_cfg.contrastive_tile
        )

    def add_matching_rows(
        self,
        rows: DecoderRows,
        prefix: torch.Tensor,
        ids: torch.Tensor,
        mask: torch.Tensor,
        ids_all: torch.Tensor,
        mask_all: torch.Tensor,
        f: GlobalFeatures,
        scale: torch.Tensor,
        gen: torch.Generator,
        source_group: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """MiCo Eq. 5's pairs: b positives, each context with k hard-negative texts, each text with k
        hard-negative contexts (k = objectives.matching_negatives); negatives are mined from the global
        batch and may live on another rank, never sharing the positive's caption or source group
        (objectives.matching_dedup). Returns the (2bk,) validity of the negative pairs."""
        b, k = ids.shape[0], self.objective_cfg.matching_negatives
        prefix_all = all_gather_with_grad(prefix)  # negatives' prefixes keep their gradient
        pos = torch.arange(b, device=ids.device) + get_rank() * b
        groups = groups_all = None
        if self.objective_cfg.matching_dedup:
            cols = [caption_hash(ids, mask)]
            if source_group is not None:
                cols.append(source_group.to(ids.device, torch.int64))
            groups = torch.stack(cols, dim=1)  # (b, G): text j and context j belong to sample j
            groups_all = all_gather_no_grad(groups)
        impl, tile = self.objective_impl, self.objective_cfg.contrastive_tile
        opts = {"num": k, "q_groups": groups, "k_groups": groups_all}
        neg_t, ok_t = mine_hard_negatives(f.v_z, f.t_all, scale.detach(), pos, gen, impl, tile, **opts)
        neg_z, ok_z = mine_hard_negatives(f.v_t, f.z_all, scale.detach(), pos, gen, impl, tile, **opts)
        neg_t, neg_z = neg_t.flatten(), neg_z.flatten()  # query-major: row i's k negatives together
        rows.add(MATCHING_ROWS, prefix, ids, mask)
        rows.add(MATCHING_ROWS, prefix.repeat_interleave(k, 0), ids_all[neg_t], mask_all[neg_t])
        rows.add(MATCHING_ROWS, prefix_all[neg_z], ids.repeat_interleave(k, 0), mask.repeat_interleave(k, 0))
        return torch.cat([ok_t.flatten(), ok_z.flatten()])

    def matching_term(
        self, h: torch.Tensor, mask: torch.Tensor, valid: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """MiCo Eq. 5 on the matching rows' hidden states (b(1 + 2k), L, H): the matching head at each
        row's last text token, pointwise BCE or listwise cross-entropy (objectives.matching_form);
        returns (loss, balanced figures)."""
        last = last_valid_index(mask)
        logits = self.match_head(h[torch.arange(h.shape[0], device=last.device), last])
        k = self.objective_cfg.matching_negatives
        b = h.shape[0] // (1 + 2 * k)
        figures = matching_metrics(logits.detach(), b, k, valid)
        if self.objective_cfg.matching_form == "listwise":
            return listwise_matching_loss(logits, b, k, valid), figures
        labels = matching_labels(b, logits.device, k)
        return matching_loss(logits, labels, torch.cat([torch.ones_like(valid[:b]), valid])), figures

    def generation_term(
        self, h: torch.Tensor, ids: torch.Tensor, is_masked: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """MiCo Eq. 6 on the generation rows' hidden states (b, L, H): cross-entropy of the original
        tokens at the masked positions; returns (loss, global masked-token count)."""
        # The LM head runs only where it is needed; boolean indexing syncs with the host (data-dependent n).
        logits_nV = self.text.lm_logits(h[is_masked])
        return generation_loss(logits_nV, ids[is_masked])
