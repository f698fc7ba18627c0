"""The Triton kernels compiled on the GPU against fp64 oracles, at the sizes of tools/gpu_check.py
(off the block sizes, and ViT-g: context B=64 L=512 D=1408, contrastive N up to 64K with E=1024), and
the fused norms against the modules they replace (apex's where apex imports)."""

from __future__ import annotations

import pytest

from mico_ds.kernels.selfcheck import kernel_cases, run_case

CASES = kernel_cases(quick=False)


def _id(case: tuple) -> str:
    name, kw = case
    dims = "x".join(str(kw[k]) for k in ("B", "L", "D", "n", "E") if k in kw)
    dts = "-".join(str(kw[k])[6:] for k in ("x_dtype", "t_dtype", "dtype") if k in kw)
    kind = f"-{kw['kind']}-{kw['impl']}" if name == "norm" else ""
    return f"{name}{kind}-{dims}-{dts}" + ("-sam" if kw.get("with_sam") else "")


@pytest.mark.parametrize("case", CASES, ids=[_id(c) for c in CASES])
def test_kernel_matches_fp64_oracle(case: tuple) -> None:
    name, kwargs = case
    r = run_case(name, kwargs, "cuda")
    assert "error" not in r, r["error"]
    bad = {k: o for k, o in r["outputs"].items() if not o["ok"]}
    assert not bad, bad
