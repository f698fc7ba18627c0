"""Multimodal context (MiCo Eq. 1 and 3): every table reaches the output exactly where it should."""

from __future__ import annotations

import itertools

import pytest
import torch

from mico_ds.config import ContextConfig, VisionConfig
from mico_ds.data.schema import MODALITIES, MODALITY_ID
from mico_ds.models.context import MultimodalContext

D, MAXC = 32, 6
LENGTHS = {"image": 2, "video": 6, "audio": 4, "depth": 2, "normal": 3}


def _context(fusion_layers: int = 0) -> MultimodalContext:
    torch.manual_seed(0)
    ctx = ContextConfig(max_context_len=MAXC, max_positions=24, num_sources=3, fusion_layers=fusion_layers)
    return MultimodalContext(D, ctx, VisionConfig(width=D, heads=4, mlp_dim=64), kernels="torch").eval()


def _tokens(mods: list[str], b: int = 2, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {m: torch.randn(b, LENGTHS[m], D, generator=g) for m in mods}


def _manual(
    ctx: MultimodalContext, tokens: dict[str, torch.Tensor], src: torch.Tensor | None
) -> torch.Tensor:
    """Eq. 1/3 written out token by token, then [CTX] and the final norm (no fusion blocks)."""
    present = [m for m in MODALITIES if m in tokens]
    b = tokens[present[0]].shape[0]
    rows = []
    for i in range(b):
        seq, pos = [ctx.ctx_token[0, 0]], 0
        for j, m in enumerate(present):
            for lm in range(tokens[m].shape[1]):
                t = tokens[m][i, lm] + ctx.e_ctx[MODALITY_ID[m] * MAXC + lm] + ctx.e_mod[MODALITY_ID[m]]
                t = t + ctx.e_pos[pos]
                if src is not None:
                    t = t + ctx.e_sam[src[i, j]]
                seq.append(t)
                pos += 1
        rows.append(torch.stack(seq))
    return ctx.norm(torch.stack(rows))


@pytest.mark.parametrize(
    "mods",
    [["image"], ["video", "audio"], ["audio", "depth"], ["image", "audio", "normal"], list(MODALITIES[:4])],
)
@pytest.mark.parametrize("joined", [False, True])
def test_matches_eq1_written_out(mods: list[str], joined: bool) -> None:
    ctx = _context()
    toks = _tokens(mods)
    src = torch.randint(0, 3, (2, len(mods)), generator=torch.Generator().manual_seed(1)) if joined else None
    with torch.no_grad():
        z, fused = ctx(toks, src)
        ref = _manual(ctx, toks, src)
    torch.testing.assert_close(fused, ref)
    torch.testing.assert_close(z, ref[:, 0])


def _changed_positions(ctx: MultimodalContext, table: str, row: int, toks, src=None) -> set[tuple[int, int]]:
    """(sample, output position) pairs whose output changes when one table row is perturbed."""
    delta = torch.randn(D, generator=torch.Generator().manual_seed(9))  # not constant: LayerNorm removes that
    with torch.no_grad():
        _, before = ctx(toks, src)
        getattr(ctx, table)[row] += delta
        _, after = ctx(toks, src)
        getattr(ctx, table)[row] -= delta
    diff = (after - before).abs().amax(dim=-1) > 1e-6  # (B, 1 + L)
    return {(int(i), int(j)) for i, j in diff.nonzero()}


def test_each_table_row_reaches_only_its_tokens() -> None:
    ctx = _context()
    mods = ["image", "audio", "normal"]  # concatenation: image 0-1, audio 2-5, normal 6-8 (+1 for [CTX])
    toks = _tokens(mods)
    both = {0, 1}
    # E_Pos is shared over the concatenation: row 3 is audio's 2nd token; rows past L reach nothing
    assert _changed_positions(ctx, "e_pos", 3, toks) == {(i, 4) for i in both}
    assert _changed_positions(ctx, "e_pos", 9, toks) == set()
    # E_C: per-modality context position (audio's local index 1, normal's local index 0)
    a = MODALITY_ID["audio"] * MAXC
    assert _changed_positions(ctx, "e_ctx", a + 1, toks) == {(i, 4) for i in both}
    assert _changed_positions(ctx, "e_ctx", MODALITY_ID["normal"] * MAXC, toks) == {(i, 7) for i in both}
    assert _changed_positions(ctx, "e_ctx", MODALITY_ID["video"] * MAXC, toks) == set()  # absent
    # E_M: every token of that modality, nothing for absent ones
    assert _changed_positions(ctx, "e_mod", MODALITY_ID["audio"], toks) == {
        (i, j) for i in both for j in range(3, 7)
    }
    assert _changed_positions(ctx, "e_mod", MODALITY_ID["depth"], toks) == set()
    # [CTX] token: position 0 only (no fusion layers)
    with torch.no_grad():
        _, before = ctx(toks)
        ctx.ctx_token += torch.randn(D)
        _, after = ctx(toks)
    assert ((after - before).abs().amax(-1) > 1e-6).nonzero()[:, 1].unique().tolist() == [0]


def test_sampling_embedding_only_through_sample_source() -> None:
    ctx = _context()
    mods = ["image", "audio"]
    toks = _tokens(mods)
    src = torch.tensor([[0, 2], [2, 2]])
    # row 2: sample 0's audio tokens, sample 1's image and audio tokens
    expect = {(0, j) for j in range(3, 7)} | {(1, j) for j in range(1, 7)}
    assert _changed_positions(ctx, "e_sam", 2, toks, src) == expect
    assert _changed_positions(ctx, "e_sam", 1, toks, src) == set()
    # without sample_source the table is not used at all
    for row in range(3):
        assert _changed_positions(ctx, "e_sam", row, toks, None) == set()
    assert _changed_positions(ctx, "e_sam", 0, toks, torch.zeros(2, 2, dtype=torch.long)) == {
        (i, j) for i in (0, 1) for j in range(1, 7)
    }


def test_which_modalities_are_present_moves_the_modality_embeddings() -> None:
    """The same token content gets E_M / E_C of its own modality whatever else is present."""
    ctx = _context()
    x = torch.randn(1, 2, D)
    for other in ["image", "video", "audio", "normal"]:
        mods = sorted(["depth", other], key=MODALITIES.index)
        toks = {m: (x if m == "depth" else torch.randn(1, LENGTHS[m], D)) for m in mods}
        start = 0 if mods[0] == "depth" else LENGTHS[other]
        with torch.no_grad():
            pre = ctx.e_ctx[MODALITY_ID["depth"] * MAXC : MODALITY_ID["depth"] * MAXC + 2] + ctx.e_mod[3]
            pre = x[0] + pre + ctx.e_pos[start : start + 2]
            _, fused = ctx(toks)
        torch.testing.assert_close(fused[0, 1 + start : 3 + start], ctx.norm(pre))
    # swapping which modality a sequence claims to be changes its modality contribution
    with torch.no_grad():
        _, as_depth = ctx({"depth": x})
        _, as_image = ctx({"image": x})
        d = ctx.e_ctx[3 * MAXC : 3 * MAXC + 2] + ctx.e_mod[3]
        i = ctx.e_ctx[0:2] + ctx.e_mod[0]
    torch.testing.assert_close(as_depth[0, 1:], ctx.norm(x[0] + d + ctx.e_pos[:2]))
    torch.testing.assert_close(as_image[0, 1:], ctx.norm(x[0] + i + ctx.e_pos[:2]))


def test_gradients_reach_used_rows_only_and_fusion_mixes() -> None:
    ctx = _context(fusion_layers=2).train()
    mods = ["video", "depth"]
    toks = _tokens(mods)
    src = torch.tensor([[1, 1], [1, 1]])
    z, fused = ctx(toks, src)
    (z.square().sum() + fused.square().sum()).backward()
    used_ctx = [MODALITY_ID["video"] * MAXC + i for i in range(6)] + [
        MODALITY_ID["depth"] * MAXC + i for i in range(2)
    ]
    nz = lambda g: set(torch.nonzero(g.abs().sum(-1) > 0).flatten().tolist())  # noqa: E731
    assert nz(ctx.e_ctx.grad) == set(used_ctx)
    assert nz(ctx.e_mod.grad) == {MODALITY_ID["video"], MODALITY_ID["depth"]}
    assert nz(ctx.e_pos.grad) == set(range(8))
    assert nz(ctx.e_sam.grad) == {1}
    assert ctx.ctx_token.grad.abs().sum() > 0
    assert all(p.grad is not None for p in ctx.blocks.parameters())
    # with fusion, z depends on every context token
    with torch.no_grad():
        ctx.eval()
        z0, _ = ctx(toks, src)
        toks2 = {m: t.clone() for m, t in toks.items()}
        toks2["depth"][:, 1] += torch.randn(D)
        z1, _ = ctx(toks2, src)
    assert not torch.allclose(z0, z1)


def test_bad_inputs_raise() -> None:
    ctx = _context()
    with pytest.raises(ValueError, match="max_context_len"):
        ctx({"image": torch.randn(1, MAXC + 1, D)})
    with pytest.raises(ValueError, match="max_positions"):
        ctx({m: torch.randn(1, MAXC, D) for m in MODALITIES})
    with pytest.raises(ValueError, match="sample_source"):
        ctx(_tokens(["image", "audio"]), torch.zeros(2, 1, dtype=torch.long))
    with pytest.raises(ValueError, match="num_sources"):
        ctx(_tokens(["image"]), torch.full((2, 1), 3))
    with pytest.raises(ValueError, match="non-empty subset"):
        ctx({})


def test_all_modality_subsets_index_layout() -> None:
    ctx = _context()
    for r in range(1, 4):
        for mods in itertools.combinations(MODALITIES, r):
            lengths = {m: LENGTHS[m] for m in mods}
            if sum(lengths.values()) > 24:
                continue
            c, m, p = ctx.indices(lengths, "cpu")
            expect_m = [MODALITY_ID[x] for x in mods for _ in range(LENGTHS[x])]
            expect_c = [MODALITY_ID[x] * MAXC + i for x in mods for i in range(LENGTHS[x])]
            assert m.tolist() == expect_m and c.tolist() == expect_c
            assert p.tolist() == list(range(len(expect_m)))
