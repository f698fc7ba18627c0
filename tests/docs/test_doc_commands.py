"""Every shell command of the README and docs/ works as written.

Each command is matched by exactly one rule below, which says how it is checked:

* ``run``: executed as written in a sandbox directory (``tools/`` and ``launch/`` linked from the
  checkout, the package installed), after the placeholders are replaced by what exists there
  (``NAME`` -> ``debug``, ``DIR`` and ``runs/demo`` -> the sandbox's real 2-rank debug run, ``G`` -> 2,
  ``OUT`` -> a fresh directory, ...); the exit status must be the documented one;
* ``variant``: a named cheaper form is executed instead (``--help``, ``--dry-run``, ``--print-config``),
  for a command that trains for minutes or needs a cluster-sized corpus;
* ``covered``: another test runs it (named, and checked to exist);
* ``artifact``: it is the command that makes one of the sandbox's artifacts (the debug run every
  checkpoint command reads): it ran, as written, before the commands that need it;
* a block that opens with ``# cluster example`` is for a cluster: the scripts it names must exist.

A command no rule matches, or a rule no command matches, fails the test: documenting a command means
deciding how it is checked.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.helpers.doc_commands import REPO, DocCommand, commands

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

# Placeholders of the docs -> what the sandbox has (whole words only).
PLACEHOLDERS = {
    "/shared/runs/NAME": "runs/slurm-debug",
    "runs/demo": "runs/debug",
    "runs/NAME": "runs/debug",
    "runs/a": "runs/debug",
    "runs/b": "runs/debug",
    "NAME": "debug",
    "RECIPE": "debug",
    "DIR": "runs/debug",
    "G": "2",
    "OUT": "out",
    "EXPORT": "export",
    "step00040000": "step00000006",  # the debug recipe's last checkpoint
    "/tmp/tiny": "tiny",
}


@dataclass(frozen=True)
class Rule:
    pattern: str  # regex on the command (re.fullmatch)
    mode: str  # run | variant | covered | artifact
    variant: str = ""  # variant: the command run instead; covered: the test that runs it; artifact: its name
    needs: tuple[str, ...] = ()  # sandbox artifacts: "run" (the debug run), "manifest", "mycorpus"
    fresh: tuple[str, ...] = ()  # sandbox paths removed before the command (it creates them)
    rc: int = 0  # expected exit status
    expect: tuple[str, ...] = field(default_factory=tuple)  # substrings of the output


H = "variant"
INIT_TEST = "tests/integration/test_init.py"
# fmt: off
RULES: list[Rule] = [
    # --- the two quickstart commands
    Rule(r"bash tools/install\.sh --test && python -m pytest -q tests", "covered", ".ci/run"),
    Rule(r"bash tools/install\.sh && python -m mico_ds\.train --recipe demo", H,
         "python -m mico_ds.train --recipe demo --print-config", expect=("name: demo",)),
    # --- data
    Rule(r"python tools/make_demo_data\.py --out data/demo", "run", expect=("omni train",)),  # then reused
    Rule(r"python tools/make_demo_data\.py --out /tmp/tiny --num-train 16 --num-val 8 --force", "run"),
    Rule(r"python tools/make_shards\.py --manifest raw/manifest\.jsonl --out data/mycorpus .*", "run",
         needs=("manifest",), fresh=("data/mycorpus",), expect=("samples in",)),
    # each corpus's published layout, written by its test (real media), through the same CLI flags
    Rule(r"python tools/make_shards\.py --format (vast27m|hdvila|video2dataset|wavcaps|webvid) .*", "covered",
         "tests/unit/data/test_ingest_formats.py::test_{1}"),
    Rule(r"python tools/make_shards\.py --format (coco-karpathy|msrvtt|audiocaps|clotho|vast|vqa|videoqa|"
         r"imagefolder|labels-csv) .*", "covered", "tests/unit/data/test_downstream_formats.py::test_{1}"),
    Rule(r"python tools/split_subsets\.py --shards .*--sizes 1000000,10000000.*", H,
         "python tools/split_subsets.py --help"),  # the sizes of a 10^8-sample corpus
    Rule(r"python tools/split_subsets\.py --manifest raw/manifest\.jsonl --sizes 0\.01,0\.1,0\.5 .*", "run",
         needs=("manifest",), fresh=("subsets",)),
    Rule(r"python tools/inspect_shards\.py 'data/mycorpus/mycorpus-\*\.tar' --json", "run",
         needs=("mycorpus",)),
    Rule(r"python tools/index_shards\.py 'data/mycorpus/mycorpus-\*\.tar' --force", "run",
         needs=("mycorpus",), expect=("counted",)),
    Rule(r"python tools/index_shards\.py /data/\S+ .*", H, "python tools/index_shards.py --help"),  # no data
    Rule(r"python tools/fuzz_decoders\.py --seconds 300 --json fuzz\.json", H,  # five minutes
         "python tools/fuzz_decoders.py --examples 32 --json fuzz.json", expect=("0 crashes",)),
    Rule(r"MICO_FUZZ_PROFILE=long MICO_FUZZ_EXAMPLES=1000 python -m pytest (tests/\S+) -q", "covered", "{1}"),
    Rule(r"python tools/train_tokenizer\.py --captions-from data/mycorpus .*", "run", needs=("mycorpus",),
         fresh=("data/mycorpus/tokenizer",)),
    Rule(r"python tools/train_tokenizer\.py --captions-from captions\.txt .*", H,
         "python tools/train_tokenizer.py --help"),
    # --- training (the demo trains for minutes: its config is resolved instead)
    Rule(r"python -m mico_ds\.train --recipe demo --optim\.lr=3e-4 --train\.max_steps=600 .*", H,
         "python -m mico_ds.train --recipe demo --optim.lr=3e-4 --train.max_steps=600 "
         "--model.vision.depth=4 --print-config", expect=("max_steps: 600",)),
    Rule(r"python -m mico_ds\.train --recipe demo --optim\.lr=3e-4 --print-config", "run",
         expect=("lr: 0.0003",)),
    Rule(r"python -m mico_ds\.train --help-config", "run", expect=("--optim.lr=",)),
    Rule(r"deepspeed --num_gpus G --module mico_ds\.train --recipe NAME --run-dir DIR", "artifact", "run"),
    Rule(r"deepspeed --num_gpus G --module mico_ds\.train --recipe NAME --run-dir DIR --resume latest", "run",
         needs=("run",), expect=("resumed from",)),
    # --- fine-tuning: a weights-only start (real 2-rank runs from each kind of source)
    Rule(r"deepspeed --num_gpus G --module mico_ds\.train --recipe NAME --run-dir runs/ft --init EXPORT",
         "covered", f"{INIT_TEST}::test_init_from_exports_lists_what_the_model_adds"),
    Rule(r"deepspeed --num_gpus G --module mico_ds\.train --recipe NAME --run-dir runs/ft --init [rO]\S+",
         "covered", f"{INIT_TEST}::test_init_from_run_universal_or_consolidated_gives_one_first_loss"),
    Rule(r"deepspeed --num_gpus G --module mico_ds\.train --recipe NAME --run-dir runs/ft "
         r"--init mico/model_step_NNNN\.pt --model\.vision\.pretrained=null",
         "covered", "tests/unit/test_mico_release.py::test_init_from_loads_the_release_state_dict"),
    Rule(r"deepspeed --num_gpus G --module mico_ds\.train --recipe NAME --init PATH --run-dir DIR "
         r"--task\.name=classification .*", "covered",  # its overrides, loaded and checked on debug
         "tests/unit/tasks/test_classification.py::test_the_documented_overrides_load"),
    Rule(r"python -m mico_ds\.train --recipe demo_qa --init runs/demo --run-dir runs/demo_qa", H,  # minutes
         "python -m mico_ds.train --recipe demo_qa --print-config", expect=("qa_baseline_shards",)),
    Rule(r"python -m mico_ds\.train --recipe demo_retrieval --init runs/demo --run-dir runs/demo_retrieval",
         H, "python -m mico_ds.train --recipe demo_retrieval --print-config",
         expect=("test_shards: image_text",)),
    # the B.3 fine-tuning recipes (docs/finetune_recipes.md): hours on an 8-GPU node, so their config resolves
    Rule(r"deepspeed --num_gpus 8 --module mico_ds\.train --recipe (ft_\w+) "
         r"--init /shared/runs/vitg_llama2_7b --run-dir runs/\1", H,
         "python -m mico_ds.train --recipe {1} --print-config", expect=("keep_best: true",)),
    # captioning, B.3's two COCO stages (docs/captioning.md): hours on a GPU node, so their config resolves
    Rule(r"deepspeed --num_gpus G --module mico_ds\.train --recipe NAME --init (PATH|DIR) "
         r"--run-dir (DIR|DIR_scst)( --task\.scst\.enabled=true|)", H,
         "python -m mico_ds.train --recipe debug --task.name=captioning --objectives.contrastive_weight=0 "
         "--objectives.matching_weight=0 '--eval.tasks=[captioning]'{3} --print-config", expect=("scst:",)),
    # --- planner
    Rule(r"python tools/plan\.py .*--validate", "covered",
         "tests/unit/test_plan.py::test_predicted_peak_matches_a_real_zero3_cpu_run"),
    Rule(r"python tools/plan\.py vitg_llama2_7b_64gpu --model\.vision\.grad_checkpointing=false", "run",
         rc=1, expect=("NO",)),
    Rule(r"python tools/plan\.py \S+( .*)?", "run", expect=("fits",)),
    # --- launching and operating
    Rule(r"SLURM_JOB_NODELIST=.* launch/slurm_pretrain\.sh --dry-run .*", "run", expect=("== hostfile",)),
    Rule(r"launch/slurm_pretrain\.sh --help", "run", expect=("usage:",)),
    Rule(r"launch/pretrain_local\.sh --recipe NAME --run-dir runs/NAME", H,  # here: the deepspeed line
         "launch/pretrain_local.sh --dry-run --recipe debug --run-dir runs/debug"),
    Rule(r"CPU_RANKS=2 launch/pretrain_local\.sh --recipe debug --run-dir runs/debug", "run",
         needs=("run",), expect=("resuming from",)),
    Rule(r"launch/pretrain_local\.sh --dry-run .*", "run", expect=("== launch",)),
    Rule(r"python launch/hostfile\.py hostnames 'node\[01-08\]'", "run", expect=("node08",)),
    Rule(r"python launch/hostfile\.py hostfile .*", "run", expect=("node01 slots=8",)),
    Rule(r"python launch/hostfile\.py ds-config .*", "run", expect=("offload_optimizer",)),
    Rule(r"python launch/hostfile\.py signal .*", "run"),
    # --- evaluation, conversion, ablations
    Rule(r"python -m mico_ds\.eval --checkpoint runs/demo .*", "run", needs=("run",), fresh=("eval.json",),
         expect=("R@1",)),
    Rule(r"deepspeed --num_gpus 2 --module mico_ds\.eval --checkpoint runs/demo", "run", needs=("run",),
         expect=("R@1",)),
    Rule(r"python tools/zero_to_fp32\.py --help", "run"),
    Rule(r"python tools/zero_to_fp32\.py (runs/demo|runs/NAME) .*", "run", needs=("run",),
         fresh=("out", "export")),
    Rule(r"python -m mico_ds\.eval --checkpoint OUT/model\.safetensors .*", "run", needs=("run", "out"),
         expect=("R@1",)),
    Rule(r"python tools/to_universal\.py runs/NAME.*", "run", needs=("run",),
         fresh=("runs/debug/checkpoints/step00000006_universal",)),
    Rule(r"python -m mico_ds\.checkpoint runs/NAME.*", "run", needs=("run",), expect=("verified 7 files",)),
    Rule(r"python tools/ablate\.py --out runs/ablation.*", H, "python tools/ablate.py --help"),  # 30 minutes
    Rule(r"python tools/plot_runs\.py runs/a runs/b --out curves\.png", "run", needs=("run",)),
    Rule(r"python tools/plot_runs\.py runs/ablation/.*", H, "python tools/plot_runs.py --help"),
    # --- benchmarks: minutes each, and the GPU ones need a GPU
    Rule(r"python tools/bench_gpu_step\.py --slice debug --steps 3", "run"),
    Rule(r"python -m deepspeed\.launcher\.runner --num_gpus 1 tools/bench_gpu_step\.py .*--zero 3.*", H,
         "python tools/bench_gpu_step.py --help", expect=("--zero",)),  # its CPU form runs in gpu_check
    Rule(r"python tools/gpu_check\.py --device cpu --quick .*", "covered",
         "tests/integration/test_gpu_check.py"),
    Rule(r"python tools/gpu_check\.py --out .*", H, "python tools/gpu_check.py --help",
         expect=("--device cpu --quick",)),
    Rule(r"python -m pytest -m gpu (tests/gpu) -q", "covered", "{1}/test_kernels_gpu.py"),
    Rule(r"python tools/bench_(loader|kernels|train|gpu_step|finetune)\.py.*", H,
         "python tools/bench_{1}.py --help"),
    # --- the test suite's own parts (.ci/run runs every test file)
    Rule(r"python -m pytest (tests/\S+) -q", "covered", "{1}"),
]
# fmt: on


def rule_for(cmd: DocCommand) -> tuple[Rule, re.Match] | None:
    for rule in RULES:
        m = re.fullmatch(rule.pattern, cmd.text)
        if m:
            return rule, m
    return None


def substitute(text: str) -> str:
    for k in sorted(PLACEHOLDERS, key=len, reverse=True):
        text = re.sub(rf"(?<![\w/.-]){re.escape(k)}(?![\w-])", PLACEHOLDERS[k], text)
    return text


# ----------------------------------------------------------------------------- the sandbox


class Sandbox:
    def __init__(self, root: Path) -> None:
        self.root = root
        for d in ("tools", "launch"):
            (root / d).symlink_to(REPO / d)
        self.env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        # `deepspeed` and `python` of this environment first on PATH, as in an activated venv
        self.env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{self.env.get('PATH', '')}"
        self.env.pop("PYTHONPATH", None)
        self.made: set[str] = set()

    def sh(self, command: str, timeout: float = 900) -> subprocess.CompletedProcess:
        return subprocess.run(["bash", "-c", command], cwd=self.root, env=self.env, capture_output=True,
                              text=True, timeout=timeout)  # fmt: skip

    def need(self, what: str) -> None:
        if what in self.made:
            return
        if what == "run":  # the README's launch line, as the other commands' checkpoint
            r = self.sh(
                substitute("deepspeed --num_gpus G --module mico_ds.train --recipe NAME --run-dir DIR")
            )
            assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        elif what == "manifest":
            write_manifest(self.root / "raw")
        elif what == "mycorpus":
            self.need("manifest")
            r = self.sh("python tools/make_shards.py --manifest raw/manifest.jsonl --out data/mycorpus "
                        "--prefix mycorpus --overwrite")  # fmt: skip
            assert r.returncode == 0, r.stderr
        elif what == "out":  # remade every time: the conversion commands replace it
            self.need("run")
            shutil.rmtree(self.root / "out", ignore_errors=True)
            r = self.sh("python tools/zero_to_fp32.py runs/debug out")
            assert r.returncode == 0, r.stderr
            return
        self.made.add(what)


def write_manifest(raw: Path) -> None:
    """24 samples with real media (JPEG, FLAC, H.264 MP4, 16-bit PNG depth) in the manifest layout (enough
    for distinct subsets of 1%, 10% and 50%)."""
    import numpy as np

    from mico_ds.data.write import media

    raw.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    lines = []
    for i in range(24):
        key = f"clip{i:04d}"
        (raw / f"{key}.jpg").write_bytes(media.encode_jpeg(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)))
        (raw / f"{key}.flac").write_bytes(
            media.encode_flac(0.1 * rng.standard_normal(8000).astype(np.float32))
        )
        frames = rng.integers(0, 255, (4, 32, 32, 3), dtype=np.uint8)
        (raw / f"{key}.mp4").write_bytes(media.encode_mp4(frames))
        depth = rng.integers(500, 5000, (32, 32), dtype=np.uint16)
        (raw / f"{key}.depth.png").write_bytes(media.encode_png16(depth))
        lines.append({"key": key, "image": f"{key}.jpg", "audio": f"{key}.flac", "video": f"{key}.mp4",
                      "depth": f"{key}.depth.png", "category": ["music", "speech"][i % 2],
                      "captions": {"vision": f"a picture of {i}", "audio": f"a sound of {i}"}})  # fmt: skip
    (raw / "manifest.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory) -> Sandbox:
    return Sandbox(tmp_path_factory.mktemp("docs"))


# ----------------------------------------------------------------------------- the tests

DOC_COMMANDS = commands()


def test_every_command_has_exactly_one_way_to_be_checked() -> None:
    unmatched = [str(c) for c in DOC_COMMANDS if not c.cluster and rule_for(c) is None]
    assert not unmatched, "documented commands no rule checks (add a rule, or mark the block):\n" + "\n".join(
        unmatched
    )
    used = {rule_for(c)[0].pattern for c in DOC_COMMANDS if not c.cluster and rule_for(c)}
    stale = [r.pattern for r in RULES if r.pattern not in used]
    assert not stale, f"rules that match no documented command: {stale}"


def test_no_doc_uses_the_launcher_flag_deepspeed_refuses() -> None:
    bad = [str(c) for c in DOC_COMMANDS if re.search(r"\bdeepspeed\b.* -m ", c.text)]
    assert not bad, f"DeepSpeed's launcher takes --module, not -m: {bad}"


@pytest.mark.parametrize("cmd", [c for c in DOC_COMMANDS if c.cluster], ids=str)
def test_cluster_examples_name_scripts_that_exist(cmd: DocCommand) -> None:
    scripts = re.findall(r"(?:launch|tools)/[\w.]+\.(?:sh|py)", cmd.text)
    assert scripts or cmd.text.startswith("scancel"), cmd
    for s in scripts:
        assert (REPO / s).is_file(), f"{cmd}: {s} does not exist"


def _expand(template: str, m: re.Match) -> str:
    return re.sub(r"\{(\d)\}", lambda g: m.group(int(g.group(1))), template)


@pytest.mark.parametrize("cmd", [c for c in DOC_COMMANDS if not c.cluster], ids=str)
def test_documented_command(cmd: DocCommand, sandbox: Sandbox) -> None:
    found = rule_for(cmd)
    assert found is not None, f"no rule for {cmd}"
    rule, m = found
    if rule.mode == "covered":
        target = _expand(rule.variant, m)
        path, _, name = target.partition("::")
        name = name.replace("-", "_")  # a test name cannot hold the '-' of a format name (labels-csv)
        assert (REPO / path).exists(), f"{cmd}: {path} does not exist"
        if path == ".ci/run":
            assert cmd.text in (REPO / path).read_text(), f".ci/run does not run {cmd.text!r}"
        if name:
            assert f"def {name}(" in (REPO / path).read_text(), f"{cmd}: no test {target}"
        return
    if rule.mode == "artifact":
        sandbox.need(rule.variant)
        assert (sandbox.root / "runs/debug/summary.json").is_file()
        return
    for what in rule.needs:
        sandbox.need(what)
    for p in rule.fresh:
        target = sandbox.root / p
        shutil.rmtree(target, ignore_errors=True) if target.is_dir() else target.unlink(missing_ok=True)
    text = substitute(cmd.text if rule.mode == "run" else _expand(rule.variant, m))
    r = sandbox.sh(text)
    out = r.stdout + r.stderr
    assert r.returncode == rule.rc, f"{cmd}\nran: {text}\nexit {r.returncode}\n{out[-4000:]}"
    for s in rule.expect:
        assert s in out, f"{cmd}\nran: {text}\n{s!r} not in the output:\n{out[-3000:]}"
