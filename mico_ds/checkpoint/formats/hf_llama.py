"""Hugging Face Llama checkpoints in and out of the text branch (``MiCoModel.text``).

In: :func:`hf_llama_plan` maps a local ``LlamaForCausalLM`` directory (sharded safetensors or
``.bin``) onto the branch, growing the vocabulary rows to our tokenizer's. Out: :func:`export_text`
writes the branch as a Hugging Face directory with the run's tokenizer.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mico_ds.checkpoint.formats.reader import (
    CheckpointReader,
    Conversion,
    check_plan,
    load_plan_into,
    order_by_file,
    target_shapes,
)
from mico_ds.checkpoint.formats.safetensors import Renamed, TensorLike, save_state_dict
from mico_ds.config import TextConfig

TEXT_PREFIX = "text.llm."  # MiCoModel.text.llm: the LlamaForCausalLM (text branch)


_HF_IGNORED_SUFFIX = (".rotary_emb.inv_freq",)  # buffers some older checkpoints saved


def hf_llama_plan(
    source_shapes: dict[str, tuple[int, ...]], branch: nn.Module, where: str = "checkpoint"
) -> list[Conversion]:
    """Conversion plan (:mod:`~mico_ds.checkpoint.formats.reader`) from a Hugging Face Llama checkpoint.

    Keys map one to one (``model.*`` -> ``llm.model.*``, ``lm_head.weight`` -> ``llm.lm_head.weight``);
    the embedding and LM-head rows grow to our vocabulary (new rows at the mean of the old ones); a
    checkpoint with tied embeddings and no ``lm_head.weight`` fills the head from the embeddings.

    Raises:
        ValueError: naming ``where`` and every key or shape that does not fit ``branch``.
    """
    plan: list[Conversion] = []
    for k in source_shapes:
        if k.endswith(_HF_IGNORED_SUFFIX):
            continue
        op = "rows" if k in ("model.embed_tokens.weight", "lm_head.weight") else "copy"
        plan.append(Conversion(f"llm.{k}", (k,), op))
    if "lm_head.weight" not in source_shapes and "model.embed_tokens.weight" in source_shapes:
        plan.append(Conversion("llm.lm_head.weight", ("model.embed_tokens.weight",), "rows"))
    check_plan(plan, source_shapes, target_shapes(branch), where)
    return plan


def load_hf_llama(branch: nn.Module, path: str | Path) -> None:
    """Load a local Hugging Face Llama directory into a plain (not partitioned) ``branch``.

    One shard file open at a time, one tensor converted at a time (:func:`hf_llama_plan`). Under
    ZeRO-3 the trainer loads through ``mico_ds.distributed.zero_load`` instead.
    """
    reader = CheckpointReader(path)
    try:
        plan = order_by_file(hf_llama_plan(reader.shapes(), branch, str(path)), reader.key_to_file)
        load_plan_into(branch, plan, reader)
    finally:
        reader.close()


def text_llama_config(tensors: Mapping[str, TensorLike], t: TextConfig, special: Any):
    """The ``LlamaConfig`` of the trained text branch, checked against the tensors' shapes."""
    from transformers import LlamaConfig

    from mico_ds.models.text_branch import llama_config

    if t.pretrained and (Path(t.pretrained) / "config.json").is_file():
        conf = LlamaConfig.from_pretrained(t.pretrained, local_files_only=True)
        conf.vocab_size = special.vocab_size  # the tokenizer's added <pad>/<mask> rows
        conf.pad_token_id = special.pad_id
    else:
        conf = llama_config(t, special)
    conf.use_cache = True  # the exported model is for inference / generation
    conf.architectures = ["LlamaForCausalLM"]
    emb = tensors.get(TEXT_PREFIX + "model.embed_tokens.weight")
    layer_re = re.compile(re.escape(TEXT_PREFIX) + r"model\.layers\.(\d+)\.")
    layers = {int(m.group(1)) for k in tensors if (m := layer_re.match(k))}
    got = (tuple(emb.shape) if emb is not None else None, len(layers))
    want = ((conf.vocab_size, conf.hidden_size), conf.num_hidden_layers)
    if got != want:
        raise ValueError(
            f"text branch tensors (embed_tokens {got[0]}, {got[1]} layers) do not match the config "
            f"(vocab_size x hidden_size {want[0]}, num_hidden_layers {want[1]}): wrong config or tokenizer"
        )
    return conf


def export_text(
    tensors: Mapping[str, TensorLike],
    text: TextConfig,
    out_dir: str | Path,
    tokenizer: Any,
    max_shard_size: int | None = None,
) -> Path:
    """Write the Llama text branch as a Hugging Face directory (weights, config, tokenizer); returns it.

    Args:
        tokenizer: a ``mico_ds.data.tokenizer.Tokenizer`` (its special ids and vocabulary are the model's).
    """
    from transformers import GenerationConfig

    out = Path(out_dir)
    names = {k[len(TEXT_PREFIX) :]: k for k in tensors if k.startswith(TEXT_PREFIX)}
    if not names:
        raise ValueError(f"no {TEXT_PREFIX}* tensors in the state dict: not a MiCoModel checkpoint?")
    conf = text_llama_config(tensors, text, tokenizer.special)
    # check names against transformers' own module (on the meta device: nothing allocated)
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        ref = LlamaForCausalLM(conf)
    want = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    have = {k: tuple(tensors[v].shape) for k, v in names.items()}
    if want != have:
        raise ValueError(
            f"text branch does not fit LlamaForCausalLM: missing {sorted(set(want) - set(have))[:6]}, "
            f"unexpected {sorted(set(have) - set(want))[:6]}, shape mismatch "
            f"{[(k, have[k], want[k]) for k in sorted(set(want) & set(have)) if want[k] != have[k]][:6]}"
        )
    out.mkdir(parents=True, exist_ok=True)
    conf.save_pretrained(str(out))
    s = tokenizer.special
    GenerationConfig(bos_token_id=s.bos_id, eos_token_id=s.eos_id, pad_token_id=s.pad_id).save_pretrained(
        str(out)
    )
    save_state_dict(Renamed(tensors, names), out, max_shard_size=max_shard_size)
    tokenizer.save_pretrained(out)
    return out
