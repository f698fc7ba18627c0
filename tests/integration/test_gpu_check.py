"""tools/gpu_check.py's CPU mode (``--device cpu --quick``): every section runs the code it runs on a
GPU, at tiny sizes (Triton's interpreter, the debug slice under the DeepSpeed launcher on gloo, CPU
bf16 against CPU fp32), so the one prepared GPU command cannot rot while no GPU is lent."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mico_ds.kernels.selfcheck import kernel_cases
from tests.helpers.train import env

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "tools" / "gpu_check.py"


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess, dict]:
    out = tmp_path_factory.mktemp("gpu_check") / "check.json"
    cmd = [sys.executable, str(SCRIPT), "--device", "cpu", "--quick", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env(), cwd=ROOT)
    assert out.exists(), proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc, json.loads(out.read_text())


def test_every_section_passes(quick_run) -> None:
    proc, data = quick_run
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert list(data["sections"]) == ["env", "kernels", "bench", "step", "losses"]
    assert all(r["ok"] for r in data["sections"].values()), {
        k: r.get("error") for k, r in data["sections"].items()
    }
    assert data["ok"] is True and data["quick"] is True
    assert "section losses: ok" in proc.stdout


def test_kernel_section_covers_every_case_with_its_tolerances(quick_run) -> None:
    _, data = quick_run
    cases = data["sections"]["kernels"]["cases"]
    assert len(cases) == len(kernel_cases(quick=True))
    assert {c["check"] for c in cases} == {"context_embed", "contrastive", "norm"}
    for c in cases:
        assert c["device"] == "cpu"
        for name, o in c["outputs"].items():
            assert o["ok"] and 0 <= o["worst_ratio"] <= 1 and o["atol"] > 0 and o["rtol"] > 0, (c, name)


def test_step_is_zero3_under_the_launcher_and_sized_by_the_planner(quick_run) -> None:
    _, data = quick_run
    st = data["sections"]["step"]
    assert st["zero_stage"] == 3 and st["ds_config"] == "zero3_cpu.json" and st["world_size"] == 1
    assert "deepspeed.launcher.runner" in st["attempts"][0]["command"]
    assert st["samples_per_s"] > 0 and st["flops_per_sample"] > 0
    assert st["planner_predicted_peak_bytes"] > 0 and st["memory_vs_planner"] > 0
    assert st["norm_impl"] == "torch" and st["optimizer"] == "AdamW"


def test_loss_check_compares_the_same_steps(quick_run) -> None:
    _, data = quick_run
    lo = data["sections"]["losses"]
    assert lo["compared"] == ["cpu_fp32", "cpu_bf16"]
    steps = {r["step"] for r in lo["rows"]}
    assert steps == {0, 1, 2, 3}
    first = [r for r in lo["rows"] if r["step"] == 0 and r["term"] == "loss"][0]
    # Different precisions, the same weights and batch: close, not equal (a check that can fail).
    assert first["fp32"] != first["other"] and first["abs_diff"] <= first["bound"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is what a machine without CUDA sees")
def test_refuses_without_a_gpu_unless_cpu_quick() -> None:
    for extra in ([], ["--device", "cpu"]):
        proc = subprocess.run(
            [sys.executable, str(SCRIPT), *extra], capture_output=True, text=True, timeout=120
        )
        assert proc.returncode == 2, proc.stderr
        assert "--device cpu --quick" in proc.stderr or "only with --quick" in proc.stderr
