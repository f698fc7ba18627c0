"""launch/*.sh --dry-run from a fake SLURM environment: hostfile, per-node commands, DeepSpeed JSON.

Nothing is launched: the scripts run for real (bash, the hostfile helper, the trainer's own config
resolution) on an environment that looks like an 8-node x 8-GPU allocation. Host lists are expanded by
``scontrol show hostnames`` when SLURM's client can run here and by launch/hostfile.py otherwise; the
two are compared directly when scontrol is usable.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from mico_ds.config import list_recipes, load_config

ROOT = Path(__file__).resolve().parents[2]
SLURM_SCRIPT = ROOT / "launch" / "slurm_pretrain.sh"
LOCAL_SCRIPT = ROOT / "launch" / "pretrain_local.sh"
DOCS = ROOT / "docs" / "operations.md"

# Every recipe is dry-run at 64 ranks (the 64-GPU recipe joins this list by being a recipe), but for the
# B.3 fine-tunes (ft_*, tests/unit/test_finetune_recipes.py): they share the model, the DeepSpeed config and
# the batch factors, so one per task is dry-run, and every one gets, in-process, the only part of the dry run
# that depends on the recipe (test_every_fine_tune_resolves_as_its_dry_run_one).
FT_DRY_RUN = {"retrieval": "ft_msrvtt_ret", "captioning": "ft_msrvtt_cap", "qa": "ft_vqav2_qa"}
FT_RECIPES = [r for r in list_recipes() if r.startswith("ft_")]
RECIPES = [r for r in list_recipes() if r not in FT_RECIPES] + sorted(FT_DRY_RUN.values())

_spec = importlib.util.spec_from_file_location("launch_hostfile", ROOT / "launch" / "hostfile.py")
hostfile = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(hostfile)


def clean_env(**extra: str) -> dict[str, str]:
    """os.environ without any real SLURM_* / launcher variables, plus ``extra``."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("SLURM_", "MASTER_", "GPUS", "CPU_RANKS", "LAUNCHER", "HOSTFILE", "MICO_"))
    }
    env.update(extra)
    return env


def fake_slurm(nodes: int = 8, gpus: int = 8, **extra: str) -> dict[str, str]:
    base = {
        "SLURM_JOB_NODELIST": f"node[01-{nodes:02d}]",
        "SLURM_NNODES": str(nodes),
        "SLURM_JOB_ID": "4242",
        "GPUS_PER_NODE": str(gpus),
    }
    return clean_env(**{**base, **extra})


def run(script: Path, args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(script), *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=120
    )


def sections(out: str) -> dict[str, list[str]]:
    """'== name ... ==' headed blocks of a dry run, keyed by the header's first word."""
    blocks: dict[str, list[str]] = {}
    cur = None
    for line in out.splitlines():
        m = re.match(r"^== (\S+)", line)
        if m:
            cur = m.group(1)
            blocks[cur] = []
        elif cur is not None:
            blocks[cur].append(line)
    return blocks


def micro_and_accum(recipe: str, world: int = 1) -> tuple[int, int]:
    """Straight from the recipe: per-rank micro batch = largest corpus batch (derived from the global
    batch sizes for ``world`` ranks where a corpus gives them), and grad_accum."""
    cfg = load_config(recipe, [])
    cfg.data.resolve_batch_sizes(world, cfg.optim.grad_accum)
    return max(c.batch_size for c in cfg.data.corpora), cfg.optim.grad_accum


def scontrol_usable() -> bool:
    if shutil.which("scontrol") is None:
        return False
    r = subprocess.run(
        ["scontrol", "show", "hostnames", "n[1-2]"], capture_output=True, text=True, timeout=30
    )
    return r.returncode == 0 and r.stdout.split() == ["n1", "n2"]


# ------------------------------------------------------------------ host lists


@pytest.mark.parametrize(
    "expr, hosts",
    [
        ("node[01-08]", [f"node{i:02d}" for i in range(1, 9)]),
        ("gpu-[008-011]", ["gpu-008", "gpu-009", "gpu-010", "gpu-011"]),
        ("n[9-11]", ["n9", "n10", "n11"]),
        ("x[01-3]", ["x01", "x02", "x03"]),
        ("a,b[2-3],c[1,4-5]", ["a", "b2", "b3", "c1", "c4", "c5"]),
        ("r[1-2]-n[1-2]", ["r1-n1", "r1-n2", "r2-n1", "r2-n2"]),
    ],
)
def test_expand_hostlist(expr: str, hosts: list[str]) -> None:
    assert hostfile.expand_hostlist(expr) == hosts
    if scontrol_usable():  # the real reference, when SLURM's client runs here
        r = subprocess.run(
            ["scontrol", "show", "hostnames", expr], capture_output=True, text=True, check=True
        )
        assert r.stdout.split() == hosts


@pytest.mark.parametrize("expr", ["node[1-", "node]1[", "node[3-1]", "node[a-b]"])
def test_expand_hostlist_rejects(expr: str) -> None:
    with pytest.raises(ValueError, match="host list"):
        hostfile.expand_hostlist(expr)


def test_hostfile_text() -> None:
    assert hostfile.hostfile_text(["a", "b"], 4) == "a slots=4\nb slots=4\n"
    with pytest.raises(ValueError, match="slots"):
        hostfile.hostfile_text(["a"], 0)
    with pytest.raises(ValueError, match="duplicates"):
        hostfile.hostfile_text(["a", "a"], 1)


def test_trainer_detection() -> None:
    trainer = ["/usr/bin/python3", "-u", "-m", "mico_ds.train", "--recipe", "x", "--run-dir=r"]
    runner = ["python", "-u", "-m", "deepspeed.launcher.runner", "--module", "mico_ds.train"]
    launch = ["python", "-u", "-m", "deepspeed.launcher.launch", "--module", "mico_ds.train"]
    assert hostfile.is_trainer(trainer)
    assert not hostfile.is_trainer(runner) and not hostfile.is_trainer(launch)
    assert hostfile.run_dir_of(trainer) == "r"
    assert hostfile.run_dir_of(["-m", "mico_ds.train", "--run-dir", "a/b"]) == "a/b"
    assert hostfile.is_node_run(["python", "-u", "/x/launch/hostfile.py", "node-run", "--", "a"])


# ------------------------------------------------------------------ slurm_pretrain.sh --dry-run


@pytest.mark.parametrize("recipe", RECIPES)
def test_slurm_dry_run_8x8(recipe: str, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    args = ["--dry-run", "--recipe", recipe, "--run-dir", str(run_dir), "--train.max_steps=7"]
    r = run(SLURM_SCRIPT, args, fake_slurm(), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    sec = sections(r.stdout)

    assert sec["hostfile"] == [f"node{i:02d} slots=8" for i in range(1, 9)]
    assert "world size 64" in r.stdout

    per_node = sec["per-node"]
    assert len(per_node) == 8
    port = 20000 + 4242 % 20000
    for k, line in enumerate(per_node):
        assert line.startswith(f"node_rank={k} host=node{k + 1:02d}: ")
        assert f"--no_ssh --node_rank {k} " in line
        assert f"--master_addr node01 --master_port {port} " in line
        assert f"--hostfile {run_dir}/launch/hostfile.4242 " in line
        assert "-m deepspeed.launcher.runner" in line
        # the trainer's arguments pass through unchanged, no resume for a fresh run dir
        assert line.endswith(
            f"--module mico_ds.train --recipe {recipe} --run-dir {run_dir} --train.max_steps=7"
        )
    launch = sec["launch"][0]
    assert launch.startswith("srun --nodes=8 --ntasks=8 --ntasks-per-node=1 ")
    assert "hostfile.py node-run --" in launch

    ds = json.loads("\n".join(sec["deepspeed"]))
    micro, accum = micro_and_accum(recipe, 64)
    assert ds["train_micro_batch_size_per_gpu"] == micro
    assert ds["gradient_accumulation_steps"] == accum
    assert ds["train_batch_size"] == micro * accum * 64
    assert not run_dir.exists(), "a dry run must not write anything"


def test_every_fine_tune_resolves_as_its_dry_run_one() -> None:
    """What a dry run takes from its recipe is the DeepSpeed JSON (launch/hostfile.py ds-config, the
    trainer's resolve_ds_config); the hostfile and per-node lines depend only on the recipe's name. Each
    ft_* recipe's JSON at 64 ranks: its own batch factors, the rest that of its task's dry-run recipe."""
    batch = ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size")

    def rest(ds: dict) -> dict:
        return {k: v for k, v in ds.items() if k not in batch}

    assert set(FT_DRY_RUN.values()) <= set(FT_RECIPES)
    sampled = {task: hostfile.resolved_ds_config(r, 64, []) for task, r in FT_DRY_RUN.items()}
    for recipe in FT_RECIPES:
        cfg = load_config(recipe, [])  # as micro_and_accum(recipe, 64), loading the recipe once
        task, accum = cfg.task.name, cfg.optim.grad_accum
        assert task in FT_DRY_RUN, f"{recipe}: no ft recipe of task {task!r} is dry-run (FT_DRY_RUN)"
        cfg.data.resolve_batch_sizes(64, accum)
        micro = max(c.batch_size for c in cfg.data.corpora)
        ds = hostfile.resolved_ds_config(recipe, 64, [])
        assert tuple(ds[k] for k in batch) == (micro, accum, micro * accum * 64), recipe
        assert rest(ds) == rest(sampled[task]), f"{recipe} differs from {FT_DRY_RUN[task]} beyond the batch"


@pytest.mark.parametrize("ds_config", [None, "zero3_bf16_7b_offload.json"])
def test_slurm_dry_run_vitg_64gpu(ds_config: str | None, tmp_path: Path) -> None:
    """The headline job: ViT-g/14 + Llama-2-7B on 8 nodes x 8 GPUs (and its CPU-offload variant)."""
    recipe = "vitg_llama2_7b_64gpu"
    extra = [f"--train.ds_config={ds_config}"] if ds_config else []
    r = run(SLURM_SCRIPT, ["--dry-run", "--recipe", recipe, "--run-dir", "/shared/runs/g", *extra],
            fake_slurm(), cwd=tmp_path)  # fmt: skip
    assert r.returncode == 0, r.stderr
    sec = sections(r.stdout)
    assert sec["hostfile"] == [f"node{i:02d} slots=8" for i in range(1, 9)]
    assert [line.split(":")[0] for line in sec["per-node"]] == [
        f"node_rank={k} host=node{k + 1:02d}" for k in range(8)
    ]
    assert all(
        f"--module mico_ds.train --recipe {recipe} --run-dir /shared/runs/g" in x for x in sec["per-node"]
    )
    ds = json.loads("\n".join(sec["deepspeed"]))
    # B.2: the largest corpus (VAST-27M) is 32 per rank x 64 = 2048
    batch = (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"], ds["train_batch_size"])
    assert batch == (32, 1, 2048)
    z = ds["zero_optimization"]
    assert z["stage"] == 3 and z["overlap_comm"] is True and ds["bf16"]["enabled"] is True
    assert {k for k in z if k.startswith("stage3_")} >= {
        "stage3_prefetch_bucket_size", "stage3_param_persistence_threshold", "stage3_max_live_parameters",
        "stage3_max_reuse_distance",
    }  # fmt: skip
    assert ("offload_optimizer" in z) == (ds_config is not None)
    if ds_config:
        assert z["offload_param"]["device"] == "cpu"


def test_slurm_dry_run_overrides_reach_ds_config(tmp_path: Path) -> None:
    """Dotted overrides of the batch change the resolved JSON (the dry run reads the same config)."""
    r = run(
        SLURM_SCRIPT,
        ["--dry-run", "--recipe", "debug", "--run-dir", "r", "--optim.grad_accum=3"],
        fake_slurm(nodes=2, gpus=4),
        cwd=tmp_path,
    )
    assert r.returncode == 0, r.stderr
    ds = json.loads("\n".join(sections(r.stdout)["deepspeed"]))
    micro, _ = micro_and_accum("debug")
    assert ds["gradient_accumulation_steps"] == 3
    assert ds["train_batch_size"] == micro * 3 * 8


def test_slurm_dry_run_cpu_ranks_gpu_detection_and_resume(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "checkpoints" / "latest").write_text("step00000040")
    env = clean_env(
        SLURM_JOB_NODELIST="cpu-[1-2]", SLURM_NNODES="2", SLURM_JOB_ID="7", CPU_RANKS_PER_NODE="3"
    )
    r = run(SLURM_SCRIPT, ["--dry-run", "--recipe", "debug", "--run-dir", str(run_dir)], env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    sec = sections(r.stdout)
    assert sec["hostfile"] == ["cpu-1 slots=3", "cpu-2 slots=3"]
    assert "world size 6" in r.stdout
    assert all(line.endswith("--resume latest") for line in sec["per-node"])
    assert "resuming from" in r.stderr and "step00000040" in r.stderr
    assert json.loads("\n".join(sec["deepspeed"]))["train_batch_size"] == micro_and_accum("debug")[0] * 6

    # an explicit --resume wins; GPUs per node from SLURM_GPUS_ON_NODE
    env = clean_env(SLURM_JOB_NODELIST="g1", SLURM_NNODES="1", SLURM_JOB_ID="8", SLURM_GPUS_ON_NODE="4")
    args = ["--dry-run", "--", "--recipe", "debug", "--run-dir", str(run_dir), "--resume", "step00000020"]
    r = run(SLURM_SCRIPT, args, env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    sec = sections(r.stdout)
    assert sec["hostfile"] == ["g1 slots=4"]
    assert sec["per-node"][0].endswith("--resume step00000020")
    assert "--resume latest" not in r.stdout


def test_slurm_dry_run_default_run_dir_and_pdsh(tmp_path: Path) -> None:
    env = fake_slurm(nodes=2, gpus=2, LAUNCHER="pdsh", NCCL_DEBUG="INFO", MICO_FOO="bar", UNRELATED="x")
    r = run(SLURM_SCRIPT, ["--dry-run", "--recipe", "debug"], env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    sec = sections(r.stdout)
    # one launcher on the first node, which reaches the others over pdsh/ssh
    assert len(sec["per-node"]) == 1
    assert "--launcher pdsh" in sec["per-node"][0]
    assert "--no_ssh" not in sec["per-node"][0]
    # a requeued job keeps its job id, so the default run directory finds its checkpoints
    assert sec["per-node"][0].endswith("--recipe debug --run-dir runs/debug-4242")
    fwd = sec["forwarded"]
    assert "NCCL_DEBUG=INFO" in fwd and "MICO_FOO=bar" in fwd
    assert not any(line.startswith("UNRELATED=") for line in fwd)


@pytest.mark.parametrize(
    "env, args, message",
    [
        (clean_env(), ["--recipe", "debug", "--run-dir", "r"], "not inside a SLURM allocation"),
        (fake_slurm(SLURM_NNODES="3"), ["--dry-run", "--run-dir", "r"], "SLURM_NNODES=3"),
        (fake_slurm(GPUS_PER_NODE="0"), ["--dry-run", "--run-dir", "r"], "positive integer"),
        (fake_slurm(LAUNCHER="mpi"), ["--dry-run", "--run-dir", "r"], "LAUNCHER must be srun or pdsh"),
    ],
)
def test_slurm_script_errors(env: dict[str, str], args: list[str], message: str, tmp_path: Path) -> None:
    r = run(SLURM_SCRIPT, args, env, cwd=tmp_path)
    assert r.returncode == 2
    assert message in r.stderr


def test_slurm_dry_run_bad_recipe_batch_fails(tmp_path: Path) -> None:
    """The DeepSpeed batch check of the trainer runs in the dry run: a bad value fails it."""
    r = run(SLURM_SCRIPT, ["--dry-run", "--run-dir", "r", "--optim.grad_accum=0"], fake_slurm(), cwd=tmp_path)
    assert r.returncode != 0
    assert "grad_accum" in r.stderr


# ------------------------------------------------------------------ pretrain_local.sh --dry-run


def test_local_dry_run(tmp_path: Path) -> None:
    r = run(
        LOCAL_SCRIPT,
        ["--dry-run", "--recipe", "debug", "--run-dir", "rd", "--train.max_steps=5"],
        clean_env(GPUS="4", MASTER_PORT="29999"),
        cwd=tmp_path,
    )
    assert r.returncode == 0, r.stderr
    sec = sections(r.stdout)
    cmd = sec["launch"][0]
    assert "--num_gpus 4 --master_addr 127.0.0.1 --master_port 29999" in cmd
    assert cmd.endswith("--module mico_ds.train --recipe debug --run-dir rd --train.max_steps=5")
    micro, accum = micro_and_accum("debug")
    assert json.loads("\n".join(sec["deepspeed"]))["train_batch_size"] == micro * accum * 4

    (tmp_path / "rd" / "checkpoints").mkdir(parents=True)
    (tmp_path / "rd" / "checkpoints" / "latest").write_text("step00000003")
    r = run(
        LOCAL_SCRIPT,
        ["--dry-run", "--recipe", "debug", "--run-dir", "rd"],
        clean_env(CPU_RANKS="2"),
        tmp_path,
    )
    assert r.returncode == 0, r.stderr
    assert "--num_gpus 2 " in r.stdout and r.stdout.count("--resume latest") == 1


def test_local_requires_run_dir(tmp_path: Path) -> None:
    r = run(LOCAL_SCRIPT, ["--dry-run", "--recipe", "debug"], clean_env(), cwd=tmp_path)
    assert r.returncode == 2 and "--run-dir" in r.stderr


# ------------------------------------------------------------------ help, docs, lint


def env_vars_in_help(script: Path) -> list[str]:
    out = subprocess.run(["bash", str(script), "--help"], capture_output=True, text=True, check=True).stdout
    return re.findall(r"^  ([A-Z][A-Z0-9_]+)\s", out, flags=re.M)


@pytest.mark.parametrize("script", [SLURM_SCRIPT, LOCAL_SCRIPT], ids=lambda p: p.name)
def test_every_option_is_documented(script: Path) -> None:
    names = env_vars_in_help(script)
    assert len(names) >= 6, names
    docs = DOCS.read_text()
    missing = [n for n in [*names, "--dry-run"] if f"`{n}`" not in docs]
    assert not missing, f"{script.name} --help names {missing}, which docs/operations.md does not"


def test_shellcheck_clean() -> None:
    if shutil.which("shellcheck") is None:
        if shutil.which("apt-get") is None or os.geteuid() != 0:
            pytest.skip("shellcheck is not installed and cannot be installed here (apt-get, root)")
        subprocess.run(
            ["apt-get", "install", "-y", "--no-install-recommends", "shellcheck"],
            env=dict(os.environ, DEBIAN_FRONTEND="noninteractive"),
            capture_output=True,
            check=True,
            timeout=600,
        )
    lib = SLURM_SCRIPT.parent / "lib.sh"  # sourced by both (-x follows the source lines)
    cmd = ["shellcheck", "-x", str(SLURM_SCRIPT), str(LOCAL_SCRIPT), str(lib)]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=SLURM_SCRIPT.parents[1])
    assert r.returncode == 0, r.stdout


def test_hostfile_cli(tmp_path: Path) -> None:
    out = tmp_path / "h" / "hostfile"
    subprocess.run(
        [
            sys.executable,
            str(ROOT / "launch" / "hostfile.py"),
            "hostfile",
            "a[1-2]",
            "--slots",
            "2",
            "--out",
            str(out),
        ],
        check=True,
        env=clean_env(MICO_HOSTLIST_PYTHON="1"),
    )
    assert out.read_text() == "a1 slots=2\na2 slots=2\n"
