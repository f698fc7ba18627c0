#!/usr/bin/env python
"""Fine-tuning step speed per task, side by side with the pretraining step (docs/benchmarks.md).

    python tools/bench_finetune.py --data data/demo --steps 10 --json out.json --markdown

Each case is a fresh 2-rank run of the real trainer under the ``deepspeed`` launcher (gloo, ZeRO-3
with the recipe's ds_config), timed as ``tools/bench_train.py`` times it: global samples/s over
``--steps`` optimizer steps after ``--warmup`` untimed ones, no evaluation, no checkpoint. The cases
are the demo's model and corpus trained as each task trains it:

- ``pretrain``: the ``demo`` recipe (contrastive, listwise matching, generation; all five modalities);
- ``retrieval``: ``demo_retrieval`` (contrastive + listwise matching, image-text pairs);
- ``qa``: ``demo_qa`` (generation of the answer tokens only, one decoder row per target);
- ``captioning``: ``demo`` with ``task.name=captioning`` (generation only, all modalities);
- ``captioning_scst``: the same with ``task.scst.enabled=true`` (a greedy and a sampled rollout of
  ``task.scst.max_tokens`` decoder steps per item, then the policy-gradient pass).

Weights are random (speed does not depend on them). ``classification`` needs labelled shards, which
the demo corpus has none of; ``tests/unit/tasks/test_classification.py`` trains it on CPU.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import tempfile
from pathlib import Path
from typing import Any

CAPTIONING = [
    "task.name=captioning", "objectives.contrastive_weight=0", "objectives.matching_weight=0",
    "eval.tasks=[captioning]",
]  # fmt: skip
CASES: dict[str, tuple[str, list[str]]] = {
    "pretrain": ("demo", []),
    "retrieval": ("demo_retrieval", []),
    "qa": ("demo_qa", []),
    "captioning": ("demo", CAPTIONING),
    "captioning_scst": ("demo", [*CAPTIONING, "task.scst.enabled=true", "task.scst.max_tokens=12"]),
}


def _bench_train() -> Any:
    """tools/bench_train.py as a module (its run_case times one case)."""
    spec = importlib.util.spec_from_file_location("bench_train", Path(__file__).with_name("bench_train.py"))
    mod = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(mod)  # type: ignore[union-attr]
    return mod


def markdown(res: dict[str, Any]) -> str:
    ref = next((c for c in res["cases"] if c["case"] == "pretrain"), res["cases"][0])
    base = ref["samples_per_s"]
    lines = [
        f"{res['nproc']} CPU ranks (gloo), ZeRO-3, {res['steps']} timed steps after {res['warmup']} warm-up "
        "steps, the demo's model",
        "",
        f"| task | recipe and overrides | samples/s | s/step | samples/s vs {ref['case']} |",
        "| --- | --- | --- | --- | --- |",
    ]
    for c in res["cases"]:
        how = " ".join([f"`{c['recipe']}`", *(f"`{o}`" for o in c["overrides"])])
        lines.append(
            f"| {c['case']} | {how} | {c['samples_per_s']:.1f} | {c['seconds_per_step']:.3f} | "
            f"{c['samples_per_s'] / base:.2f}x |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--data", default="/tmp/mico_bench_train", help="demo corpus location (generated once)")
    p.add_argument("--nproc", type=int, default=2, help="CPU ranks (default 2)")
    p.add_argument("--steps", type=int, default=10, help="timed optimizer steps per case")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    p.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES), help="which tasks")
    p.add_argument("--json", default=None, help="write the results to this file")
    p.add_argument("--markdown", action="store_true", help="print a Markdown table")
    args = p.parse_args(argv)
    bt = _bench_train()
    cases = []
    with tempfile.TemporaryDirectory(prefix="mico_bench_finetune_") as d:
        for i, name in enumerate(args.cases):
            recipe, overrides = CASES[name]
            case_args = argparse.Namespace(
                recipe=recipe, nproc=args.nproc, steps=args.steps, warmup=args.warmup, data=args.data,
                override=[f"--{o}" for o in ["train.eval_every=0", *overrides]],
            )  # fmt: skip
            out = bt.run_case(case_args, f"case{i}", "zero3_cpu.json", Path(d))
            r = out["ranks"][0]
            cases.append({"case": name, "recipe": recipe, "overrides": overrides, "ranks": out["ranks"],
                          "samples_per_s": r["samples_per_s"],
                          "seconds_per_step": r["seconds_per_step"]})  # fmt: skip
    fields = {"nproc": args.nproc, "steps": args.steps, "warmup": args.warmup, "cases": cases}
    bt.report("bench_finetune.py", argv, fields, args, markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
