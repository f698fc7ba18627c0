"""Plot training-loss curves of any set of run directories (MiCo Figure 6 in miniature).

One panel per objective (total loss, contrastive, matching, generation), one line per run, from each
run's metrics.jsonl. A term a run did not train (weight 0: logged as exactly 0) is left out of its
panel.

    python tools/plot_runs.py runs/a runs/b --labels "I" "I+V" --out loss.png
    python tools/plot_runs.py runs/ablation/runs/* --out docs/ablations_loss_curves.png --smooth 3
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

TERMS = ("loss", "contrastive_loss", "matching_loss", "generation_loss")
TITLES = {
    "loss": "total loss",
    "contrastive_loss": "contrastive (Eq. 4)",
    "matching_loss": "matching (Eq. 5)",
    "generation_loss": "generation (Eq. 6)",
}


def read_curves(run_dir: Path) -> dict[str, tuple[list[int], list[float]]]:
    """``{term: (steps, values)}`` of the training records of ``run_dir/metrics.jsonl``."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise ValueError(f"{path} not found: not a run directory")
    recs = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            r = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{n}: not JSON ({e})") from None
        if "loss" in r and "step" in r:
            recs.append(r)
    by_step = {int(r["step"]): r for r in recs}  # a resumed run may log a step twice: keep the last
    steps = sorted(by_step)
    out = {}
    for term in TERMS:
        vals = [by_step[s].get(term) for s in steps]
        pts = [(s, float(v)) for s, v in zip(steps, vals) if v is not None]
        if pts and any(v != 0.0 for _, v in pts):
            out[term] = ([s for s, _ in pts], [v for _, v in pts])
    return out


def smooth(values: list[float], window: int) -> list[float]:
    """Trailing moving average over ``window`` records."""
    if window <= 1:
        return values
    out = []
    for i in range(len(values)):
        part = values[max(0, i - window + 1) : i + 1]
        out.append(sum(part) / len(part))
    return out


def plot(runs: list[Path], labels: list[str], out: Path, window: int = 1, title: str | None = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = [read_curves(r) for r in runs]
    fig, axes = plt.subplots(1, len(TERMS), figsize=(4.2 * len(TERMS), 3.6))
    for ax, term in zip(axes, TERMS):
        for i, (c, label) in enumerate(zip(curves, labels)):
            if term in c:
                steps, vals = c[term]
                marker = "o" if len(steps) < 4 else None  # a line of one point is invisible
                # One colour per run in every panel (a panel skips the runs without that term).
                ax.plot(
                    steps, smooth(vals, window), label=label, linewidth=1.4, marker=marker, color=f"C{i % 10}"
                )
        ax.set_title(TITLES[term])
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("loss")
    handles, names = axes[0].get_legend_handles_labels()  # the total loss panel has every run
    fig.legend(handles, names, loc="lower center", ncol=min(len(names), 6), frameon=False)
    if title:
        fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="run directories (each with metrics.jsonl)")
    p.add_argument("--labels", nargs="+", default=None, help="legend label per run (default: dir names)")
    p.add_argument("--out", default="loss_curves.png", help="PNG to write")
    p.add_argument("--smooth", type=int, default=1, help="moving-average window in records (1: raw)")
    p.add_argument("--title", default=None, help="figure title")
    args = p.parse_args(argv)
    runs = [Path(r) for r in args.runs]
    labels = args.labels or [r.name for r in runs]
    if len(labels) != len(runs):
        p.error(f"{len(labels)} labels for {len(runs)} runs")
    path = plot(runs, labels, Path(args.out), args.smooth, args.title)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
