"""Text branch: parity with transformers.LlamaForCausalLM, prefix path, pooling, init, local pretrained."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from transformers import LlamaForCausalLM

from mico_ds.checkpoint.formats.hf_llama import load_hf_llama
from mico_ds.config import TextConfig
from mico_ds.data.schema import SpecialTokens
from mico_ds.models.text_branch import TextBranch, last_valid_index, llama_config
from tests.helpers.tiny import make_tiny_config, make_tiny_special


def _text_cfg(**kw: object) -> TextConfig:
    return dataclasses.replace(make_tiny_config().model.text, **kw)


def _branch_and_ref(attn: str = "sdpa", **kw: object) -> tuple[TextBranch, LlamaForCausalLM]:
    special = make_tiny_special()
    torch.manual_seed(0)
    ours = TextBranch(_text_cfg(attn_implementation=attn, **kw), special).eval()
    ref = LlamaForCausalLM(llama_config(_text_cfg(attn_implementation=attn), special)).eval()
    ref.load_state_dict(ours.llm.state_dict())
    return ours, ref


def _text(b: int = 3, n: int = 9, vocab: int = 96) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(4, vocab, (b, n), generator=g)
    mask = torch.ones(b, n, dtype=torch.long)
    for r, length in enumerate([n, n - 3, 4][:b]):
        mask[r, length:] = 0
        ids[r, length:] = 0
    return ids, mask


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_text_logits_match_llama(attn: str) -> None:
    ours, ref = _branch_and_ref(attn)
    ids, mask = _text()
    with torch.no_grad():
        mine = ours.lm_logits(ours(ids, mask).hidden)
        theirs = ref(input_ids=ids, attention_mask=mask).logits
    valid = mask.bool()
    torch.testing.assert_close(mine[valid], theirs[valid])


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_prefix_path_equals_llama_on_concatenated_embeddings(attn: str) -> None:
    ours, ref = _branch_and_ref(attn)
    ids, mask = _text()
    prefix = torch.randn(3, 5, 64)
    with torch.no_grad():
        out = ours(ids, mask, prefix=prefix)
        embeds = torch.cat([prefix, ref.get_input_embeddings()(ids)], dim=1)
        full_mask = torch.cat([torch.ones(3, 5, dtype=torch.long), mask], dim=1)
        theirs = ref(inputs_embeds=embeds, attention_mask=full_mask).logits
    assert out.hidden.shape == (3, 14, 64)
    torch.testing.assert_close(out.mask, full_mask)
    valid = full_mask.bool()
    torch.testing.assert_close(ours.lm_logits(out.hidden)[valid], theirs[valid])


@pytest.mark.parametrize("pooling", ["mean", "last"])
def test_pooled_text_feature(pooling: str) -> None:
    ours, ref = _branch_and_ref(pooling=pooling)
    ids, mask = _text()
    with torch.no_grad():
        feat = ours.text_features(ids, mask)
        h = ref.model(input_ids=ids, attention_mask=mask).last_hidden_state
    for r in range(3):
        n = int(mask[r].sum())
        expect = h[r, :n].mean(0) if pooling == "mean" else h[r, n - 1]
        torch.testing.assert_close(feat[r], expect)


def test_padding_does_not_change_valid_positions() -> None:
    ours, _ = _branch_and_ref()
    ids, mask = _text()
    padded_ids = torch.cat([ids, torch.zeros(3, 4, dtype=torch.long)], dim=1)
    padded_mask = torch.cat([mask, torch.zeros(3, 4, dtype=torch.long)], dim=1)
    with torch.no_grad():
        a = ours.text_features(ids, mask)
        b = ours.text_features(padded_ids, padded_mask)
    torch.testing.assert_close(a, b)


def test_init_is_llama_scheme_inside_each_leaf() -> None:
    torch.manual_seed(0)
    ours = TextBranch(_text_cfg(), make_tiny_special())
    emb = ours.llm.get_input_embeddings().weight
    assert torch.all(emb[0] == 0)  # padding row
    for w in (emb[1:], ours.llm.lm_head.weight, ours.llm.model.layers[0].mlp.up_proj.weight):
        assert (
            0.017 < float(w.detach().std()) < 0.023
        )  # normal(0, initializer_range=0.02), not torch defaults
    assert torch.all(ours.llm.model.norm.weight == 1)
    # same seed, same weights
    torch.manual_seed(0)
    again = TextBranch(_text_cfg(), make_tiny_special())
    for (n, p), q in zip(ours.named_parameters(), again.parameters()):
        torch.testing.assert_close(p, q, msg=n)


def test_last_valid_index() -> None:
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1]])
    assert last_valid_index(mask).tolist() == [2, 0, 3]


def test_grad_checkpointing_same_grads() -> None:
    ids, mask = _text()
    grads = []
    for ckpt in (False, True):
        torch.manual_seed(0)
        tb = TextBranch(_text_cfg(grad_checkpointing=ckpt), make_tiny_special()).train()
        assert getattr(tb.llm, "is_activation_checkpointing", None) == ckpt
        tb.text_features(ids, mask).square().sum().backward()
        grads.append({n: p.grad.clone() for n, p in tb.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], msg=n)


def test_from_local_pretrained_directory_resizes_vocab(tmp_path: Path) -> None:
    small = SpecialTokens(vocab_size=90, pad_id=0, bos_id=1, eos_id=2, mask_id=3)
    torch.manual_seed(3)
    src = LlamaForCausalLM(llama_config(_text_cfg(), small))
    src.save_pretrained(tmp_path / "llama")
    special = make_tiny_special()  # 96 = 90 + tokens the tokenizer added
    tb = TextBranch(_text_cfg(pretrained=str(tmp_path / "llama")), special)
    load_hf_llama(tb, tmp_path / "llama")  # construction builds the architecture only
    assert tb.vocab_size == 96
    emb = tb.llm.get_input_embeddings().weight
    assert emb.shape == (96, 64) and tb.llm.lm_head.weight.shape == (96, 64)
    torch.testing.assert_close(emb[:90], src.get_input_embeddings().weight)
    torch.testing.assert_close(
        tb.llm.model.layers[1].self_attn.q_proj.weight, src.model.layers[1].self_attn.q_proj.weight
    )


def test_bad_configs_raise(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="pooling"):
        TextBranch(_text_cfg(pooling="cls"), make_tiny_special())
    with pytest.raises(ValueError, match="mask_id"):
        TextBranch(_text_cfg(), SpecialTokens(vocab_size=10, pad_id=0, bos_id=1, eos_id=2, mask_id=10))
    with pytest.raises(ValueError, match="not a Hugging Face model directory"):
        TextBranch(_text_cfg(pretrained=str(tmp_path)), make_tiny_special())
    with pytest.raises(ValueError, match="divisible"):
        TextBranch(_text_cfg(hidden_size=66), make_tiny_special())
