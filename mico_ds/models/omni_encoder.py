"""The omni-encoder: one shared ViT (timm blocks) with a small tokenizer per modality.

MiCo shares one backbone across knowledge modalities (paper §3.2, Fig. 5); only the patch
embedding differs. Tokenizers:

    rgb     3-channel, image grid     image, video frames
    normal  3-channel, image grid     surface normals: its own tokenizer because its channels are
                                      unit-vector components in [-1, 1], not colour, and sharing the
                                      RGB filters would mix two input statistics for the price of
                                      3*p*p*D parameters saved; a pretrained RGB filter bank is still
                                      its starting point (see ``mico_ds.checkpoint.formats.timm``)
    depth   1-channel, image grid     depth maps
    audio   1-channel, spectrogram    log-mel clips, grid (mel_bins/pa) x (clip_frames/pa)

A CLS token and one learned absolute position table defined on the base image grid (timm layout:
row 0 belongs to CLS) are shared; the table is resampled (``timm.layers.resample_abs_pos_embed``)
to any other patch grid, including the spectrogram's. Video frames and audio clips are folded into
the batch and encoded independently. Each frame/clip leaves ``tokens_per_frame`` tokens: the CLS
output plus ``tokens_per_frame - 1`` adaptive-average-pooled patch tokens.

Shape legend: B batch, T video frames, N audio clips, F frames-or-clips (1 for still inputs),
P patches per frame, K = tokens_per_frame, D = width.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from timm.layers import LayerNorm, Mlp, PatchEmbed, resample_abs_pos_embed
from timm.models.vision_transformer import Block
from torch import nn
from torch.utils.checkpoint import checkpoint

from mico_ds.config import InputConfig, VisionConfig
from mico_ds.data.schema import MODALITIES
from mico_ds.models.initialization import init_normal_, leaf_init

# Which tokenizer encodes each modality, and whether its input is a frame sequence.
TOKENIZER_OF: dict[str, str] = {
    "image": "rgb",
    "video": "rgb",
    "audio": "audio",
    "depth": "depth",
    "normal": "normal",
}
_IN_CHANS: dict[str, int] = {"rgb": 3, "normal": 3, "depth": 1, "audio": 1}
_NDIM: dict[str, int] = {"image": 4, "video": 5, "audio": 5, "depth": 4, "normal": 4}
assert set(TOKENIZER_OF) == set(MODALITIES)


def pool_grid_shape(k: int, grid: tuple[int, int]) -> tuple[int, int]:
    """Factor ``k`` pooled tokens into (rows, cols) whose aspect ratio is closest to the grid's."""
    target = math.log(grid[0] / grid[1])
    pairs = [(a, k // a) for a in range(1, k + 1) if k % a == 0]
    # rounded so that mirror-image ties (2x3 vs 3x2 on a square grid) go to fewer rows
    return min(pairs, key=lambda ab: (round(abs(math.log(ab[0] / ab[1]) - target), 9), ab[0]))


def _mlp_factory(mlp_dim: int) -> Callable[..., nn.Module]:
    """timm's Block sizes its MLP as int(dim * mlp_ratio), which can round 6144 down to 6143;
    this factory pins the hidden size to the configured integer."""

    def make(in_features: int, hidden_features: int, **kw: object) -> nn.Module:
        return Mlp(in_features=in_features, hidden_features=mlp_dim, **kw)  # type: ignore[arg-type]

    return make


class OmniEncoder(nn.Module):
    """Shared ViT over all knowledge modalities.

    Args:
        vision: ViT sizes (width, depth, heads, mlp_dim, patch sizes, ...).
        inputs: input geometry (image_size, mel_bins, clip_frames).
        tokens_per_frame: tokens kept per frame/clip (CLS + pooled patches), >= 1.
    """

    def __init__(self, vision: VisionConfig, inputs: InputConfig, tokens_per_frame: int) -> None:
        super().__init__()
        p, pa, d = vision.patch_size, vision.audio_patch_size, vision.width
        if inputs.image_size % p:
            raise ValueError(
                f"inputs.image_size={inputs.image_size} is not a multiple of model.vision.patch_size={p}"
            )
        if inputs.mel_bins % pa or inputs.clip_frames % pa:
            raise ValueError(
                f"inputs.mel_bins={inputs.mel_bins} and inputs.clip_frames={inputs.clip_frames} must be "
                f"multiples of model.vision.audio_patch_size={pa}"
            )
        if d % vision.heads:
            raise ValueError(f"model.vision.width={d} is not divisible by model.vision.heads={vision.heads}")
        if tokens_per_frame < 1:
            raise ValueError(f"model.context.tokens_per_frame must be >= 1, got {tokens_per_frame}")
        self.width = d
        self.patch_size = p
        self.audio_patch_size = pa
        self.tokens_per_frame = tokens_per_frame
        self.grid = (inputs.image_size // p, inputs.image_size // p)
        self.audio_grid = (inputs.mel_bins // pa, inputs.clip_frames // pa)
        self.grad_checkpointing = vision.grad_checkpointing

        # Linear layers are initialized in their own __init__ (timm's trunc-normal 0.02): ZeRO-3 safe.
        with leaf_init(std=0.02, truncated=True):
            self.tokenizers = nn.ModuleDict()
            for name, chans in _IN_CHANS.items():
                size = (inputs.mel_bins, inputs.clip_frames) if name == "audio" else inputs.image_size
                patch = pa if name == "audio" else p
                # strict_img_size=False: other resolutions (evaluation) resample the position table.
                self.tokenizers[name] = PatchEmbed(
                    img_size=size, patch_size=patch, in_chans=chans, embed_dim=d, strict_img_size=False
                )
            dpr = [vision.drop_path * i / max(vision.depth - 1, 1) for i in range(vision.depth)]
            self.blocks = nn.ModuleList(
                Block(
                    dim=d,
                    num_heads=vision.heads,
                    mlp_ratio=vision.mlp_dim / d,
                    qkv_bias=vision.qkv_bias,
                    drop_path=dpr[i],
                    norm_layer=LayerNorm,
                    mlp_layer=_mlp_factory(vision.mlp_dim),  # type: ignore[arg-type]
                )
                for i in range(vision.depth)
            )
            self.norm = LayerNorm(d)
            # CLIP-style encoders normalize the embedded tokens before the blocks (ln_pre / timm's
            # norm_pre); only built when configured, so other encoders keep their exact parameter set.
            self.norm_pre = LayerNorm(d) if vision.pre_norm else None
        # Own parameters, initialized here (their owner's __init__) as timm does.
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.grid[0] * self.grid[1], d))
        with torch.no_grad():
            nn.init.normal_(self.cls_token, std=1e-6)
            init_normal_(self.pos_embed, std=0.02, truncated=True)

    def _check(self, x: torch.Tensor, modality: str) -> None:
        if modality not in TOKENIZER_OF:
            raise ValueError(f"unknown modality {modality!r}; known: {MODALITIES}")
        chans = _IN_CHANS[TOKENIZER_OF[modality]]
        if x.ndim != _NDIM[modality] or x.shape[-3] != chans:
            raise ValueError(
                f"batch[{modality!r}] has shape {tuple(x.shape)}; expected {_NDIM[modality]} dims with "
                f"{chans} channel(s) at dim -3 (see mico_ds/data/schema.py)"
            )
        patch = self.audio_patch_size if modality == "audio" else self.patch_size
        if x.shape[-2] % patch or x.shape[-1] % patch:
            raise ValueError(
                f"batch[{modality!r}] spatial size {tuple(x.shape[-2:])} is not a multiple of "
                f"the patch size {patch}"
            )

    def forward(self, x: torch.Tensor, modality: str, pool: bool = True) -> torch.Tensor:
        """Encode one modality.

        Args:
            x: image/depth/normal (B, C, H, W), video (B, T, 3, H, W), audio (B, N, 1, F, Tm).
            modality: one of ``mico_ds.data.schema.MODALITIES``.
            pool: False returns the final-normed ViT tokens (B*F, 1+P, D) before pooling (timm's
                ``forward_features`` layout); True returns (B, F*K, D).
        """
        self._check(x, modality)
        b = x.shape[0]
        if x.ndim == 5:  # fold frames / clips into the batch: (B, F, C, H, W) -> (B*F, C, H, W)
            x = x.flatten(0, 1)
        x = x.to(self.cls_token.dtype)  # fp32 batches into a bf16 model
        tok = self.tokenizers[TOKENIZER_OF[modality]]
        grid = (x.shape[-2] // tok.patch_size[0], x.shape[-1] // tok.patch_size[1])
        x_nPD = tok(x)
        pos = self.pos_embed
        if grid != self.grid:
            pos = resample_abs_pos_embed(
                pos, new_size=list(grid), old_size=list(self.grid), num_prefix_tokens=1
            )
        x_nPD = torch.cat([self.cls_token.expand(x_nPD.shape[0], -1, -1), x_nPD], dim=1) + pos
        if self.norm_pre is not None:
            x_nPD = self.norm_pre(x_nPD)
        for blk in self.blocks:
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x_nPD = checkpoint(blk, x_nPD, use_reentrant=False)
            else:
                x_nPD = blk(x_nPD)
        x_nPD = self.norm(x_nPD)
        if not pool:
            return x_nPD
        return self._pool(x_nPD, grid).reshape(b, -1, self.width)

    def _pool(self, x_nPD: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """CLS + (K-1) adaptive-average-pooled patch tokens -> (n, K, D)."""
        k = self.tokens_per_frame - 1
        cls = x_nPD[:, :1]
        if k == 0:
            return cls
        rows, cols = pool_grid_shape(k, grid)
        patches = x_nPD[:, 1:].transpose(1, 2).reshape(x_nPD.shape[0], self.width, grid[0], grid[1])
        pooled = F.adaptive_avg_pool2d(patches, (rows, cols)).flatten(2).transpose(1, 2)  # (n, K-1, D)
        return torch.cat([cls, pooled], dim=1)
