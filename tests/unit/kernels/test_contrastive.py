"""Tiled contrastive loss (MiCo Eq. 4) in one process: PyTorch tiles and Triton kernels against
autograd of the naive formula (fp64) and against open_clip's ClipLoss."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss

from mico_ds.kernels import contrastive_loss_tiled

# (b, E, tile): b=1, odd E, b and N not multiples of the tile / of the Triton blocks (64 fwd,
# 32 or 16 bwd), E past one forward E-block (64) and with E_PAD 256 in the backward.
SHAPES = [(1, 7, 4), (5, 16, 3), (37, 33, 8), (64, 64, 64), (70, 130, 16)]


def _features(b: int, E: int, g: torch.Generator, dtype=torch.float64):
    z = F.normalize(torch.randn(b, E, generator=g, dtype=torch.float64), dim=1)
    # Text features correlated with z, so that the positives matter as in training.
    t = F.normalize(z + 0.7 * torch.randn(b, E, generator=g, dtype=torch.float64), dim=1)
    s = torch.empty((), dtype=torch.float64).uniform_(1.0, 100.0, generator=g)  # up to CLIP's clamp
    return z.to(dtype), t.to(dtype), s.to(dtype)


def _naive(z: torch.Tensor, t: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """MiCo Eq. 4 (mean over rows) with the full logits matrix."""
    labels = torch.arange(z.shape[0])
    return 0.5 * (F.cross_entropy(s * z @ t.T, labels) + F.cross_entropy(s * t @ z.T, labels))


def _loss_and_grads(fn, z, t, s):
    z, t, s = (x.detach().clone().requires_grad_() for x in (z, t, s))
    loss = fn(z, t, s)
    return (loss.detach(), *torch.autograd.grad(loss, (z, t, s)))


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "b{}-E{}-tile{}".format(*s))
@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_matches_naive_fp64_and_cliploss(shape, impl, rng, request):
    b, E, tile = shape
    device = request.getfixturevalue("triton_device") if impl == "triton" else "cpu"
    z64, t64, s64 = _features(b, E, rng)
    exact = _loss_and_grads(_naive, z64, t64, s64)
    z, t, s = (x.float().to(device) for x in (z64, t64, s64))
    ours = _loss_and_grads(lambda z, t, s: contrastive_loss_tiled(z, t, s, tile=tile, impl=impl), z, t, s)
    clip = _loss_and_grads(ClipLoss(), z, t, s)
    for name, o, e, c in zip(("loss", "d v_z", "d v_t", "d logit_scale"), ours, exact, clip):
        assert o.shape == e.shape, name
        # fp32 logits of magnitude s carry an error of a few ulps of s (~1e-7 s); softmax and
        # gradients (which scale with s) inherit it, as in ClipLoss.
        atol = 2e-6 * float(s64)
        torch.testing.assert_close(o.double().cpu(), e, atol=atol, rtol=1e-5)
        torch.testing.assert_close(o.cpu(), c.cpu(), atol=atol, rtol=1e-5)


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_bf16_features(impl, rng, request):
    device = request.getfixturevalue("triton_device") if impl == "triton" else "cpu"
    z64, t64, s64 = _features(45, 40, rng)
    s64 = s64.clamp(max=20.0)
    zb, tb = z64.bfloat16(), t64.bfloat16()
    # Oracle on the bf16-rounded inputs: what remains is the kernels' own arithmetic error.
    exact = _loss_and_grads(_naive, zb.double(), tb.double(), s64)
    ours = _loss_and_grads(
        lambda z, t, s: contrastive_loss_tiled(z, t, s, tile=16, impl=impl),
        zb.to(device),
        tb.to(device),
        s64.float().to(device),
    )
    assert ours[0].dtype == torch.float32 and ours[1].dtype == torch.bfloat16
    for name, o, e in zip(("loss", "d v_z", "d v_t", "d logit_scale"), ours, exact):
        # Gradients are returned in bf16 (one rounding, 2**-8 relative); torch computes in fp32, the
        # Triton kernels feed bf16 operands (the softmax cast to bf16) to the matmuls.
        atol = 3e-3 * max(1.0, e.abs().max().item())
        torch.testing.assert_close(o.double().cpu(), e, atol=atol, rtol=2e-2, msg=name)


def test_tile_size_does_not_change_the_result(rng):
    z, t, s = (x.float() for x in _features(23, 12, rng))
    runs = [
        _loss_and_grads(lambda z, t, s, k=k: contrastive_loss_tiled(z, t, s, tile=k), z, t, s)
        for k in (1, 7, 23, 1024)
    ]
    for other in runs[1:]:
        for a, b in zip(runs[0], other):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_one_element_logit_scale_keeps_its_shape(rng):
    z, t, s = (x.float() for x in _features(6, 8, rng))
    s1 = s.reshape(1).requires_grad_()
    loss = contrastive_loss_tiled(z, t, s1, tile=4)
    (g,) = torch.autograd.grad(loss, s1)
    assert g.shape == (1,)


def test_auto_is_torch_on_cpu(rng):
    z, t, s = (x.float() for x in _features(9, 8, rng))
    auto = contrastive_loss_tiled(z, t, s, tile=4, impl="auto")
    assert torch.equal(auto, contrastive_loss_tiled(z, t, s, tile=4, impl="torch"))


def test_bad_arguments_raise_value_errors(rng):
    z, t, s = (x.float() for x in _features(4, 8, rng))
    with pytest.raises(ValueError, match="impl"):
        contrastive_loss_tiled(z, t, s, impl="cuda")
    with pytest.raises(ValueError, match=r"\(b, E\)"):
        contrastive_loss_tiled(z, t[:3], s)
    with pytest.raises(ValueError, match="bfloat16"):
        contrastive_loss_tiled(z, t.bfloat16(), s)
    with pytest.raises(ValueError, match="one value"):
        contrastive_loss_tiled(z, t, torch.ones(2))
    with pytest.raises(ValueError, match="tile"):
        contrastive_loss_tiled(z, t, s, tile=0)
