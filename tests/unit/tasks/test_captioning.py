"""The captioning task (mico_ds/tasks/captioning.py) and SCST (mico_ds/objectives/scst.py).

Protocol: shards written by the project's coco-karpathy writer with five captions an image, read by
the evaluation loader, are scored against all five references, as pycocoevalcap scores them.
SCST: its CIDEr-D equals pycocoevalcap's score for score (df from the given references, or from a
training set); a fixed number of decoder calls whatever the captions; the same samples for the same
(step, micro); the log-probs the loss uses are the sampler's; one SGD step makes a caption better
than the greedy one more likely (and a worse one less); the batches carry every reference; the
config refuses what it cannot train."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mico_ds.cli import make_shards
from mico_ds.config import ObjectiveConfig, load_config
from mico_ds.config.scst_section import ScstConfig
from mico_ds.data import schema
from mico_ds.data.io import expand_urls
from mico_ds.data.read.plan import StreamPlan
from mico_ds.data.read.stream import ShardStream, StreamSpec
from mico_ds.eval.captioning import (
    DecodeOptions,
    MaskDecoder,
    Rollout,
    coco_tokenize,
    evaluate_captioning,
    generate,
    left_pad,
    sample_fixed,
)
from mico_ds.models.mico import MiCoModel
from mico_ds.objectives.scst import REFERENCES, CiderD, ScstObjective, scst_loss, sequence_logprobs
from mico_ds.tasks import captioning as task_mod
from tests.helpers.tiny import make_random_batch, make_tiny_config, make_tiny_special
from tests.unit.data.test_downstream_formats import INPUTS, argv, eval_batch, jpeg, json_lines, write

CAPTIONS = {
    1: ["A man riding a wave on top of a surfboard.", "A surfer rides a large wave in the ocean.",
        "A person on a surf board riding a wave.", "A man surfing a big wave at the beach.",
        "Surfer in a black wetsuit riding an ocean wave."],
    2: ["Two dogs playing with a frisbee in the grass.", "A pair of dogs chase a red frisbee.",
        "Dogs run across a field after a flying disc.", "Two brown dogs in a park with a frisbee.",
        "A dog jumps to catch a frisbee while another watches."],
    3: ["A plate of food with broccoli and rice.", "A white plate topped with rice and vegetables.",
        "Broccoli, rice and chicken on a dinner plate.", "A healthy meal of rice and broccoli.",
        "Food on a plate including broccoli and a bowl of rice."],
}  # fmt: skip
CANDIDATES = {1: "a man riding a wave on a surfboard", 2: "two dogs chase a frisbee in a park",
              3: "a plate of broccoli"}  # fmt: skip


def coco_shards(tmp: Path, split: str) -> Path:
    """tools/make_shards.py --format coco-karpathy on a Karpathy JSON of 3 images, 5 captions each."""
    root = tmp / "coco"
    images = []
    for n, caps in CAPTIONS.items():
        name = f"COCO_val2014_{n:012d}.jpg"
        write(root / "val2014" / name, jpeg(40 * n))
        sents = [{"raw": c, "tokens": [], "sentid": 10 * n + j} for j, c in enumerate(caps)]
        images.append({"filepath": "val2014", "filename": name, "imgid": n, "cocoid": n, "split": split,
                       "sentences": sents, "sentids": []})  # fmt: skip
    ann = write(tmp / "dataset_coco.json", json_lines(images, "images") + "\n")
    out = tmp / split
    assert make_shards.main(argv("coco-karpathy", [ann], out, root, "--split", split)) == 0
    return out


class Words:
    """A word-level tokenizer over a fixed vocabulary: ids 4.. are the words (tests.helpers.tiny)."""

    def __init__(self, texts: list[str]) -> None:
        self.words = sorted({w for t in texts for w in coco_tokenize(t).split()})
        self.special = make_tiny_special(4 + len(self.words))

    def ids(self, text: str) -> list[int]:
        return [4 + self.words.index(w) for w in coco_tokenize(text).split()]

    def decode(self, ids: list[int]) -> str:
        return " ".join(self.words[i - 4] for i in ids if i >= 4)


class IdWords:
    """Decodes token id i (>= 4) as the word "w{i}": captions of the tiny model's vocabulary."""

    def decode(self, ids: list[int]) -> str:
        return " ".join(f"w{i}" for i in ids if i >= 4)


class Scripted:
    """A 'model' whose decoder says a fixed caption per sample key (greedy, without the cache)."""

    def __init__(self, tok: Words, scripts: dict[str, list[int]]) -> None:
        self.tok, self.scripts, self.rows = tok, scripts, []

    def context_prefix(self, batch: dict) -> torch.Tensor:
        self.rows = [self.scripts[k] + [self.tok.special.eos_id] for k in batch[schema.KEYS]]
        return torch.arange(len(self.rows), dtype=torch.float32).view(-1, 1, 1)

    def next_token_logits(self, prefix, ids, mask, past_key_values=None, use_cache=False):
        t = ids.shape[1] - 2  # [BOS, t generated tokens, <mask>]
        logits = torch.full((ids.shape[0], self.tok.special.vocab_size), -1e9)
        for r in range(ids.shape[0]):
            row = self.rows[int(prefix[r, 0, 0])]
            logits[r, row[min(t, len(row) - 1)]] = 0.0
        return logits, None


def pycoco(cands: list[str], refs: list[list[str]]) -> tuple[float, list[float], float]:
    """(corpus CIDEr-D, per-item CIDEr-D, BLEU-4) of pycocoevalcap on coco_tokenize'd texts."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider

    res = {i: [coco_tokenize(c)] for i, c in enumerate(cands)}
    gts = {i: [coco_tokenize(r) for r in rs] for i, rs in enumerate(refs)}
    cider, per_item = Cider().compute_score(gts, res)
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    return float(cider), [float(x) for x in per_item], float(bleu[3])


# ----------------------------------------------------------------------------- the protocol


def test_evaluation_scores_against_every_reference_of_a_coco_karpathy_item(tmp_path: Path) -> None:
    out = coco_shards(tmp_path, "test")
    batch = eval_batch(out, ["image"])
    keys = batch[schema.KEYS]
    assert batch[schema.EVAL_TEXTS] == [CAPTIONS[int(k[-12:])] for k in keys]  # all five, in order
    tok = Words([*CANDIDATES.values(), *(c for cs in CAPTIONS.values() for c in cs)])
    model = Scripted(tok, {k: tok.ids(CANDIDATES[int(k[-12:])]) for k in keys})
    opts = DecodeOptions(num_beams=1, max_len=12, use_cache=False)
    res = evaluate_captioning(model, [batch], tok, opts, examples=10)
    cands = [CANDIDATES[int(k[-12:])] for k in keys]
    assert [e["generated"] for e in res["captioning/examples"]] == cands
    cider, _, bleu4 = pycoco(cands, [CAPTIONS[int(k[-12:])] for k in keys])
    assert res["captioning/cider"] == pytest.approx(cider, abs=1e-12)
    assert res["captioning/bleu4"] == pytest.approx(bleu4, abs=1e-12)
    assert res["captioning/refs_per_item"] == 5.0
    one_ref, _, _ = pycoco(cands, [CAPTIONS[int(k[-12:])][:1] for k in keys])
    assert abs(one_ref - cider) > 0.05  # against the first reference only it would be another figure


# ----------------------------------------------------------------------------- CIDEr-D of the reward

REFS = [[coco_tokenize(c) for c in cs] for cs in CAPTIONS.values()]
HYPS = [coco_tokenize(c) for c in CANDIDATES.values()]


def test_cider_d_equals_pycocoevalcap_item_by_item() -> None:
    _, want, _ = pycoco(HYPS, REFS)
    scorer = CiderD.from_references(REFS)
    got = [scorer.score(h, r) for h, r in zip(HYPS, REFS)]
    assert got == pytest.approx(want, rel=1e-12, abs=1e-12)
    assert all(x > 0 for x in got)
    # unknown words, a one-word and an empty caption, a reference itself
    odd = ["zebra surfboard", "wave", "", REFS[2][0]]
    _, want, _ = pycoco(odd, REFS[:3] + [REFS[2]])
    scorer = CiderD.from_references(REFS[:3] + [REFS[2]])
    assert [scorer.score(h, r) for h, r in zip(odd, REFS[:3] + [REFS[2]])] == pytest.approx(want, abs=1e-12)


def test_training_df_scores_as_pycocoevalcap_over_the_training_set(tmp_path: Path) -> None:
    out = coco_shards(tmp_path, "train")
    cfg = load_config("debug", ["task.name=captioning", f"data.root={out}"])
    cfg.data.corpora[0].shards = "*.tar"
    train = list(task_mod.train_references(cfg))
    assert sorted(train) == sorted(CAPTIONS.values())  # every caption of every item
    scorer = CiderD.from_references([[coco_tokenize(r) for r in rs] for rs in train])
    # pycocoevalcap scores each item with the df of all the items it is given: here the training set
    _, want, _ = pycoco(HYPS, list(CAPTIONS.values()))
    assert [scorer.score(h, r) for h, r in zip(HYPS, REFS)] == pytest.approx(want, abs=1e-12)


def test_rewards_are_cider_d_of_the_decoded_captions() -> None:
    tok = Words([*CANDIDATES.values(), *(c for cs in CAPTIONS.values() for c in cs)])
    eos, pad, t = tok.special.eos_id, tok.special.pad_id, 12
    rows = []
    for i, (h, refs) in enumerate(zip(HYPS, REFS)):  # greedy = the candidate; sample = a reference
        a, b = tok.ids(h) + [eos], tok.ids(refs[i]) + [eos]
        rows.append([a + [pad] * (t - len(a)), b[:t] + [pad] * (t - len(b))])
    tokens = torch.tensor(rows)
    lengths = torch.tensor([[min(len(tok.ids(h)) + 1, t), min(len(tok.ids(r[i])) + 1, t)]
                            for i, (h, r) in enumerate(zip(HYPS, REFS))])  # fmt: skip
    obj = ScstObjective(ScstConfig(enabled=True, df="batch"), tok)
    r = obj.rewards(Rollout(tokens, lengths), list(CAPTIONS.values()), eos)
    _, greedy, _ = pycoco(HYPS, list(CAPTIONS.values()))
    sampled = [tok.decode(row[1][: int(n[1]) - 1]) for row, n in zip(rows, lengths)]
    _, best, _ = pycoco(sampled, list(CAPTIONS.values()))
    assert r[:, 0].tolist() == pytest.approx(greedy, abs=1e-12)
    assert r[:, 1].tolist() == pytest.approx(best, abs=1e-12)
    assert (r[:, 1] > r[:, 0]).all()  # a reference beats the candidates


# ----------------------------------------------------------------------------- decoding and the loss


@pytest.fixture()
def tiny() -> tuple[MiCoModel, dict]:
    torch.manual_seed(0)
    cfg = make_tiny_config()
    model = MiCoModel.from_run_config(cfg, make_tiny_special())
    return model, make_random_batch(cfg, ["image"], 3, seed=1)


class Counting:
    """A model wrapper counting decoder calls (and optionally making EOS the likeliest token)."""

    def __init__(self, model: MiCoModel, eos_bonus: float = 0.0) -> None:
        self.model, self.special, self.bonus, self.calls = model, model.special, eos_bonus, 0

    def next_token_logits(self, *args, **kwargs):
        self.calls += 1
        logits, cache = self.model.next_token_logits(*args, **kwargs)
        logits[:, self.special.eos_id] += self.bonus
        return logits, cache


@pytest.mark.parametrize("eos_bonus", [0.0, 100.0])
def test_every_rank_decodes_exactly_max_tokens_steps(tiny, eos_bonus: float) -> None:
    model, batch = tiny
    prefix = model.context_prefix(batch).detach()
    counting = Counting(model, eos_bonus)
    sp = model.special
    roll = sample_fixed(
        counting, prefix, sp, num_samples=2, max_tokens=6, generator=torch.Generator().manual_seed(0)
    )
    assert counting.calls == 6 and roll.tokens.shape == (3, 3, 6) and roll.lengths.shape == (3, 3)
    if eos_bonus:  # every caption ends at once; the decoder still ran six steps
        assert (roll.tokens[..., 0] == sp.eos_id).all() and (roll.tokens[..., 1:] == sp.pad_id).all()
        assert (roll.lengths == 1).all()
    for row, n in zip(roll.tokens.view(9, 6).tolist(), roll.lengths.flatten().tolist()):
        assert sp.eos_id not in row[: n - 1] and all(x == sp.pad_id for x in row[n:])
        assert n == 6 or row[n - 1] == sp.eos_id


def test_greedy_row_is_greedy_decoding_and_samples_are_seeded(tiny) -> None:
    model, batch = tiny
    prefix = model.context_prefix(batch).detach()
    obj = ScstObjective(ScstConfig(enabled=True, num_samples=4, max_tokens=5, temperature=3.0), Words(["a"]))
    a = obj.rollout(model, prefix, step=7, micro=1)
    b = obj.rollout(model, prefix, step=7, micro=1)
    c = obj.rollout(model, prefix, step=7, micro=0)
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.lengths, b.lengths)
    assert not torch.equal(a.tokens[:, 1:], c.tokens[:, 1:])  # another micro-batch, other samples
    assert torch.equal(a.tokens[:, 0], c.tokens[:, 0])  # the greedy baseline draws nothing
    with torch.no_grad():
        g = generate(model, prefix, [[model.special.bos_id]] * 3, model.special, DecodeOptions(1, max_len=5))
    for i, toks in enumerate(g.tokens):
        assert a.tokens[i, 0, : len(toks)].tolist() == toks
    assert len({tuple(r) for r in a.tokens[:, 1:].reshape(-1, 5).tolist()}) > 3  # temperature 3: varied


def _decoder_logprob(model: MiCoModel, prefix: torch.Tensor, row: list[int], n: int) -> float:
    """sum log p of the first n tokens of ``row`` as the MaskDecoder computes them (fed the tokens)."""
    sp = model.special
    ids, mask = left_pad([[sp.bos_id]], sp.pad_id)
    dec = MaskDecoder(model, prefix, ids, mask, num_beams=1, mask_id=sp.mask_id)
    with torch.no_grad():
        logp, total = dec.start(), 0.0
        for t in range(n):
            total += float(logp[0, row[t]])
            if t + 1 < n:
                logp = dec.step(torch.tensor([row[t]]), torch.tensor([0]))
    return total


def test_loss_logprobs_are_the_samplers(tiny) -> None:
    model, batch = tiny
    model.eval()
    prefix = model.context_prefix(batch).detach()
    roll = sample_fixed(model, prefix, model.special, 2, 6, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        lp = sequence_logprobs(model, prefix, roll.tokens, roll.lengths)
    for i in range(3):
        for j in range(3):
            n = int(roll.lengths[i, j])
            want = _decoder_logprob(model, prefix[i : i + 1], roll.tokens[i, j].tolist(), n)
            assert float(lp[i, j]) == pytest.approx(want, abs=1e-4)


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_one_sgd_step_moves_a_caption_by_the_sign_of_its_advantage(tiny, sign: float) -> None:
    model, batch = tiny
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        roll = sample_fixed(model, model.context_prefix(batch), model.special, 1, 6, generator=g)
    tokens, lengths = roll.tokens[:, 1:], roll.lengths[:, 1:]

    def logp() -> torch.Tensor:
        return sequence_logprobs(model, model.context_prefix(batch), tokens, lengths)

    before = logp().detach()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    scst_loss(logp(), torch.full_like(before, sign)).backward()
    opt.step()
    after = logp().detach()
    assert ((after - before) * sign > 0).all(), (before, after)


def test_a_sample_better_than_greedy_is_made_more_likely(tiny) -> None:
    """The whole term: references = the sampled captions, so each sample beats its greedy caption."""
    model, batch = tiny
    words = IdWords()
    obj = ScstObjective(
        ScstConfig(enabled=True, num_samples=1, max_tokens=6, temperature=2.0, df="batch"), words
    )
    prefix = model.context_prefix(batch)
    roll = obj.rollout(model, prefix, step=0, micro=0)
    sampled = [words.decode(r[: int(n)].tolist()) for r, n in zip(roll.tokens[:, 1], roll.lengths[:, 1])]
    refs = [[s, "w90 w91"] for s in sampled]
    r = obj.rewards(roll, refs, model.special.eos_id)
    assert (r[:, 1] > r[:, 0]).all(), r
    loss, report = obj(model, {**batch, REFERENCES: refs}, prefix, step=0, micro=0)
    assert float(report["scst_reward"]) == pytest.approx(float(r[:, 1].mean()))
    assert float(report["scst_baseline"]) == pytest.approx(float(r[:, 0].mean()))
    before = sequence_logprobs(model, prefix, roll.tokens[:, 1:], roll.lengths[:, 1:]).detach()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    loss.backward()
    opt.step()
    after = sequence_logprobs(model, model.context_prefix(batch), roll.tokens[:, 1:], roll.lengths[:, 1:])
    assert (after.detach() > before).all()


def test_model_forward_reports_scst_and_replaces_generation() -> None:
    torch.manual_seed(0)
    cfg = make_tiny_config()
    special = make_tiny_special()
    words = IdWords()
    obj = ScstObjective(ScstConfig(enabled=True, max_tokens=4, weight=0.5, df="batch"), words)
    objectives = ObjectiveConfig(contrastive_weight=0.0, matching_weight=0.0)
    model = MiCoModel(cfg.model, cfg.inputs, objectives, special, scst=obj)
    batch = make_random_batch(cfg, ["image"], 2, seed=3)
    calls = []
    model.text.register_forward_hook(lambda *a: calls.append(1))
    with pytest.raises(ValueError, match="references"):
        model(batch)
    calls.clear()
    losses, report = model({**batch, REFERENCES: [["w5 w6 w7"], ["w8 w9", "w10"]]}, step=1, micro=0)
    assert len(calls) == 4 + 1  # max_tokens decoder calls + the teacher-forced pass; no cross-entropy
    assert float(losses["generation_loss"]) == 0.0 and "masked_tokens" not in report
    torch.testing.assert_close(losses["loss"], 0.5 * losses["scst_loss"])
    assert {"scst_reward", "scst_baseline"} <= set(report)
    losses["loss"].backward()
    assert any(
        p.grad is not None and p.grad.abs().sum() > 0 for p in model.encoder.parameters()
    )  # via the prefix
    added = MiCoModel(cfg.model, cfg.inputs, objectives, special,
                      scst=ScstObjective(ScstConfig(enabled=True, max_tokens=4, replace_generation=False,
                                                    df="batch"), words))  # fmt: skip
    losses, report = added({**batch, REFERENCES: [["w5"], ["w8"]]}, step=1, micro=0)
    torch.testing.assert_close(losses["loss"], losses["generation_loss"] + losses["scst_loss"])
    assert float(report["masked_tokens"]) > 0


# ----------------------------------------------------------------------------- the batches and the config


def test_training_batches_carry_every_reference(tmp_path: Path) -> None:
    out = coco_shards(tmp_path, "train")

    def batches(task) -> list[dict]:
        spec = StreamSpec(
            corpus="coco", plan=StreamPlan(urls=tuple(expand_urls("*.tar", str(out))), num_streams=1,
            shuffle=False, shuffle_buffer=0), modalities=("image",), inputs=INPUTS, batch_size=2, train=True,
            tokenizer=None, text_max_len=32, rank=0, workers=1, positions=[(0, 0, 0)], infinite=False,
            drop_last=False, task=task,
        )  # fmt: skip
        return [m.batch for m in ShardStream(spec) if m.batch is not None]

    with_refs, plain = batches(task_mod.CaptionSamples(max_len=32)), batches(None)
    keys = [k for b in with_refs for k in b[schema.KEYS]]
    assert [r for b in with_refs for r in b[REFERENCES]] == [CAPTIONS[int(k[-12:])] for k in keys]
    for a, b in zip(with_refs, plain):  # otherwise the very same batches (the same caption draws)
        assert a[schema.CAPTIONS] == b[schema.CAPTIONS] and torch.equal(a["image"], b["image"])
        assert REFERENCES not in b


def test_config_keys_and_refusals() -> None:
    with pytest.raises(ValueError, match=r"task\.scst: unknown key\(s\) \['samples'\]"):
        load_config("debug", ["task.name=captioning", "task.scst.samples=5"])
    with pytest.raises(
        ValueError, match=r"task\.scst\.enabled=true needs task\.name=captioning \(got task\.name=pretrain"
    ):
        load_config("debug", ["task.scst.enabled=true"])
    with pytest.raises(ValueError, match="num_samples"):
        load_config("debug", ["task.name=captioning", "task.scst.num_samples=0"])
    with pytest.raises(ValueError, match="allowed"):
        load_config("debug", ["task.name=captioning", "task.scst.df=eval"])
    base = ["task.name=captioning", "objectives.contrastive_weight=0", "objectives.matching_weight=0",
            "eval.tasks=[captioning]"]  # fmt: skip
    cfg = load_config("debug", base)
    assert ScstObjective.from_run_config(cfg) is None and task_mod.TASK.sample_task(cfg) is None
    task_mod.TASK.check(cfg)
    cfg = load_config("debug", [*base, "task.scst.enabled=true", "task.scst.num_samples=5"])
    task_mod.TASK.check(cfg)
    obj = ScstObjective.from_run_config(cfg)
    assert obj is not None and obj.cfg.num_samples == 5 and obj.train_references is not None
    assert isinstance(task_mod.TASK.sample_task(cfg), task_mod.CaptionSamples)
