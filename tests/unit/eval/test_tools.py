"""tools/plot_runs.py on synthetic metrics.jsonl files; tools/ablate.py variant recipes load strictly."""

from __future__ import annotations

import argparse
import importlib.util
import json
from pathlib import Path

import pytest

from mico_ds.config import config_from_dict, load_config

REPO = Path(__file__).resolve().parents[3]


def _tool(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "tools" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _write_run(d: Path, gen: bool) -> None:
    d.mkdir(parents=True)
    lines = []
    for s in range(1, 11):
        rec = {"step": s, "loss": 5.0 - 0.1 * s, "contrastive_loss": 3.0 - 0.1 * s, "matching_loss": 0.69,
               "generation_loss": (2.0 - 0.05 * s) if gen else 0.0}  # fmt: skip
        lines.append(json.dumps(rec))
        if s == 5:
            lines.append(json.dumps({"step": 5, "retrieval/t2k_r1": 10.0}))  # an eval record: not a curve
    lines.append(json.dumps({"step": 4, "loss": 1.0}))  # a resumed run re-logs step 4: the last wins
    (d / "metrics.jsonl").write_text("\n".join(lines) + "\n")


def test_plot_runs(tmp_path: Path) -> None:
    plot_runs = _tool("plot_runs")
    _write_run(tmp_path / "a", gen=True)
    _write_run(tmp_path / "b", gen=False)
    curves = plot_runs.read_curves(tmp_path / "b")
    assert "generation_loss" not in curves  # weight 0: logged as 0, left out
    steps, vals = curves["loss"]
    assert steps == list(range(1, 11)) and vals[3] == 1.0
    assert curves["matching_loss"][0] == [1, 2, 3, *range(5, 11)]  # the re-logged step 4 has no term
    out = tmp_path / "png" / "curves.png"
    assert plot_runs.main([str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(out), "--smooth", "3"]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000
    assert plot_runs.smooth([1.0, 2.0, 3.0, 4.0], 2) == [1.0, 1.5, 2.5, 3.5]
    with pytest.raises(ValueError, match="not a run directory"):
        plot_runs.read_curves(tmp_path / "missing")


@pytest.mark.parametrize("vid", ["a", "d", "e", "f", "l", "m"])
def test_ablation_variants_are_valid_recipes(vid: str) -> None:
    ablate = _tool("ablate")
    args = argparse.Namespace(data_root="data/demo", batch_size=16, steps=120, log_every=5, seed=0,
                              rerank_k=16, caption_samples=64, qa_samples=32)  # fmt: skip
    cfg = config_from_dict(ablate.variant_recipe(vid, args))
    _, _, mods, on = ablate.VARIANTS[vid]
    assert cfg.data.corpora[0].modalities == mods == cfg.data.val_modalities
    o, demo = cfg.objectives, load_config("demo").objectives  # a term that is on keeps the demo's weight
    want = (demo.contrastive_weight, demo.matching_weight, demo.generation_weight)
    assert (o.contrastive_weight, o.matching_weight, o.generation_weight) == tuple(
        w * x for w, x in zip(want, on)
    )
    assert cfg.train.max_steps == 120 and cfg.train.seed == 0 and cfg.eval.num_beams == 3
    assert config_from_dict(ablate.variant_recipe(vid, args, seed=2)).train.seed == 2
    # the rerank weight is tuned on the demo's tune split, as in the demo
    assert cfg.eval.rerank_tune_shards == load_config("demo").eval.rerank_tune_shards is not None


def test_ablation_table_reports_mean_and_sample_std_over_seeds() -> None:
    ablate = _tool("ablate")
    base = {"row": "(m)", "label": "Con+Match", "modalities": ["image"], "weights": (1.0, 1.0, 0.0)}
    recs = [
        {**base, "id": "m", "seed": s, "t2k_r1": v, "match_pref": p, "final_loss": 1.0}
        for s, v, p in [(0, 50.0, 0.8), (1, 54.0, 0.9), (2, 58.0, 1.0)]
    ]
    recs.append({**base, "id": "l", "row": "(l)", "seed": 0, "t2k_r1": 70.0, "weights": (1.0, 0.0, 0.0)})
    (m, l_) = ablate.aggregate(recs)
    assert m["seeds"] == [0, 1, 2] and m["t2k_r1"] == {"mean": 54.0, "std": 4.0, "n": 3}
    assert m["match_pref"]["mean"] == pytest.approx(90.0) and m["match_pref"]["std"] == pytest.approx(10.0)
    assert l_["t2k_r1"] == {"mean": 70.0, "std": 0.0, "n": 1} and "cider" not in l_
    lines = ablate.table(recs).splitlines()
    assert lines[0].startswith("| row | variant | seeds | t2k R@1 |")
    assert lines[2].startswith("| (m) | Con+Match | 3 | 54.0 ± 4.0 |") and "| 90.0 ± 10.0 |" in lines[2]
    assert lines[3].startswith("| (l) | Con+Match | 1 | 70.0 |") and "| –* |" in lines[3]
