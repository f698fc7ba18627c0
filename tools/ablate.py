"""The MiCo Table 7 ablations at demo scale: pretraining objectives and pretraining modalities.

Every variant trains the demo model from the same seed for the same number of steps on the demo
corpus's omni samples (2 CPU ranks, ZeRO-3), then is evaluated on the held-out split with the
appendix B.3 protocol: retrieval (contrastive, and the top-k reranked by the matching head), beam-3
captioning (CIDEr-D) and open-ended QA (exact match), all on the variant's own modalities, plus
image-only retrieval (the one input every variant was trained on: a fixed benchmark).

    python tools/ablate.py                       # every variant, one seed, ~30-40 min on 2 CPU cores
    python tools/ablate.py --seeds 3             # three seeds each: mean +- std of every figure
    python tools/ablate.py --variants l,m,f --steps 40 --out runs/ablation-small
    python tools/ablate.py --table-only          # re-read finished runs, print the table

Seed s of variant v is the run OUT/runs/<v>-s<s>/ (``train.seed`` = s: initialization, data order,
masking and mining all change with it); finished runs are reused, so an interrupted ablation goes on
where it stopped. Writes OUT/recipes/<v>-s<s>.yaml (the exact recipe of each run), OUT/results.json
(every run's figures and the per-variant mean and std), OUT/table.md and OUT/loss_curves.png
(tools/plot_runs.py, the first seed of each variant).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

from mico_ds.config import EvalConfig

REPO = Path(__file__).resolve().parents[1]
ALL = ["image", "video", "audio", "depth", "normal"]
# id: (Table 7 row, label, pretraining modalities, (contrastive, matching, generation) on/off); a term
# that is on keeps the demo recipe's weight (contrastive 0.1: see the recipe's comment)
VARIANTS: dict[str, tuple[str, str, list[str], tuple[float, float, float]]] = {
    "a": ("(a)", "I", ["image"], (1.0, 1.0, 1.0)),
    "d": ("(d)", "I+V", ["image", "video"], (1.0, 1.0, 1.0)),
    "e": ("(e)", "I+V+A", ["image", "video", "audio"], (1.0, 1.0, 1.0)),
    "f": ("(f)/(n)", "I+V+A+D+N, Con+Match+Gen", ALL, (1.0, 1.0, 1.0)),
    "l": ("(l)", "Con", ALL, (1.0, 0.0, 0.0)),
    "m": ("(m)", "Con+Match", ALL, (1.0, 1.0, 0.0)),
}
ORDER = ["l", "m", "f", "a", "d", "e"]


def variant_recipe(vid: str, args: argparse.Namespace, seed: int | None = None) -> dict:
    """The demo recipe with one omni corpus carrying the variant's modalities and objective weights,
    trained with ``train.seed`` = ``seed`` (default ``args.seed``)."""
    raw = yaml.safe_load((REPO / "mico_ds" / "recipes" / "demo.yaml").read_text())
    row, label, mods, (wc, wm, wg) = VARIANTS[vid]
    seed = args.seed if seed is None else seed
    demo_steps, demo_warmup = raw["train"]["max_steps"], raw["optim"]["warmup_steps"]
    demo_eval = raw["eval"]
    raw["name"] = f"ablate-{vid}"
    raw["data"]["root"] = args.data_root
    raw["data"]["tokenizer"] = f"{args.data_root}/tokenizer/tokenizer.model"
    raw["data"]["corpora"] = [
        {"name": "omni", "shards": "omni/train-*.tar", "modalities": mods, "batch_size": args.batch_size}
    ]
    raw["data"]["val_modalities"] = mods
    o = raw["objectives"]
    o.update(
        contrastive_weight=wc * o.get("contrastive_weight", 1.0),
        matching_weight=wm * o.get("matching_weight", 1.0),
        generation_weight=wg * o.get("generation_weight", 1.0),
    )
    raw["optim"]["warmup_steps"] = max(1, round(demo_warmup * args.steps / demo_steps))  # the demo's share
    raw["train"].update(
        max_steps=args.steps, log_every=args.log_every, save_every=args.steps, eval_every=0, seed=seed,
        progress=False,
    )  # fmt: skip
    raw["eval"] = {
        "tasks": ["retrieval", "captioning", "qa", "grounding"],
        "max_samples": 256,
        "batch_size": 64,
        "rerank_k": args.rerank_k,
        "caption_samples": args.caption_samples,
        "qa_samples": args.qa_samples,
        "num_beams": 3,
        # the rerank weight is chosen on the demo's tune split, never on the reported val split
        "rerank_tune_shards": demo_eval.get("rerank_tune_shards"),
        "rerank_tune_samples": demo_eval.get("rerank_tune_samples", EvalConfig().rerank_tune_samples),
    }
    return raw


def run(cmd: list[str], log: Path) -> None:
    env = dict(os.environ, PYTHONPATH=f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    env.setdefault("OMP_NUM_THREADS", "1")
    with open(log, "w") as f:
        p = subprocess.run(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT)
    if p.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} exited {p.returncode}; see {log}")


def run_name(vid: str, seed: int) -> str:
    return f"{vid}-s{seed}"


def run_variant(vid: str, seed: int, args: argparse.Namespace, out: Path) -> dict:
    name = run_name(vid, seed)
    recipe = out / "recipes" / f"{name}.yaml"
    run_dir = out / "runs" / name
    recipe.parent.mkdir(parents=True, exist_ok=True)
    cmd = f"python -m mico_ds.train --recipe {recipe} --run-dir {run_dir}"
    text = f"# tools/ablate.py variant {vid} {VARIANTS[vid][:2]}, seed {seed}:\n#   {cmd}\n"
    recipe.write_text(text + yaml.safe_dump(variant_recipe(vid, args, seed), sort_keys=False))
    t0 = time.perf_counter()
    if not (run_dir / "summary.json").exists():
        if run_dir.exists():
            raise SystemExit(f"{run_dir} exists without summary.json (an interrupted run): remove it")
        run([sys.executable, "-m", "mico_ds.train", "--recipe", str(recipe), "--run-dir", str(run_dir)],
            out / f"{name}.train.log")  # fmt: skip
    t_train = time.perf_counter() - t0
    img = run_dir / "eval_image.json"
    if not img.exists():
        cmd_eval = [sys.executable, "-m", "mico_ds.eval", "--checkpoint", str(run_dir), "--tasks",
                    "retrieval", "--modalities", "image", "--no-progress", "--out", str(img)]  # fmt: skip
        run(cmd_eval, out / f"{name}.eval_image.log")
    return collect(vid, seed, out, t_train)


def collect(vid: str, seed: int, out: Path, seconds: float | None = None) -> dict:
    run_dir = out / "runs" / run_name(vid, seed)
    summary = json.loads((run_dir / "summary.json").read_text())
    img = json.loads((run_dir / "eval_image.json").read_text())
    ev = summary["eval"]
    row, label, mods, w = VARIANTS[vid]
    rec = {
        "id": vid, "seed": seed, "row": row, "label": label, "modalities": mods, "weights": w,
        "steps": summary["steps"], "last_loss": summary["last"],
        "t2k_r1": ev["retrieval/t2k_r1"], "k2t_r1": ev["retrieval/k2t_r1"],
        "t2k_r1_rerank": ev.get("retrieval/t2k_r1_rerank"),
        "k2t_r1_rerank": ev.get("retrieval/k2t_r1_rerank"),
        "t2k_r1_rerank_match": ev.get("retrieval/t2k_r1_rerank_match"),
        "k2t_r1_rerank_match": ev.get("retrieval/k2t_r1_rerank_match"),
        "rerank_weight": ev.get("retrieval/rerank_weight"),
        "img_t2k_r1": img["retrieval/t2k_r1"], "img_k2t_r1": img["retrieval/k2t_r1"],
        "img_t2k_r1_rerank": img.get("retrieval/t2k_r1_rerank"),
        "cider": ev["captioning/cider"], "bleu1": ev["captioning/bleu1"], "bleu4": ev["captioning/bleu4"],
        "qa": ev["qa/accuracy"],
        "gen_gain": ev.get("grounding/gen_gain"), "match_pref": ev.get("grounding/match_pairwise_acc"),
        "final_loss": summary["last"]["loss"],
        "caption_example": ev.get("captioning/examples", [{}])[0].get("generated"),
        "qa_example": ev.get("qa/examples", [{}])[0],
    }  # fmt: skip
    if seconds is not None:
        rec["seconds"] = seconds
    return rec


# (record key, column, multiplier, decimals) of the table, in order
COLUMNS: list[tuple[str, str, float, int]] = [
    ("t2k_r1", "t2k R@1", 1, 1),
    ("t2k_r1_rerank", "t2k R@1 rerank", 1, 1),
    ("t2k_r1_rerank_match", "t2k R@1 matching only", 1, 1),
    ("k2t_r1", "k2t R@1", 1, 1),
    ("k2t_r1_rerank", "k2t R@1 rerank", 1, 1),
    ("k2t_r1_rerank_match", "k2t R@1 matching only", 1, 1),
    ("img_t2k_r1", "image-only t2k R@1", 1, 1),
    ("img_t2k_r1_rerank", "image-only t2k R@1 rerank", 1, 1),
    ("cider", "CIDEr-D", 1, 3),
    ("bleu4", "BLEU-4", 1, 3),
    ("qa", "QA acc", 1, 1),
    ("gen_gain", "grounding gain (nats)", 1, 3),
    ("match_pref", "matching prefers own context", 100, 1),
    ("rerank_weight", "rerank w", 1, 2),
    ("final_loss", "final loss", 1, 3),
]
# figures of an untrained matching head when a variant does not train it (marked *)
MATCH_DEPENDENT = {"t2k_r1_rerank", "t2k_r1_rerank_match", "k2t_r1_rerank", "k2t_r1_rerank_match",
                   "img_t2k_r1_rerank", "match_pref", "rerank_weight"}  # fmt: skip


def aggregate(recs: list[dict]) -> list[dict]:
    """Per variant (first-seen order): the seeds run, and per column the mean and the sample std."""
    by_id: dict[str, list[dict]] = {}
    for r in recs:
        by_id.setdefault(r["id"], []).append(r)
    rows = []
    for rs in by_id.values():
        row = {k: rs[0][k] for k in ("id", "row", "label", "modalities", "weights")}
        row["seeds"] = [r["seed"] for r in rs]
        for key, _, mult, _ in COLUMNS:
            vals = [mult * r[key] for r in rs if r.get(key) is not None]
            if vals:
                std = statistics.stdev(vals) if len(vals) > 1 else 0.0  # sample std
                row[key] = {"mean": statistics.fmean(vals), "std": std, "n": len(vals)}
        rows.append(row)
    return rows


def table(recs: list[dict]) -> str:
    """The markdown table: one row per variant, "mean ± std" over its seeds (one seed: the value)."""

    def cell(v: dict | None, nd: int) -> str:
        if v is None:
            return "–"
        return f"{v['mean']:.{nd}f}" if v["n"] == 1 else f"{v['mean']:.{nd}f} ± {v['std']:.{nd}f}"

    head = "| row | variant | seeds | " + " | ".join(c for _, c, _, _ in COLUMNS) + " |\n"
    head += "|" + "---|" * (3 + len(COLUMNS)) + "\n"
    lines = []
    for r in aggregate(recs):
        mark = "*" if r["weights"][1] == 0 else ""
        cells = [cell(r.get(k), nd) + (mark if k in MATCH_DEPENDENT else "") for k, _, _, nd in COLUMNS]
        lines.append(f"| {r['row']} | {r['label']} | {len(r['seeds'])} | " + " | ".join(cells) + " |")
    return head + "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/ablation", help="output directory (recipes, runs, table)")
    p.add_argument("--variants", default=",".join(ORDER), help=f"comma-separated ids of {ORDER}")
    p.add_argument("--steps", type=int, default=300, help="training steps of every variant (the demo's)")
    p.add_argument("--batch-size", type=int, default=32, help="per-rank batch size, 2 ranks (the demo's)")
    p.add_argument("--seed", type=int, default=0, help="train.seed of the first seed of every variant")
    p.add_argument("--seeds", type=int, default=1, help="seeds per variant (3: error bars)")
    p.add_argument("--log-every", type=int, default=5, help="steps between loss records")
    p.add_argument("--rerank-k", type=int, default=16, help="candidates reranked by the matching head")
    p.add_argument("--caption-samples", type=int, default=64, help="held-out items captioned")
    p.add_argument("--qa-samples", type=int, default=32, help="held-out items whose questions are asked")
    p.add_argument("--data-root", default="data/demo", help="demo corpus directory (generated if missing)")
    p.add_argument("--table-only", action="store_true", help="only collect finished runs and print the table")
    args = p.parse_args()
    out = Path(args.out)
    ids = args.variants.split(",")
    bad = [v for v in ids if v not in VARIANTS]
    if bad:
        p.error(f"unknown variants {bad}; known: {list(VARIANTS)}")
    from tqdm import tqdm

    if args.seeds < 1:
        p.error(f"--seeds must be >= 1, got {args.seeds}")
    seeds = list(range(args.seed, args.seed + args.seeds))
    # seed-major: every variant's first seed comes before any second one, so a stopped ablation
    # still has a complete one-seed table
    todo = [(vid, s) for s in seeds for vid in ids]
    recs = []
    t0 = time.perf_counter()
    old = {}  # training seconds measured by the run that produced the variants
    if args.table_only and (out / "results.json").is_file():
        saved = json.loads((out / "results.json").read_text()).get("runs", [])
        old = {(r["id"], r["seed"]): r.get("seconds") for r in saved}
    for vid, seed in tqdm(todo, desc="ablation", disable=args.table_only):
        if args.table_only:
            if not (out / "runs" / run_name(vid, seed) / "summary.json").is_file():
                continue
            recs.append(collect(vid, seed, out, old.get((vid, seed))))
        else:
            recs.append(run_variant(vid, seed, args, out))
        result = {"runs": recs, "variants": aggregate(recs)}
        (out / "results.json").write_text(json.dumps(result, indent=1))
    md = table(recs)
    (out / "table.md").write_text(md)
    print(md)
    if not args.table_only:
        print(f"total {time.perf_counter() - t0:.0f} s")
    dirs = [str(out / "runs" / run_name(v, seeds[0])) for v in ids]
    labels = [f"{VARIANTS[v][0]} {VARIANTS[v][1]}" for v in ids]
    subprocess.run([sys.executable, str(REPO / "tools" / "plot_runs.py"), *dirs, "--labels", *labels,
                    "--out", str(out / "loss_curves.png")], check=True)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
