"""Memory and throughput planner for a recipe on N nodes x G GPUs: does it fit, how fast, how many days.

    python tools/plan.py vitg_llama2_7b_64gpu          # nodes, GPUs, GPU model from the recipe's launch hints
    python tools/plan.py vitg_llama2_7b_64gpu --nodes 4 --gpu h100-80gb --mfu 0.45
    python tools/plan.py vitl_llama2_7b_32gpu --train.ds_config=zero3_bf16_7b_offload.json --json
    python tools/plan.py vitg_llama2_7b_64gpu --model.vision.grad_checkpointing=false   # -> NO, exit 1
    python tools/plan.py debug --validate        # predicted vs measured peaks of real 2-rank CPU runs

The model (memory per part, FLOPs, step time) is written out in ``mico_ds.planner.memory`` and
docs/planner.md. Exit code 0: every corpus fits; 1: one does not (the table says NO); 2: usage error.
"""

from __future__ import annotations

import argparse
import json
import sys

from mico_ds.planner.memory import GPUS
from mico_ds.planner.plan import format_plan, make_plan, plan_json
from mico_ds.planner.validate import (
    VALIDATION_BATCH,
    VALIDATION_SIZE,
    format_validation,
    measure_worker,
    validate,
)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    p.add_argument("recipe")
    p.add_argument("--nodes", type=int, help="nodes [the recipe's launch.nodes, else 1]")
    p.add_argument("--gpus-per-node", type=int, help="GPUs per node [launch.gpus_per_node, else 1]")
    p.add_argument("--gpu", choices=sorted(GPUS), help="GPU model [launch.gpu, else a100-80gb]")
    p.add_argument("--mfu", type=float, default=0.40, help="model FLOPs utilization assumed [0.40]")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.add_argument(
        "--validate", action="store_true", help="predicted vs measured: 2-rank CPU runs, ZeRO 0/2/3"
    )
    p.add_argument("--steps", type=int, default=3, help="steps per validation run [3]")
    p.add_argument("--stages", default="0,2,3", help="ZeRO stages to validate [0,2,3]")
    p.add_argument("--no-size", action="store_true", help="validate at the recipe's own size (no widening)")
    p.add_argument("--batch", type=int, help="per-rank batch of every corpus [validation: 16]")
    p.add_argument("--measure-worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args, rest = p.parse_known_args(argv)
    bad = [a for a in rest if not a.startswith("--") or "=" not in a]
    if bad:
        p.error(f"unrecognized arguments {bad}; config overrides look like --section.key=value")
    overrides = [a[2:] for a in rest]
    if args.measure_worker:
        measure_worker(args, overrides)
        return 0
    try:
        if args.validate:
            ov = ([] if args.no_size else VALIDATION_SIZE) + overrides
            batch = args.batch or (None if args.no_size else VALIDATION_BATCH)
            v = validate(args.recipe, ov, args.steps, [int(s) for s in args.stages.split(",")], batch)
            print(json.dumps(v, indent=1) if args.json else format_validation(v))
            return 0
        plan = make_plan(
            args.recipe, overrides, args.nodes, args.gpus_per_node, args.gpu, args.mfu, batch=args.batch
        )
    except ValueError as e:
        print(f"plan.py: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(plan_json(plan), indent=1) if args.json else format_plan(plan))
    return 0 if plan.fits else 1


if __name__ == "__main__":
    sys.exit(main())
