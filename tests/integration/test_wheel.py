"""A non-editable install: the wheel built from the tracked files carries every recipe, fragment and
DeepSpeed JSON, its console scripts work, and ``python -m mico_ds.train --recipe debug`` trains from
another directory with that environment's ``bin/`` off ``PATH`` (the self-launch runs DeepSpeed's
launcher with the same interpreter)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from mico_ds.config import list_recipes
from mico_ds.distributed.ds_config import list_ds_configs
from tests.helpers.train import REPO

pytestmark = [pytest.mark.slow, pytest.mark.distributed]
CONSOLE_SCRIPTS = ("mico-train", "mico-eval", "mico-plan", "mico-zero-to-fp32", "mico-to-universal",
                   "mico-make-shards", "mico-make-demo-data", "mico-split-subsets", "mico-inspect-shards",
                   "mico-index-shards", "mico-train-tokenizer")  # fmt: skip


def _run(cmd: list[str], cwd: Path, env: dict[str, str] | None = None, timeout: float = 600):
    p = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, f"{cmd} exited {p.returncode}\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    return p


@pytest.fixture(scope="module")
def venv(tmp_path_factory) -> Path:
    """A virtual environment (system site-packages for the dependencies) with the wheel installed."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"  # what a fresh clone has: the tracked files (and new, not ignored ones)
    files = _run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], REPO).stdout.split()
    for f in files:
        if (REPO / f).is_file():
            (src / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / f, src / f)
    dist = tmp / "dist"
    _run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(dist),
            str(src),
        ],
        tmp,
    )
    (wheel,) = (tmp / "dist").glob("mico_ds-*.whl")
    env = tmp / "venv"
    _run([sys.executable, "-m", "venv", "--system-site-packages", str(env)], tmp)
    _run(
        [str(env / "bin" / "python"), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)],
        tmp,
    )
    return env


def test_the_wheel_carries_the_package_data(venv: Path) -> None:
    (wheel,) = venv.parent.glob("dist/mico_ds-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for recipe in list_recipes():
        assert f"mico_ds/recipes/{recipe}.yaml" in names, recipe
    fragments = sorted(p.relative_to(REPO).as_posix() for p in (REPO / "mico_ds/recipes").glob("*/*.yaml"))
    assert fragments and set(fragments) <= names
    for ds in list_ds_configs():
        assert f"mico_ds/ds_configs/{ds}" in names, ds
    assert not [n for n in names if n.startswith(("tests/", "tools/"))]


def test_console_scripts_and_package_data_from_another_directory(venv: Path, tmp_path: Path) -> None:
    py = str(venv / "bin" / "python")
    where = _run([py, "-c", "import mico_ds; print(mico_ds.__file__)"], tmp_path).stdout.strip()
    assert where.startswith(str(venv)), f"imported {where}, not the installed wheel"
    for script in CONSOLE_SCRIPTS:
        assert (venv / "bin" / script).is_file(), script
    plan = _run([str(venv / "bin" / "mico-plan"), "vitg_llama2_7b_64gpu", "--json"], tmp_path).stdout
    assert json.loads(plan)["world"] == 64  # a recipe with include: fragments, read from the wheel
    _run([str(venv / "bin" / "mico-zero-to-fp32"), "--help"], tmp_path)


def test_non_editable_install_trains_the_debug_recipe_from_another_directory(
    venv: Path, tmp_path: Path
) -> None:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(PATH="/usr/bin:/bin", OMP_NUM_THREADS="1")  # no `deepspeed` script to find by name
    assert shutil.which("deepspeed", path=env["PATH"]) is None
    cmd = [str(venv / "bin" / "python"), "-m", "mico_ds.train", "--recipe", "debug", "--run-dir", "run",
           "--train.max_steps=2", "--train.save_every=0", "--train.progress=false"]  # fmt: skip
    p = _run(cmd, tmp_path, env=env)
    assert "deepspeed.launcher.runner" in p.stdout  # the self-launch, with this interpreter
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["world_size"] == 2 and summary["zero_stage"] == 3
    assert (tmp_path / "data" / "debug" / "demo.json").is_file()  # data.root is relative to the cwd
