"""Checkpoint conversion on a real 2-rank ZeRO-3 run of the debug recipe (gloo, CPU).

* tools/zero_to_fp32.py gives, tensor by tensor, what DeepSpeed's own reconstruction gives (its library
  function and the zero_to_fp32.py script it copies next to the checkpoints);
* --export-branches: timm's VisionTransformer and transformers' LlamaForCausalLM / AutoTokenizer load the
  exports and reproduce the trained module's encoder features and text logits on a held-out sample;
* tools/to_universal.py: 2 ranks -> 1 rank -> 2 ranks. After each conversion + resume the fp32 weights
  and Adam moments, gathered to full tensors from the ZeRO partitions the resumed run saves, equal the
  ones before (and the per-group hyperparameters survive); the 1-rank run trains on.
"""

from __future__ import annotations

import glob
import importlib.util
import json
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers.train import REPO, data_overrides, env, run_train, train_records

pytestmark = [pytest.mark.distributed, pytest.mark.slow]
STEPS = 3


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("debug_data")


@pytest.fixture(scope="module")
def run2(tmp_path_factory, data_root) -> Path:
    """A finished 2-rank ZeRO-3 run whose latest checkpoint is step STEPS."""
    run = tmp_path_factory.mktemp("convert") / "run"
    run_train(run, *data_overrides(data_root), f"--train.max_steps={STEPS}", "--train.save_every=100")
    return run


def tool(name: str, *args: str) -> subprocess.CompletedProcess:
    p = subprocess.run([sys.executable, str(REPO / "tools" / f"{name}.py"), *args], cwd=REPO, env=env(),
                       capture_output=True, text=True, timeout=600)  # fmt: skip
    assert p.returncode == 0, f"{name} exited {p.returncode}\n{p.stdout[-4000:]}\n{p.stderr[-4000:]}"
    return p


def tool_main(name: str, *args: str) -> int:
    """The tool's main() in this process (no interpreter start-up)."""
    spec = importlib.util.spec_from_file_location(f"_tool_{name}", REPO / "tools" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.main(list(args))


def _rank(f: str) -> int:
    return int(re.search(r"zero_pp_rank_(\d+)_mp_rank", f).group(1))


def gather_zero3(tag_dir: Path) -> dict:
    """Full fp32 weights and Adam moments from the ZeRO-3 partition files of any world size.

    Written from the layout (each rank's flat group holds, per parameter in group order, a slice of
    ceil(numel / world) elements; the last rank's is zero-padded), independently of DeepSpeed's readers.
    """
    models = sorted(glob.glob(str(tag_dir / "zero_pp_rank_*_model_states.pt")), key=_rank)
    optims = sorted(glob.glob(str(tag_dir / "zero_pp_rank_*_optim_states.pt")), key=_rank)
    world = len(optims)
    shapes = torch.load(models[0], weights_only=False)["param_shapes"]
    osd = [torch.load(f, weights_only=False)["optimizer_state_dict"] for f in optims]
    base = osd[0]["optimizer_state_dict"]
    out: dict = {
        "world": world,
        "steps": [float(s["step"]) for s in base["state"].values()],
        "groups": [{k: v for k, v in g.items() if k != "params"} for g in base["param_groups"]],
        "aliased_step": len({id(s["step"]) for s in base["state"].values()}) < len(base["state"]),
        **{key: {} for key in ("fp32", "exp_avg", "exp_avg_sq")},
    }
    for g, group in enumerate(shapes):
        flats = {
            "fp32": [o["fp32_flat_groups"][g] for o in osd],
            "exp_avg": [o["optimizer_state_dict"]["state"][g]["exp_avg"] for o in osd],
            "exp_avg_sq": [o["optimizer_state_dict"]["state"][g]["exp_avg_sq"] for o in osd],
        }
        offset = 0
        for name, shape in group.items():
            n = math.prod(shape)
            part = math.ceil(n / world)
            for key, parts in flats.items():
                out[key][name] = torch.cat([p[offset : offset + part] for p in parts])[:n].view(shape)
            offset += part
    return out


def assert_same_optimizer_state(a: dict, b: dict, step: int) -> None:
    assert a["world"] != b["world"]
    for key in ("fp32", "exp_avg", "exp_avg_sq"):
        assert a[key].keys() == b[key].keys() and len(a[key]) > 50
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), (key, name)
    assert a["steps"] == b["steps"] == [float(step)] * len(a["groups"])
    assert a["groups"] == b["groups"]
    assert not b["aliased_step"], "one Adam step tensor shared by several param groups"
    assert sorted(g["weight_decay"] for g in a["groups"]) == [0.0, 0.01]  # the groups still differ


def test_zero_to_fp32_matches_deepspeed(run2: Path, tmp_path: Path) -> None:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from mico_ds.checkpoint.formats.safetensors import load_state_dict

    ck = run2 / "checkpoints"
    p = tool("zero_to_fp32", str(run2), str(tmp_path / "ours"), "--max-shard-size", "100KB")
    assert "ZeRO-3, written by 2 rank(s)" in p.stdout and "peak memory" in p.stdout
    index = json.loads((tmp_path / "ours" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) >= 3  # 0.4 MB in 100 KB shards
    ours = load_state_dict(tmp_path / "ours")
    ref = get_fp32_state_dict_from_zero_checkpoint(str(ck))
    # the script DeepSpeed copied next to the checkpoints, run as an operator would
    script_cmd = [
        sys.executable,
        str(ck / "zero_to_fp32.py"),
        str(ck),
        str(tmp_path / "script"),
        "--safe_serialization",
    ]
    subprocess.run(script_cmd, check=True, env=env(), capture_output=True, timeout=300)
    script = load_state_dict(tmp_path / "script")
    assert ours.keys() == ref.keys() == script.keys()
    assert any(k.startswith("encoder.") for k in ours) and any(k.startswith("text.llm.") for k in ours)
    for k in ref:
        assert ours[k].dtype == torch.float32
        assert torch.equal(ours[k], ref[k]) and torch.equal(ours[k], script[k]), k
    # one .bin file, tag named explicitly, checkpoints dir given
    assert tool_main("zero_to_fp32", str(ck), "--tag", f"step{STEPS:08d}", str(tmp_path / "bin"),
                     "--format", "bin", "--max-shard-size", "none", "--quiet") == 0  # fmt: skip
    assert sorted(f.name for f in (tmp_path / "bin").iterdir()) == [
        "mico_ds_checkpoint.json",
        "pytorch_model.bin",
    ]
    one = load_state_dict(tmp_path / "bin")
    assert all(torch.equal(one[k], ref[k]) for k in ref) and one.keys() == ref.keys()


def test_export_branches_reproduce_the_trained_module(run2: Path, tmp_path: Path) -> None:
    import timm
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from timm.models.vision_transformer import VisionTransformer
    from transformers import AutoTokenizer, LlamaForCausalLM

    from mico_ds.checkpoint import Location, read_run_config
    from mico_ds.checkpoint.formats.safetensors import load_state_dict
    from mico_ds.data import schema
    from mico_ds.data.read.mixture import build_eval_loader
    from mico_ds.data.tokenizer import Tokenizer
    from mico_ds.models.mico import MiCoModel

    out = tmp_path / "export"
    assert tool_main("zero_to_fp32", str(run2), "--export-branches", str(out), "--quiet") == 0
    ck = run2 / "checkpoints"
    cfg = read_run_config(Location("zero", ck, f"step{STEPS:08d}"))
    tok = Tokenizer.from_path(cfg.data.tokenizer)
    # the trained module: DeepSpeed's own consolidation
    trained = MiCoModel.from_run_config(cfg, tok.special).eval()
    trained.load_state_dict(get_fp32_state_dict_from_zero_checkpoint(str(ck)), strict=True)
    batch = next(iter(build_eval_loader(cfg, cfg.data.tokenizer, rank=0, world_size=1)))  # held-out
    image, ids, mask = batch["image"], batch[schema.TEXT_IDS], batch[schema.TEXT_MASK]

    conf = json.loads((out / "vision" / "config.json").read_text())
    vit = VisionTransformer(**conf["model_args"]).eval()
    vit.load_state_dict(load_state_dict(out / "vision"), strict=True)
    by_name = timm.create_model(f"local-dir:{out / 'vision'}", pretrained=True).eval()

    hf = LlamaForCausalLM.from_pretrained(out / "text", local_files_only=True).eval()
    hf_tok = AutoTokenizer.from_pretrained(out / "text", local_files_only=True)
    captions = [c.strip() for c in batch[schema.CAPTIONS]]
    assert [hf_tok(c, add_special_tokens=False)["input_ids"] for c in captions] == tok.tokenize_ids(captions)
    with torch.no_grad():
        feats = trained.encoder(image, "image", pool=False)
        torch.testing.assert_close(vit.forward_features(image), feats)
        torch.testing.assert_close(by_name.forward_features(image), feats)
        ours = trained.text.lm_logits(trained.text(ids, mask).hidden)
        theirs = hf(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(theirs[mask.bool()], ours[mask.bool()])
    assert ours.abs().max() > 0 and feats.std() > 0


def test_universal_checkpoint_changes_the_world_size_both_ways(run2: Path, data_root: Path, tmp_path: Path):
    from mico_ds.distributed.zero_checkpoint import to_universal

    tag3, tag4 = f"step{STEPS:08d}", f"step{STEPS + 1:08d}"
    src = tmp_path / "src" / "checkpoints"  # a copy: the shared run stays as it is
    shutil.copytree(run2 / "checkpoints" / tag3, src / tag3)
    shutil.copy(run2 / "checkpoints" / "latest", src / "latest")
    p = tool("to_universal", str(src.parent))
    assert f"--resume {tag3}_universal --allow-config-change" in p.stdout
    uni = src / f"{tag3}_universal"
    assert json.loads((uni / "mico_universal.json").read_text())["source_world_size"] == 2
    before = gather_zero3(run2 / "checkpoints" / tag3)
    # DeepSpeed's per-parameter files are the full tensors
    for key in ("fp32", "exp_avg", "exp_avg_sq"):
        name = "encoder.blocks.0.attn.qkv.weight"
        full = torch.load(uni / "zero" / name / f"{key}.pt", weights_only=False)
        full = full["param"] if isinstance(full, dict) else full
        assert torch.equal(full.view(before[key][name].shape), before[key][name])

    # the universal checkpoint consolidates to the same weights (read from its per-parameter files)
    from mico_ds.checkpoint.formats.safetensors import load_state_dict

    assert tool_main("zero_to_fp32", str(uni), str(tmp_path / "from_uni"), "--quiet") == 0
    from_uni = load_state_dict(tmp_path / "from_uni")
    assert from_uni.keys() == before["fp32"].keys()
    assert all(torch.equal(from_uni[k], before["fp32"][k]) for k in from_uni)

    # 2 -> 1: resume, save at once (no step), compare; then train one more step on 1 rank
    r1 = tmp_path / "r1"
    shutil.copytree(uni, r1 / "checkpoints" / uni.name)
    args = [*data_overrides(data_root), "--train.save_every=100", "--allow-config-change"]
    out = run_train(r1, *args, f"--train.max_steps={STEPS}", "--resume", uni.name, nproc=1)
    assert "world_size (2 -> 1)" in out.stdout + out.stderr
    assert_same_optimizer_state(before, gather_zero3(r1 / "checkpoints" / tag3), STEPS)
    run_train(r1, *args, f"--train.max_steps={STEPS + 1}", "--resume", "latest", nproc=1)
    assert [r["step"] for r in train_records(r1)] == [STEPS + 1] and math.isfinite(
        train_records(r1)[0]["loss"]
    )

    # a partitioned checkpoint of another world size is refused with the way out
    bad = run_train(r1, *args, f"--train.max_steps={STEPS + 2}", "--resume", "latest", check=False, nproc=2)
    assert bad.returncode != 0 and "python tools/to_universal.py" in bad.stdout + bad.stderr

    # 1 -> 2
    mid = gather_zero3(r1 / "checkpoints" / tag4)
    uni4 = to_universal(r1 / "checkpoints", tag4)
    r2 = tmp_path / "r2"
    shutil.copytree(uni4, r2 / "checkpoints" / uni4.name)
    run_train(r2, *args, f"--train.max_steps={STEPS + 1}", "--resume", uni4.name, nproc=2)
    assert_same_optimizer_state(mid, gather_zero3(r2 / "checkpoints" / tag4), STEPS + 1)


def test_zero2_converts_and_changes_the_world_size(data_root: Path, tmp_path: Path) -> None:
    """ZeRO-2 takes DeepSpeed's other routes (its reader joins partitions up front; its universal
    conversion and load are the ZeRO-1/2 ones): the same checks, 2 ranks -> 1 rank."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from mico_ds.checkpoint.formats.safetensors import load_state_dict
    from mico_ds.distributed.zero_checkpoint import to_universal

    tag = "step00000002"
    args = [*data_overrides(data_root), "--train.ds_config=zero2_cpu.json", "--train.max_steps=2",
            "--train.save_every=100"]  # fmt: skip
    run = tmp_path / "z2"
    run_train(run, *args)
    ck = run / "checkpoints"
    assert (
        tool_main("zero_to_fp32", str(run), str(tmp_path / "out"), "--max-shard-size", "100KB", "--quiet")
        == 0
    )
    ours, ref = load_state_dict(tmp_path / "out"), get_fp32_state_dict_from_zero_checkpoint(str(ck))
    assert ours.keys() == ref.keys() and all(torch.equal(ours[k], ref[k]) for k in ref)
    uni = to_universal(ck, tag)
    r1 = tmp_path / "r1"
    shutil.copytree(uni, r1 / "checkpoints" / uni.name)
    run_train(r1, *args, "--resume", uni.name, "--allow-config-change", nproc=1)
    again = to_universal(r1 / "checkpoints", tag, "again")  # the 1-rank save, per parameter again
    names = [p.name for p in (uni / "zero").iterdir() if p.is_dir()]
    assert len(names) > 50
    for name in names:
        for key in ("fp32", "exp_avg", "exp_avg_sq"):
            a = torch.load(uni / "zero" / name / f"{key}.pt", weights_only=False)
            b = torch.load(again / "zero" / name / f"{key}.pt", weights_only=False)
            a, b = (x["param"] if isinstance(x, dict) else x for x in (a, b))
            assert torch.equal(a, b), (name, key)
    osd = torch.load(
        r1 / "checkpoints" / tag / "zero_pp_rank_0_mp_rank_00_optim_states.pt", weights_only=False
    )
    groups = osd["optimizer_state_dict"]["base_optimizer_state"]["param_groups"]
    assert sorted(g["weight_decay"] for g in groups) == [0.0, 0.01]


class _Runs:
    """Unpickling this calls ``Path.touch(marker)``: what a tampered checkpoint could do on every rank."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_checkpoint_whose_pickle_runs_code_is_refused(run2: Path, data_root: Path, tmp_path: Path) -> None:
    """Resume, zero_to_fp32 and to_universal refuse a tag whose optimizer file would run code when
    DeepSpeed unpickles it (weights_only=False inside DeepSpeed), naming the file; nothing runs."""
    run = tmp_path / "run"
    shutil.copytree(run2, run)
    marker = tmp_path / "code_ran"
    f = run / "checkpoints" / f"step{STEPS:08d}" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    sd = torch.load(f, weights_only=False)  # our own file, read before it is tampered with
    sd["ds_config"]["note"] = _Runs(marker)
    torch.save(sd, f)
    # whoever tampers can rewrite the manifest too (its CRC-32s find damage, not intent): then only
    # the allow-list stands between the pickle and every rank
    from mico_ds.checkpoint import manifest

    m = manifest.read(f.parent)
    size, crc = manifest.checksum_file(f)
    m["files"][f.name].update(size=size, crc32=manifest.crc_hex(crc))
    manifest.write(f.parent, manifest.build(m["tag"], m["files"]))

    steps = f"--train.max_steps={STEPS + 1}"
    resume = run_train(run, *data_overrides(data_root), steps, "--resume", "latest", check=False)
    for name, args in [("zero_to_fp32", [str(run), str(tmp_path / "out")]), ("to_universal", [str(run)])]:
        p = subprocess.run([sys.executable, str(REPO / "tools" / f"{name}.py"), *args], cwd=REPO, env=env(),
                           capture_output=True, text=True, timeout=300)  # fmt: skip
        assert p.returncode != 0, name
        assert f"{f.name}: refused to load" in p.stdout + p.stderr and "pathlib" in p.stdout + p.stderr, name
    assert resume.returncode != 0
    assert f"{f.name}: refused to load" in resume.stdout + resume.stderr
    assert not marker.exists()
    assert not (tmp_path / "out").exists() and not list((run / "checkpoints").glob("*_universal*"))
