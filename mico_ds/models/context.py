"""Multimodal context (MiCo Eq. 1 and 3) and the fusion layers that pool it into ``z``.

The present modalities' token sequences are concatenated in the canonical order
(``mico_ds.data.schema.MODALITIES``). Each token l of modality m, at index l_m inside that
modality's own sequence, receives

    E_C[m * max_context_len + l_m]   context embedding: position inside the modality's context (Eq. 1)
    E_M[m]                           modality embedding (Eq. 1)
    E_Pos[l]                         ONE position table shared over the whole concatenation (Eq. 1)
    E_Sam[sample_source[b, j]]       sampling embedding of the corpus modality j was drawn from (Eq. 3)

summed in one call to ``mico_ds.kernels.context_embed.context_embed`` (the fused kernel replaces the
reference behind it). A learned [CTX] token is prepended and ``fusion_layers`` timm Blocks fuse the
sequence; ``z`` is the [CTX] output and the fused tokens are the LLM prefix.

Shape legend: B batch, L_m tokens of modality m, L = sum of L_m, D width, M present modalities.
"""

from __future__ import annotations

import torch
from timm.layers import LayerNorm
from timm.models.vision_transformer import Block
from torch import nn

from mico_ds.config import ContextConfig, VisionConfig
from mico_ds.data.schema import MODALITIES, MODALITY_ID
from mico_ds.kernels.context_embed import context_embed
from mico_ds.models.initialization import init_normal_, leaf_init
from mico_ds.models.omni_encoder import _mlp_factory


class MultimodalContext(nn.Module):
    """Context embeddings (E_C, E_M, E_Pos, E_Sam) + [CTX] fusion.

    Args:
        width: token width D (the omni-encoder's).
        ctx: table sizes and number of fusion layers.
        vision: head count / MLP size / qkv bias of the fusion blocks (same as the ViT's).
        kernels: ``impl`` passed to ``context_embed`` (auto | triton | torch).
    """

    def __init__(self, width: int, ctx: ContextConfig, vision: VisionConfig, kernels: str = "auto") -> None:
        super().__init__()
        if ctx.max_context_len < 1 or ctx.max_positions < 1 or ctx.num_sources < 1:
            raise ValueError(
                f"model.context sizes must be >= 1: max_context_len={ctx.max_context_len}, "
                f"max_positions={ctx.max_positions}, num_sources={ctx.num_sources}"
            )
        self.width = width
        self.max_context_len = ctx.max_context_len
        self.max_positions = ctx.max_positions
        self.num_sources = ctx.num_sources
        self.kernels = kernels
        num_mod = len(MODALITIES)
        # Own tables, initialized in this __init__ (ZeRO-3 partitions them when it returns).
        self.e_ctx = nn.Parameter(torch.zeros(num_mod * ctx.max_context_len, width))
        self.e_mod = nn.Parameter(torch.zeros(num_mod, width))
        self.e_pos = nn.Parameter(torch.zeros(ctx.max_positions, width))
        self.e_sam = nn.Parameter(torch.zeros(ctx.num_sources, width))
        self.ctx_token = nn.Parameter(torch.zeros(1, 1, width))
        with torch.no_grad():
            for p in (self.e_ctx, self.e_mod, self.e_pos, self.e_sam, self.ctx_token):
                init_normal_(p, std=0.02, truncated=True)
        with leaf_init(std=0.02, truncated=True):
            self.blocks = nn.ModuleList(
                Block(
                    dim=width,
                    num_heads=vision.heads,
                    mlp_ratio=vision.mlp_dim / width,
                    qkv_bias=vision.qkv_bias,
                    norm_layer=LayerNorm,
                    mlp_layer=_mlp_factory(vision.mlp_dim),  # type: ignore[arg-type]
                )
                for _ in range(ctx.fusion_layers)
            )
            self.norm = LayerNorm(width)

    def indices(
        self, lengths: dict[str, int], device: torch.device | str
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-position (L,) row indices into E_C, E_M and E_Pos for the present modalities."""
        ctx, mod = [], []
        for m in MODALITIES:
            if m not in lengths:
                continue
            n = lengths[m]
            if n > self.max_context_len:
                raise ValueError(
                    f"modality {m!r} has {n} context tokens (frames/clips x tokens_per_frame) > "
                    f"model.context.max_context_len={self.max_context_len}"
                )
            mid = MODALITY_ID[m]
            ctx.append(torch.arange(n, device=device) + mid * self.max_context_len)
            mod.append(torch.full((n,), mid, device=device, dtype=torch.long))
        ctx_idx = torch.cat(ctx)
        total = ctx_idx.numel()
        if total > self.max_positions:
            raise ValueError(
                f"multimodal context has {total} tokens ({lengths}) > "
                f"model.context.max_positions={self.max_positions}"
            )
        return ctx_idx, torch.cat(mod), torch.arange(total, device=device)

    def forward(
        self, tokens: dict[str, torch.Tensor], sample_source: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Build the multimodal context and fuse it.

        Args:
            tokens: modality -> (B, L_m, D), any non-empty subset of MODALITIES.
            sample_source: (B, M) int64, per present modality (canonical order) its E_Sam row; None
                adds no sampling embedding.

        Returns:
            z (B, D): the [CTX] output; fused (B, 1 + L, D): [CTX] + context tokens after fusion.
        """
        present = [m for m in MODALITIES if m in tokens]
        unknown = sorted(set(tokens) - set(MODALITIES))
        if not present or unknown:
            raise ValueError(f"context needs a non-empty subset of {MODALITIES}; got {sorted(tokens)}")
        x_BLD = torch.cat([tokens[m] for m in present], dim=1)
        b = x_BLD.shape[0]
        lengths = {m: tokens[m].shape[1] for m in present}
        ctx_idx, mod_idx, pos_idx = self.indices(lengths, x_BLD.device)
        src_idx = None
        if sample_source is not None:
            if sample_source.shape != (b, len(present)):
                raise ValueError(
                    f"batch['sample_source'] has shape {tuple(sample_source.shape)}; expected "
                    f"({b}, {len(present)}) for modalities {present}"
                )
            # Value check only where it costs no device sync; on GPU a bad id trips an index assert.
            if sample_source.device.type == "cpu" and (
                int(sample_source.min()) < 0 or int(sample_source.max()) >= self.num_sources
            ):
                raise ValueError(
                    f"batch['sample_source'] ids must lie in [0, {self.num_sources}) "
                    f"(model.context.num_sources); got {sample_source.tolist()}"
                )
            counts = torch.tensor([lengths[m] for m in present], device=sample_source.device)
            src_idx = sample_source.long().repeat_interleave(counts, dim=1)  # (B, L)
        x_BLD = context_embed(
            x_BLD,
            ctx_idx,
            mod_idx,
            pos_idx,
            self.e_ctx,
            self.e_mod,
            self.e_pos,
            src_idx,
            self.e_sam if src_idx is not None else None,
            impl=self.kernels,
        )
        x_BLD = torch.cat([self.ctx_token.expand(b, -1, -1).to(x_BLD.dtype), x_BLD], dim=1)
        for blk in self.blocks:
            x_BLD = blk(x_BLD)
        x_BLD = self.norm(x_BLD)
        return x_BLD[:, 0], x_BLD
