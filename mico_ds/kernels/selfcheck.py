"""Correctness of the fused kernels against independent fp64 oracles, at any size and on any device.

Shared by ``tools/gpu_check.py`` (its kernel table) and ``tests/gpu/`` (the same cases as tests).
Each check returns a record: the case, and per output the largest error and its worst ratio to the
tolerance ``atol + rtol * |oracle|`` (a ratio <= 1 everywhere passes). The oracles do not use the
code they check: the context embeddings are summed in fp64 by autograd through the eager reference,
and the contrastive loss (MiCo Eq. 4, world size 1) and its gradients are computed in fp64 from the
closed form, tile by tile, so N = 64K needs no N x N matrix.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from mico_ds.kernels.context_embed import context_embed, context_embed_reference
from mico_ds.kernels.contrastive import contrastive_loss_tiled

F32, BF16 = torch.float32, torch.bfloat16
LOGIT_SCALE = 100.0  # CLIP's trained temperature ceiling: the hardest case for the exponentials


def _compare(got: torch.Tensor, want: torch.Tensor, atol: float, rtol: float) -> dict[str, Any]:
    got, want = got.detach().double(), want.detach().double()
    err = (got - want).abs()
    bound = atol + rtol * want.abs()
    ratio = float((err / bound).max()) if err.numel() else 0.0
    finite = bool(torch.isfinite(got).all())
    return {
        "max_abs_err": float(err.max()) if err.numel() else 0.0,
        "worst_ratio": ratio,
        "atol": atol,
        "rtol": rtol,
        "ok": finite and ratio <= 1.0,
    }


def _tol(dtype: torch.dtype, magnitude: float) -> tuple[float, float]:
    # bf16 keeps 8 bits of mantissa: one rounding of a value of this magnitude is ~ 2**-8 relative.
    return (2**-7 * magnitude, 2**-7) if dtype == BF16 else (1e-5 * magnitude, 1e-5)


def _record(name: str, case: dict[str, Any], outputs: dict[str, dict[str, Any]], t0: float) -> dict[str, Any]:
    return {
        "check": name,
        **case,
        "outputs": outputs,
        "ok": all(o["ok"] for o in outputs.values()),
        "seconds": time.perf_counter() - t0,
    }


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def check_context_embed(
    B: int,
    L: int,
    D: int,
    x_dtype: torch.dtype,
    t_dtype: torch.dtype,
    with_sam: bool,
    device: str,
    seed: int = 0,
) -> dict[str, Any]:
    """The fused context embeddings (MiCo Eq. 1, 3), forward and every gradient, against fp64."""
    t0 = time.perf_counter()
    g = torch.Generator().manual_seed(seed)
    rows = (max(1, L // 8), 4, L, 8)  # E_C, E_M, E_Pos, E_Sam rows; indices repeat (scatter-adds)
    x = torch.randn(B, L, D, generator=g).to(device, x_dtype).requires_grad_()
    idx = [torch.randint(0, n, (L,), generator=g).to(device) for n in rows[:3]]
    tables = [torch.randn(n, D, generator=g).to(device, t_dtype).requires_grad_() for n in rows]
    src = torch.randint(0, rows[3], (B, L), generator=g).to(device) if with_sam else None
    e_sam = tables[3] if with_sam else None
    params = [x, *tables[:3]] + ([e_sam] if with_sam else [])
    dout = torch.randn(B, L, D, generator=g).to(device, x_dtype)

    out = context_embed(x, *idx, *tables[:3], src, e_sam, impl="triton")
    grads = torch.autograd.grad(out, params, dout)
    _sync(device)
    exact_in = [p.detach().double().requires_grad_() for p in params]
    ex_sam = exact_in[4] if with_sam else None
    exact = context_embed_reference(exact_in[0], *idx, *exact_in[1:4], src, ex_sam)
    exact_grads = torch.autograd.grad(exact, exact_in, dout.double())

    outputs = {"out": _compare(out, exact, *_tol(x_dtype, 4.0))}
    mag = float((B * L) ** 0.5) + 1.0  # a table row sums up to B*L gradient rows of unit scale
    for name, got, want in zip(["dx", "de_ctx", "de_mod", "de_pos", "de_sam"], grads, exact_grads):
        dtype = x_dtype if name == "dx" else t_dtype
        outputs[name] = _compare(got, want, *_tol(dtype, 1.0 if name == "dx" else mag))
        outputs[name]["dtype_ok"] = got.dtype == dtype
        outputs[name]["ok"] &= outputs[name]["dtype_ok"]
    case = {"B": B, "L": L, "D": D, "x_dtype": str(x_dtype)[6:], "table_dtype": str(t_dtype)[6:]}
    return _record("context_embed", {**case, "e_sam": with_sam, "device": device}, outputs, t0)


@torch.no_grad()
def contrastive_oracle_fp64(
    z: torch.Tensor, t: torch.Tensor, s: float, tile: int = 1024
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Eq. 4 with one rank in fp64, tile by tile: (loss, dL/dz, dL/dt, dL/ds).

    With S = z t^T and L = s S: loss = [sum_i lse_j L_ij + sum_j lse_i L_ij] / 2N - s mean_i S_ii, and
    G = dloss/dL = (softmax over j + softmax over i - 2 I) / 2N, so dz = s G t, dt = s G^T z,
    ds = sum G * S.
    """
    z, t = z.double(), t.double()
    n = z.shape[0]
    row_lse = torch.empty(n, dtype=torch.float64, device=z.device)
    col_lse = torch.full((n,), float("-inf"), dtype=torch.float64, device=z.device)
    for r in range(0, n, tile):
        logits = (z[r : r + tile] @ t.T).mul_(s)
        row_lse[r : r + tile] = logits.logsumexp(dim=1)
        col_lse = torch.logaddexp(col_lse, logits.logsumexp(dim=0))
    diag = (z * t).sum(dim=1)
    loss = (row_lse.sum() + col_lse.sum()) / (2 * n) - s * diag.mean()
    dz, dt = torch.empty_like(z), torch.zeros_like(t)
    ds = torch.zeros((), dtype=torch.float64, device=z.device)
    for r in range(0, n, tile):
        sim = z[r : r + tile] @ t.T
        logits = sim * s
        grad = (logits - row_lse[r : r + tile, None]).exp_().add_((logits - col_lse[None]).exp_())
        rows = torch.arange(r, min(r + tile, n), device=z.device)
        grad[rows - r, rows] -= 2.0
        grad /= 2 * n
        dz[r : r + tile] = s * (grad @ t)
        dt += s * (grad.T @ z[r : r + tile])
        ds += (grad * sim).sum()
    return loss, dz, dt, ds


def check_contrastive(n: int, E: int, dtype: torch.dtype, device: str, seed: int = 0) -> dict[str, Any]:
    """The Triton contrastive loss (MiCo Eq. 4, one rank, N = n) and its gradients against fp64."""
    t0 = time.perf_counter()
    g = torch.Generator().manual_seed(seed)
    z = (
        torch.nn.functional.normalize(torch.randn(n, E, generator=g), dim=1)
        .to(device, dtype)
        .requires_grad_()
    )
    t = (
        torch.nn.functional.normalize(torch.randn(n, E, generator=g), dim=1)
        .to(device, dtype)
        .requires_grad_()
    )
    s = torch.tensor(LOGIT_SCALE, device=device, requires_grad=True)
    loss = contrastive_loss_tiled(z, t, s, impl="triton")
    dz, dt, ds = torch.autograd.grad(loss, [z, t, s])
    _sync(device)
    # The oracle sees the inputs as the kernel does (already rounded to bf16): what remains is the
    # kernel's own arithmetic.
    e_loss, e_dz, e_dt, e_ds = contrastive_oracle_fp64(z.detach(), t.detach(), LOGIT_SCALE)
    if dtype == BF16:
        # Gradients come back in bf16 (one rounding) and the backward feeds the bf16-cast softmax to
        # the matmuls: the tolerances of tests/unit/kernels/test_contrastive.py.
        grad_tol = lambda e: (3e-3 * max(1.0, float(e.abs().max())), 2e-2)  # noqa: E731
        loss_tol = (3e-3 * max(1.0, float(e_loss.abs())), 2e-2)
    else:
        grad_tol = lambda e: (2e-6 * LOGIT_SCALE * max(1.0, float(e.abs().max())), 1e-5)  # noqa: E731
        loss_tol = (2e-6 * LOGIT_SCALE, 1e-5)
    outputs = {
        "loss": _compare(loss.detach(), e_loss, *loss_tol),
        "dz": _compare(dz, e_dz, *grad_tol(e_dz)),
        "dt": _compare(dt, e_dt, *grad_tol(e_dt)),
        "dlogit_scale": _compare(ds, e_ds, *grad_tol(e_ds)),
    }
    case = {"N": n, "E": E, "dtype": str(dtype)[6:], "logit_scale": LOGIT_SCALE, "device": device}
    return _record("contrastive", case, outputs, t0)


def check_norm(
    kind: str, impl: str, D: int, dtype: torch.dtype, device: str, seed: int = 0
) -> dict[str, Any]:
    """A swapped norm (``model.norm_impl``) against the module it replaces, forward and backward."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    from mico_ds.kernels.norms import ApexLayerNorm, FusedRMSNorm

    t0 = time.perf_counter()
    g = torch.Generator().manual_seed(seed)
    if kind == "rmsnorm":
        ref: torch.nn.Module = LlamaRMSNorm(D, eps=1e-5)
    else:
        ref = torch.nn.LayerNorm(D, eps=1e-6)
        ref.bias.data.copy_(torch.randn(D, generator=g))
    ref.weight.data.copy_(torch.randn(D, generator=g))
    ref = ref.to(device, dtype)
    if kind == "rmsnorm":
        fused: torch.nn.Module = FusedRMSNorm(ref.weight, 1e-5, impl)
    else:
        fused = ApexLayerNorm(ref) if impl == "apex" else ref
    x = torch.randn(4, 77, D, generator=g).to(device, dtype)
    dout = torch.randn(4, 77, D, generator=g).to(device, dtype)
    results = []
    for m in (fused, ref):
        xi = x.clone().requires_grad_()
        params = list(m.parameters())
        y = m(xi)
        results.append([y, *torch.autograd.grad(y, [xi, *params], dout)])
    names = ["out", "dx", "dweight", "dbias"]
    # One fused pass against several eager ones: within a few roundings of the output dtype; the weight
    # gradients sum 4 x 77 rows.
    outputs = {
        n: _compare(a, b, *_tol(dtype, 4.0 if n in ("out", "dx") else 4.0 * 308**0.5))
        for n, a, b in zip(names, *results)
    }
    case = {"kind": kind, "impl": impl, "D": D, "dtype": str(dtype)[6:], "device": device}
    return _record("norm", case, outputs, t0)


def kernel_cases(quick: bool) -> list[tuple[str, dict[str, Any]]]:
    """The cases of the GPU check: sizes off the block sizes and the ViT-g sizes (quick: tiny ones)."""
    if quick:
        ctx = [(2, 19, 45)]
        con = [(70, 40)]
    else:
        # (B, L, D): one row, L off BLOCK_L=16, D off BLOCK_D; then ViT-g/14's context (D=1408).
        ctx = [(1, 1, 1), (3, 37, 300), (64, 512, 1408)]
        # (N, E): off the 64-row blocks and a power of two; then E=1024 at 16K and 64K global rows.
        con = [(1000, 100), (16384, 1024), (65536, 1024)]
    cases: list[tuple[str, dict[str, Any]]] = []
    for B, L, D in ctx:
        for x_dt, t_dt in [(F32, F32), (BF16, BF16), (BF16, F32)]:
            for sam in (False, True):
                cases.append(("context_embed", dict(B=B, L=L, D=D, x_dtype=x_dt, t_dtype=t_dt, with_sam=sam)))
    for n, E in con:
        for dt in (F32, BF16):
            cases.append(("contrastive", dict(n=n, E=E, dtype=dt)))
    return cases + norm_cases(quick)


def norm_cases(quick: bool) -> list[tuple[str, dict[str, Any]]]:
    """PyTorch's fused RMSNorm always; apex's RMSNorm and LayerNorm where apex imports (CUDA only)."""
    from mico_ds.kernels.norms import apex_import_error

    impls = ["torch"] + ([] if quick or apex_import_error() is not None else ["apex"])
    dims = {"rmsnorm": 64 if quick else 4096, "layernorm": 48 if quick else 1408}
    cases = []
    for impl in impls:
        for kind in ("rmsnorm", "layernorm") if impl == "apex" else ("rmsnorm",):
            for dt in (F32, BF16):
                cases.append(("norm", dict(kind=kind, impl=impl, D=dims[kind], dtype=dt)))
    return cases


CHECKS = {"context_embed": check_context_embed, "contrastive": check_contrastive, "norm": check_norm}


def run_case(name: str, kwargs: dict[str, Any], device: str) -> dict[str, Any]:
    """One case; an exception (a kernel that does not compile, an OOM) is a failed record, not a crash."""
    t0 = time.perf_counter()
    try:
        return CHECKS[name](**kwargs, device=device)
    except Exception as e:
        case = {k: (str(v)[6:] if isinstance(v, torch.dtype) else v) for k, v in kwargs.items()}
        return {"check": name, **case, "device": device, "ok": False, "error": f"{type(e).__name__}: {e}",
                "seconds": time.perf_counter() - t0}  # fmt: skip
    finally:
        if device == "cuda":
            torch.cuda.empty_cache()
