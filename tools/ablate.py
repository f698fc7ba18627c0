"""The MiCo Table 7 ablations at demo scale: pretraining objectives and pretraining modalities.

Every variant trains the demo model from the same seed for the same number of steps on the demo
corpus's omni samples (2 CPU ranks, ZeRO-3), then is evaluated on the held-out split with the
appendix B.3 protocol: retrieval (contrastive, and the top-k reranked by the matching head), beam-3
captioning (CIDEr-D) and open-ended QA (exact match), all on the variant's own modalities, plus
image-only retrieval (the one input every variant was trained on: a fixed benchmark).

    python tools/ablate.py                       # every variant, ~30-40 min on 2 CPU cores
    python tools/ablate.py --variants l,m,f --steps 40 --out runs/ablation-small
    python tools/ablate.py --table-only          # re-read finished runs, print the table

Writes OUT/recipes/<id>.yaml (the exact recipe of each variant), OUT/runs/<id>/ (run directories),
OUT/results.json, OUT/table.md and OUT/loss_curves.png (tools/plot_runs.py).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

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


def variant_recipe(vid: str, args: argparse.Namespace) -> dict:
    """The demo recipe with one omni corpus carrying the variant's modalities and objective weights."""
    raw = yaml.safe_load((REPO / "mico_ds" / "recipes" / "demo.yaml").read_text())
    row, label, mods, (wc, wm, wg) = VARIANTS[vid]
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
    raw["optim"]["warmup_steps"] = max(1, args.steps // 10)
    raw["train"].update(
        max_steps=args.steps, log_every=args.log_every, save_every=args.steps, eval_every=0, seed=args.seed,
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
    }
    return raw


def run(cmd: list[str], log: Path) -> None:
    env = dict(os.environ, PYTHONPATH=f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    env.setdefault("OMP_NUM_THREADS", "1")
    with open(log, "w") as f:
        p = subprocess.run(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT)
    if p.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} exited {p.returncode}; see {log}")


def run_variant(vid: str, args: argparse.Namespace, out: Path) -> dict:
    recipe = out / "recipes" / f"{vid}.yaml"
    run_dir = out / "runs" / vid
    recipe.parent.mkdir(parents=True, exist_ok=True)
    cmd = f"python -m mico_ds.train --recipe {recipe} --run-dir {run_dir}"
    text = f"# tools/ablate.py variant {vid} {VARIANTS[vid][:2]}:\n#   {cmd}\n"
    recipe.write_text(text + yaml.safe_dump(variant_recipe(vid, args), sort_keys=False))
    t0 = time.perf_counter()
    if not (run_dir / "summary.json").exists():
        if run_dir.exists():
            raise SystemExit(f"{run_dir} exists without summary.json (an interrupted run): remove it")
        run([sys.executable, "-m", "mico_ds.train", "--recipe", str(recipe), "--run-dir", str(run_dir)],
            out / f"{vid}.train.log")  # fmt: skip
    t_train = time.perf_counter() - t0
    img = out / "runs" / vid / "eval_image.json"
    if not img.exists():
        cmd_eval = [sys.executable, "-m", "mico_ds.eval", "--checkpoint", str(run_dir), "--tasks",
                    "retrieval", "--modalities", "image", "--no-progress", "--out", str(img)]  # fmt: skip
        run(cmd_eval, out / f"{vid}.eval_image.log")
    return collect(vid, out, t_train)


def collect(vid: str, out: Path, seconds: float | None = None) -> dict:
    run_dir = out / "runs" / vid
    summary = json.loads((run_dir / "summary.json").read_text())
    img = json.loads((run_dir / "eval_image.json").read_text())
    ev = summary["eval"]
    row, label, mods, w = VARIANTS[vid]
    rec = {
        "id": vid, "row": row, "label": label, "modalities": mods, "weights": w,
        "steps": summary["steps"], "last_loss": summary["last"],
        "t2k_r1": ev["retrieval/t2k_r1"], "k2t_r1": ev["retrieval/k2t_r1"],
        "t2k_r1_rerank": ev.get("retrieval/t2k_r1_rerank"),
        "k2t_r1_rerank": ev.get("retrieval/k2t_r1_rerank"),
        "img_t2k_r1": img["retrieval/t2k_r1"], "img_k2t_r1": img["retrieval/k2t_r1"],
        "img_t2k_r1_rerank": img.get("retrieval/t2k_r1_rerank"),
        "cider": ev["captioning/cider"], "bleu1": ev["captioning/bleu1"], "bleu4": ev["captioning/bleu4"],
        "qa": ev["qa/accuracy"],
        "gen_gain": ev.get("grounding/gen_gain"), "match_pref": ev.get("grounding/match_pairwise_acc"),
        "caption_example": ev.get("captioning/examples", [{}])[0].get("generated"),
        "qa_example": ev.get("qa/examples", [{}])[0],
    }  # fmt: skip
    if seconds is not None:
        rec["seconds"] = seconds
    return rec


def table(recs: list[dict]) -> str:
    def f(v: float | None, nd: int = 1) -> str:
        return "–" if v is None else f"{v:.{nd}f}"

    head = (
        "| row | variant | t2k R@1 | t2k R@1 rerank | k2t R@1 | k2t R@1 rerank | image-only t2k R@1 | "
        "image-only t2k R@1 rerank | CIDEr-D | BLEU-1 | BLEU-4 | QA acc | grounding gain (nats) | "
        "matching prefers own context | final loss |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n"
    )
    lines = []
    for r in recs:
        no_match = r["weights"][1] == 0
        mark = "*" if no_match else ""
        lines.append(
            f"| {r['row']} | {r['label']} | {f(r['t2k_r1'])} | {f(r['t2k_r1_rerank'])}{mark} | "
            f"{f(r['k2t_r1'])} | {f(r['k2t_r1_rerank'])}{mark} | {f(r['img_t2k_r1'])} | "
            f"{f(r['img_t2k_r1_rerank'])}{mark} | "
            f"{f(r['cider'], 3)} | {f(r['bleu1'], 3)} | {f(r['bleu4'], 3)} | {f(r['qa'])} | "
            f"{f(r.get('gen_gain'), 3)} | {f(None if r.get('match_pref') is None else 100 * r['match_pref'])}"
            f"{mark} | {f(r['last_loss']['loss'], 3)} |"
        )
    return head + "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/ablation", help="output directory (recipes, runs, table)")
    p.add_argument("--variants", default=",".join(ORDER), help=f"comma-separated ids of {ORDER}")
    p.add_argument("--steps", type=int, default=300, help="training steps of every variant (the demo's)")
    p.add_argument("--batch-size", type=int, default=32, help="per-rank batch size, 2 ranks (the demo's)")
    p.add_argument("--seed", type=int, default=0, help="train.seed of every variant")
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

    recs = []
    t0 = time.perf_counter()
    old = {}  # training seconds measured by the run that produced the variants
    if args.table_only and (out / "results.json").is_file():
        old = {r["id"]: r.get("seconds") for r in json.loads((out / "results.json").read_text())}
    for vid in tqdm(ids, desc="ablation", disable=args.table_only):
        recs.append(collect(vid, out, old.get(vid)) if args.table_only else run_variant(vid, args, out))
        (out / "results.json").write_text(json.dumps(recs, indent=1))
    md = table(recs)
    (out / "table.md").write_text(md)
    print(md)
    if not args.table_only:
        print(f"total {time.perf_counter() - t0:.0f} s")
    dirs = [str(out / "runs" / v) for v in ids]
    labels = [f"{VARIANTS[v][0]} {VARIANTS[v][1]}" for v in ids]
    subprocess.run([sys.executable, str(REPO / "tools" / "plot_runs.py"), *dirs, "--labels", *labels,
                    "--out", str(out / "loss_curves.png")], check=True)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
