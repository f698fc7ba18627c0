"""The interface branch: a Llama-2 decoder from Hugging Face ``transformers``.

Two passes (MiCo §3.2 / appendix B.1):
  * text only -> a pooled text feature (mean over valid tokens, or the last valid token) for the
    contrastive loss (Eq. 4);
  * prefix + text -> hidden states for matching (Eq. 5) and masked caption generation (Eq. 6): the
    projected context tokens are ``inputs_embeds`` in front of the token embeddings, the attention
    mask covers prefix + text and attention is causal.

Built from a ``LlamaConfig`` (debug sizes, random init) or with the architecture of a LOCAL Hugging Face
directory (``pretrained_llama_config``); its weights are loaded after construction, tensor by tensor
(``mico_ds.checkpoint.formats.hf_llama``; ``mico_ds.distributed.zero_load`` under ZeRO-3).
Text is right-padded (``text_mask`` = 1s then 0s); position ids are cumsum(mask) - 1, so they run
contiguously over prefix + valid text.

Shape legend: B batch, L text tokens, P prefix tokens, S = P + L, H hidden size, V vocabulary.
"""

from __future__ import annotations

import inspect
import json
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM, LlamaModel
from transformers.modeling_utils import PreTrainedModel

from mico_ds.config import TextConfig
from mico_ds.data.schema import SpecialTokens
from mico_ds.models.initialization import leaf_init

_POOLING = ("mean", "last")


@contextmanager
def _no_posthoc_init() -> Any:
    """Skip transformers' post-construction ``initialize_weights`` (tying still happens).

    Under ZeRO-3 that pass would write into already-partitioned (empty) parameters; here every
    leaf has initialized itself in its own ``__init__`` (``leaf_init``) with the same scheme
    (normal(0, initializer_range), zero biases, zero padding row, RMSNorm weights at one).
    """
    orig = PreTrainedModel.initialize_weights
    PreTrainedModel.initialize_weights = lambda self: None  # type: ignore[method-assign]
    try:
        yield
    finally:
        PreTrainedModel.initialize_weights = orig  # type: ignore[method-assign]


# transformers 5 renamed LlamaModel.forward's ``past_key_values`` to ``cache`` (the old name warns).
_CACHE_KW = "cache" if "cache" in inspect.signature(LlamaModel.forward).parameters else "past_key_values"


def llama_config(text: TextConfig, special: SpecialTokens) -> LlamaConfig:
    """The Llama-2 architecture at the configured size, with our tokenizer's vocabulary and ids."""
    if text.hidden_size % text.num_heads:
        raise ValueError(
            f"model.text.hidden_size={text.hidden_size} is not divisible by "
            f"model.text.num_heads={text.num_heads}"
        )
    kv = text.num_kv_heads or text.num_heads
    if text.num_heads % kv:
        raise ValueError(f"model.text.num_heads={text.num_heads} is not a multiple of num_kv_heads={kv}")
    return LlamaConfig(
        vocab_size=special.vocab_size,
        hidden_size=text.hidden_size,
        intermediate_size=text.intermediate_size,
        num_hidden_layers=text.num_layers,
        num_attention_heads=text.num_heads,
        num_key_value_heads=kv,
        max_position_embeddings=text.max_position_embeddings,
        rms_norm_eps=text.rms_norm_eps,
        pad_token_id=special.pad_id,
        bos_token_id=special.bos_id,
        eos_token_id=special.eos_id,
        tie_word_embeddings=False,
        use_cache=False,
        attn_implementation=text.attn_implementation,
    )


# Recipe field -> config.json field that must agree with a pretrained directory.
_ARCH_FIELDS = {
    "hidden_size": "hidden_size",
    "num_layers": "num_hidden_layers",
    "num_heads": "num_attention_heads",
    "num_kv_heads": "num_key_value_heads",
    "intermediate_size": "intermediate_size",
}


def pretrained_llama_config(text: TextConfig, special: SpecialTokens) -> LlamaConfig:
    """The architecture of the local Hugging Face directory ``text.pretrained`` (no weights read).

    RoPE settings, norm epsilon and activation come from its ``config.json``; the vocabulary grows to
    our tokenizer's (``<pad>``/``<mask>`` are added to Llama-2's 32000) and the special ids are ours.
    The recipe's sizes must match the checkpoint (the planner and the meta-device tests read them).

    Raises:
        ValueError: the directory has no config.json, is not a Llama, or disagrees with the recipe
            (every mismatching field named) or has a larger vocabulary than the tokenizer.
    """
    path = Path(text.pretrained)  # type: ignore[arg-type]
    if not (path / "config.json").is_file():
        raise ValueError(f"model.text.pretrained={str(path)!r} is not a Hugging Face model directory")
    model_type = json.loads((path / "config.json").read_text()).get("model_type")
    if model_type != "llama":
        raise ValueError(f"{path}/config.json: model_type={model_type!r}, expected 'llama'")
    cfg = LlamaConfig.from_pretrained(
        str(path), local_files_only=True, attn_implementation=text.attn_implementation
    )
    mine = {k: getattr(text, k) for k in _ARCH_FIELDS}
    mine["num_kv_heads"] = text.num_kv_heads or text.num_heads
    theirs = {k: getattr(cfg, f) for k, f in _ARCH_FIELDS.items()}
    bad = {k: (mine[k], theirs[k]) for k in mine if mine[k] != theirs[k]}
    if bad:
        raise ValueError(
            f"{path}/config.json disagrees with the recipe: "
            + ", ".join(f"model.text.{k}={a} vs {_ARCH_FIELDS[k]}={b}" for k, (a, b) in bad.items())
        )
    if cfg.vocab_size > special.vocab_size:
        raise ValueError(
            f"{path}/config.json: vocab_size={cfg.vocab_size} > the tokenizer's {special.vocab_size} "
            f"(data.tokenizer must be this model's tokenizer)"
        )
    cfg.vocab_size = special.vocab_size
    cfg.pad_token_id, cfg.bos_token_id, cfg.eos_token_id = special.pad_id, special.bos_id, special.eos_id
    cfg.tie_word_embeddings = False  # a tied checkpoint fills lm_head from its embeddings
    cfg.use_cache = False
    cfg.max_position_embeddings = max(cfg.max_position_embeddings, text.max_position_embeddings)
    return cfg


class TextOutput(NamedTuple):
    hidden: torch.Tensor  # (B, S, H) last hidden states over prefix + text
    mask: torch.Tensor  # (B, S) attention mask over prefix + text (1 = real)
    past_key_values: Any  # transformers Cache when use_cache, else None


def last_valid_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of the last 1 in each row of a (B, S) 0/1 mask (0 for an all-zero row)."""
    pos = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    return (pos * (mask > 0)).amax(dim=1)


class TextBranch(nn.Module):
    """Llama-2 decoder with a prefix-embedding path.

    Args:
        text: sizes, pretrained directory, attention backend, checkpointing, pooling.
        special: vocabulary size and special ids of the tokenizer the data pipeline uses.
    """

    def __init__(self, text: TextConfig, special: SpecialTokens) -> None:
        super().__init__()
        if text.pooling not in _POOLING:
            raise ValueError(f"model.text.pooling must be one of {_POOLING}, got {text.pooling!r}")
        for name in ("pad_id", "bos_id", "eos_id", "mask_id"):
            if not 0 <= getattr(special, name) < special.vocab_size:
                raise ValueError(
                    f"special.{name}={getattr(special, name)} outside the vocabulary "
                    f"[0, {special.vocab_size})"
                )
        self.pooling = text.pooling
        # A pretrained directory decides the architecture (its config.json, checked against the
        # recipe); its weights are loaded afterwards, tensor by tensor (load_hf_llama, or
        # mico_ds.distributed.zero_load under ZeRO-3), so construction never holds a second copy.
        cfg = pretrained_llama_config(text, special) if text.pretrained else llama_config(text, special)
        with leaf_init(std=cfg.initializer_range), _no_posthoc_init():
            self.llm = LlamaForCausalLM(cfg)
        self.llm.config.use_cache = False
        if text.grad_checkpointing:
            if hasattr(self.llm, "activation_checkpointing_enable"):  # transformers >= 5
                self.llm.activation_checkpointing_enable({"use_reentrant": False})
            else:
                self.llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.hidden_size = self.llm.config.hidden_size
        self.vocab_size = self.llm.config.vocab_size

    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings (B, L) -> (B, L, H) through the module call (ZeRO-3 gathers it)."""
        return self.llm.get_input_embeddings()(ids)

    def forward(
        self,
        text_ids: torch.Tensor,
        text_mask: torch.Tensor,
        prefix: torch.Tensor | None = None,
        past_key_values: Any = None,
        use_cache: bool = False,
    ) -> TextOutput:
        """Run the decoder on [prefix embeddings] + text with causal attention.

        Args:
            text_ids: (B, L) token ids (right-padded).
            text_mask: (B, L) 1 for real tokens; with ``past_key_values`` it is the mask of the
                WHOLE sequence so far (cached + new), (B, S_past + L).
            prefix: (B, P, H) embeddings placed before the text (None: text only).
            past_key_values / use_cache: incremental decoding (``next_token_logits``).
        """
        if text_ids.shape[0] != text_mask.shape[0]:
            raise ValueError(
                f"text_ids {tuple(text_ids.shape)} and text_mask {tuple(text_mask.shape)} differ in batch"
            )
        x_BSH = self.embed_tokens(text_ids)
        mask = text_mask.long()
        if prefix is not None:
            if prefix.shape[0] != text_ids.shape[0] or prefix.shape[-1] != x_BSH.shape[-1]:
                raise ValueError(
                    f"prefix {tuple(prefix.shape)} does not fit text {tuple(text_ids.shape)} "
                    f"with hidden size {x_BSH.shape[-1]}"
                )
            x_BSH = torch.cat([prefix.to(x_BSH.dtype), x_BSH], dim=1)
            ones = torch.ones(prefix.shape[:2], dtype=mask.dtype, device=mask.device)
            mask = torch.cat([ones, mask], dim=1)
        if mask.shape[1] < x_BSH.shape[1]:
            raise ValueError(f"attention mask covers {mask.shape[1]} positions, inputs have {x_BSH.shape[1]}")
        position_ids = (mask.cumsum(dim=1) - 1).clamp(min=0)[:, -x_BSH.shape[1] :]
        out = self.llm.model(
            inputs_embeds=x_BSH,
            attention_mask=mask,
            position_ids=position_ids,
            use_cache=use_cache,
            **({_CACHE_KW: past_key_values} if past_key_values is not None else {}),
        )
        return TextOutput(out.last_hidden_state, mask, getattr(out, _CACHE_KW) if use_cache else None)

    def lm_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """LM head (..., H) -> (..., V); apply to the positions you need only (V is large)."""
        return self.llm.lm_head(hidden)

    def pool(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(B, L, H) -> (B, H): mean over valid tokens or the last valid token (``model.text.pooling``)."""
        if self.pooling == "last":
            return hidden[torch.arange(hidden.shape[0], device=hidden.device), last_valid_index(mask)]
        m = mask.to(hidden.dtype).unsqueeze(-1)
        return (hidden * m).sum(dim=1) / m.sum(dim=1).clamp(min=1.0)

    def text_features(self, text_ids: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        """Text-only pass -> pooled feature (B, H) for the contrastive objective."""
        out = self(text_ids, text_mask)
        return self.pool(out.hidden, text_mask)
