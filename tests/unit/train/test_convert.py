"""Checkpoint lookup for the converters, and the data streams across a world-size change.

The world-size tests run the real training mixture (``build_train_loader``) on demo shards as ranks of
one world size, merge their saved states as ``Trainer.load`` does, and continue on another world size.
"""

from __future__ import annotations

import importlib.util
import json
from collections import Counter
from pathlib import Path

import pytest

from mico_ds import checkpoint as ckpt
from mico_ds.checkpoint import list_tags, locate
from mico_ds.config import load_config
from mico_ds.data import schema
from mico_ds.data.read.mixture import build_train_loader
from mico_ds.demo.corpus import make_demo_corpus

REPO = Path(__file__).resolve().parents[3]


def _fake_checkpoint(ckpt_dir: Path, tags: list[str], latest: str | None) -> None:
    for t in tags:
        (ckpt_dir / t).mkdir(parents=True)
        (ckpt_dir / t / "zero_pp_rank_0_mp_rank_00_model_states.pt").write_bytes(b"")
    (ckpt_dir / "not_a_checkpoint").mkdir(parents=True)
    if latest:
        (ckpt_dir / "latest").write_text(latest)


def test_find_checkpoint_accepts_run_checkpoints_and_tag_dirs(tmp_path: Path) -> None:
    ck = tmp_path / "run" / "checkpoints"
    _fake_checkpoint(ck, ["step00000003", "step00000006"], "step00000006")
    assert list_tags(ck) == ["step00000003", "step00000006"]
    where = lambda *a: (locate(*a).path, locate(*a).tag)  # noqa: E731
    assert where(tmp_path / "run") == (ck, "step00000006")
    assert where(ck, "step00000003") == (ck, "step00000003")
    assert where(ck / "step00000003") == (ck, "step00000003")
    with pytest.raises(ValueError, match="--tag step00000006 names another one"):
        locate(ck / "step00000003", "step00000006")


def test_find_checkpoint_errors_name_what_exists(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="nope: no such directory"):
        locate(tmp_path / "nope")
    ck = tmp_path / "checkpoints"
    _fake_checkpoint(ck, ["step00000003"], latest=None)
    with pytest.raises(ValueError, match=r"latest does not exist .*pass --tag, one of: \['step00000003'\]"):
        locate(ck)
    with pytest.raises(ValueError, match=r"no checkpoint 'step9' in .*available tags: \['step00000003'\]"):
        locate(ck, "step9")


def _tool(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "tools" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("tool", ["zero_to_fp32", "to_universal"])
def test_tools_report_a_bad_tag_with_the_available_ones(tmp_path: Path, tool: str, capsys) -> None:
    ck = tmp_path / "checkpoints"
    _fake_checkpoint(ck, ["step00000003"], latest="step00000003")
    argv = [str(ck), "--tag", "step7"] + ([str(tmp_path / "out")] if tool == "zero_to_fp32" else [])
    assert _tool(tool).main(argv) == 2
    err = capsys.readouterr().err
    assert "no checkpoint 'step7'" in err and "step00000003" in err


def test_merge_data_states_keeps_every_rank_positions() -> None:
    def corpus(rank: int, positions: list[list[int]]) -> dict:
        stats = {"seen": 10 + rank, "skipped": {}, "examples": {}}
        return {"version": 1, "corpus": "c", "rank": rank, "world_size": 2, "workers": 2, "next": 1,
                "positions": positions, "stats": stats}  # fmt: skip

    def mixture(r: int) -> dict:
        joined = {"version": 1, "sources": {"s": corpus(r, [[2 * r, 0, 0]])}}
        return {"version": 1, "step": 7, "corpora": {"c": corpus(r, [[r, 1, 2], [0, 0, r]]), "j": joined}}

    states = [mixture(r) for r in range(2)]
    m = ckpt.merge_data_states(states, rank=1)
    assert m["step"] == 7
    assert m["corpora"]["c"]["positions"] == [[0, 1, 2], [0, 0, 0], [1, 1, 2], [0, 0, 1]]
    assert m["corpora"]["j"]["sources"]["s"]["positions"] == [[0, 0, 0], [2, 0, 0]]
    assert m["corpora"]["c"]["stats"]["seen"] == 11  # rank 1's own counters
    assert ckpt.merge_data_states(states, rank=3)["corpora"]["c"]["stats"]["seen"] == 0  # a new rank


# ----------------------------------------------------------------------------- real streams


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """5 shards of 4 samples: over 2 ranks the streams get 3 and 2 shards, so they wrap at different
    steps and the ranks' streams are in different epochs (what makes merging all ranks matter)."""
    out = tmp_path_factory.mktemp("demo")
    make_demo_corpus(
        out, num_train=20, num_val=4, samples_per_shard=4, image_size=32, num_frames=2, audio_seconds=1.0,
        single_pair=False, vocab_size=300, progress=False, workers=1,
    )  # fmt: skip
    return out


def _loader(root: Path, rank: int, world: int):
    cfg = load_config(
        "debug",
        [f"data.root={root}", f"data.tokenizer={root}/tokenizer/tokenizer.model", "data.num_workers=0",
         "data.shuffle_buffer=3", "data.shards_per_chunk=1", "train.max_steps=100"],
    )  # fmt: skip
    cfg.data.corpora[0].batch_size = 2
    return build_train_loader(cfg, rank=rank, world_size=world)


def _epoch_keys(loader, n: int) -> list[tuple[int, str]]:
    """(epoch, key) of the next n batches' samples (no batch straddles two epochs here: every stream's
    epoch has an even number of samples, the batch size is 2)."""
    corpus = loader.loaders["omni"]
    out = []
    for _ in range(n):
        b = next(loader)
        epoch = corpus.positions[(corpus.rotation + corpus.consumed - 1) % corpus.workers][0]
        out += [(epoch, k) for k in b[schema.KEYS]]
    return out


@pytest.mark.parametrize(("old_world", "new_world"), [(2, 1), (1, 2)])
def test_world_size_change_repeats_no_sample_within_an_epoch(
    corpus: Path, old_world: int, new_world: int
) -> None:
    steps_before, steps_after = 5, 10
    seen: list[tuple[int, str]] = []
    states = []
    for r in range(old_world):
        ld = _loader(corpus, r, old_world)
        seen += _epoch_keys(ld, steps_before)
        states.append(json.loads(json.dumps(ld.state_dict())))  # as saved: JSON-able
        ld.close()
    furthest = max(p[0] for s in states for p in s["corpora"]["omni"]["positions"])
    if old_world == 2:
        # rank 1's stream (2 shards, 4 batches an epoch) is in epoch 1, rank 0's (3 shards) still in 0
        assert [s["corpora"]["omni"]["positions"][0][0] for s in states] == [0, 1]
    for r in range(new_world):
        ld = _loader(corpus, r, new_world)
        ld.load_state_dict(ckpt.merge_data_states(states, r))
        assert ld.step == steps_before  # the corpus schedule continues where it was
        assert ld.loaders["omni"].positions == [(furthest + 1, 0, 0)]
        seen += _epoch_keys(ld, steps_after)
        ld.close()
    repeats = [ek for ek, n in Counter(seen).items() if n > 1]
    assert not repeats, f"samples seen twice in the same epoch: {repeats}"
    if old_world == 2:
        # the other-topology rule fed only old rank 0's state would restart at epoch 1 and repeat the
        # epoch-1 samples old rank 1 already consumed: the reason Trainer.load merges every rank
        ld = _loader(corpus, 0, 1)
        ld.load_state_dict(states[0])
        assert ld.loaders["omni"].positions == [(1, 0, 0)]
        again = Counter(seen[: old_world * steps_before * 2] + _epoch_keys(ld, steps_after))
        ld.close()
        assert any(n > 1 for n in again.values())


def test_zero0_checkpoint_is_its_module_file(tmp_path: Path, capsys) -> None:
    """ZeRO-0 keeps the whole module in mp_rank_00_model_states.pt (DeepSpeed's zero_to_fp32 does not
    read stage 0): the tool writes that module, and to_universal says no conversion is needed."""
    import torch

    from mico_ds.checkpoint.formats.safetensors import load_state_dict

    tag = tmp_path / "checkpoints" / "step00000001"
    (tag / "client").mkdir(parents=True)
    module = {"w": torch.randn(3, 4), "n": torch.arange(3)}
    torch.save({"module": module, "optimizer": {}}, tag / "mp_rank_00_model_states.pt")
    (tag / "client" / "meta.json").write_text(json.dumps({"world_size": 2, "step": 1}))
    (tmp_path / "checkpoints" / "latest").write_text("step00000001")
    assert _tool("zero_to_fp32").main([str(tmp_path), str(tmp_path / "out"), "--quiet"]) == 0
    assert "ZeRO-0, written by 2 rank(s)" in capsys.readouterr().out
    got = load_state_dict(tmp_path / "out")
    assert got.keys() == module.keys() and all(torch.equal(got[k], module[k]) for k in module)
    assert _tool("to_universal").main([str(tmp_path)]) == 2
    assert "loads on any number of ranks as it is" in capsys.readouterr().err


def test_zero0_bf16_checkpoint_gives_the_fp32_master_weights(tmp_path: Path) -> None:
    """bf16 without ZeRO: the module file holds bf16 copies, the optimizer its fp32 masters in unnamed
    per-group lists; they are named by the trainer's own param-group rule (here four groups: decay or
    not x a text branch at half the learning rate)."""
    import torch

    from mico_ds.config import to_dict
    from mico_ds.distributed.zero_checkpoint import fp32_state_dict
    from mico_ds.models.mico import MiCoModel
    from mico_ds.optim import param_groups
    from tests.helpers.tiny import make_tiny_config, make_tiny_special

    cfg = make_tiny_config()
    cfg.optim.text_lr_scale = 0.5
    torch.manual_seed(0)
    model = MiCoModel.from_run_config(cfg, make_tiny_special())
    groups = param_groups(model, cfg.optim)
    assert len(groups) == 4  # (decay or not) x (scale 1 or 0.5)
    masters = [[p.detach().clone() + 1e-4 for p in g["params"]] for g in groups]  # not bf16-representable
    tag = tmp_path / "checkpoints" / "step00000001"
    (tag / "client").mkdir(parents=True)
    module = {k: v.to(torch.bfloat16) for k, v in model.state_dict().items()}
    torch.save({"module": module, "optimizer": {"fp32_groups": masters}}, tag / "mp_rank_00_model_states.pt")
    (tag / "client" / "meta.json").write_text(
        json.dumps({"world_size": 1, "step": 1, "config": to_dict(cfg)})
    )
    got = {k: v.contiguous() for k, v in fp32_state_dict(tmp_path / "checkpoints", "step00000001").items()}
    want = {n: m for g, ms in zip(groups, masters) for n, m in zip(
        [k for k, p in model.named_parameters() if any(p is q for q in g["params"])], ms)}  # fmt: skip
    assert got.keys() == module.keys() == want.keys()
    for k in want:
        assert got[k].dtype == torch.float32 and torch.equal(got[k], want[k]), k
