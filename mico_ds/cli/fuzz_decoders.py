"""Fuzz the sample decoders for a given time: real members of every modality and whole shard tars,
mutated with a seeded generator (``mico_ds.data.fuzz``); prints inputs tried per kind, skips by
reason, crashes (with the ops that reproduce them) and peak memory, optionally as JSON.

    python tools/fuzz_decoders.py --seconds 300 --json fuzz.json
    python tools/fuzz_decoders.py --examples 2000 --kinds video_mp4,shard --seed 3

Exit status 1 when an input crashed a decoder (docs/operations.md, "Bounded decoding and fuzzing").
The caps are ``data.limits``' defaults unless ``--data.limits.KEY=VALUE`` options say otherwise.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import platform
import sys
from pathlib import Path

from mico_ds.cli.common import fail
from mico_ds.config import DecodeLimits, apply_overrides, config_from_dict, parse_args_and_overrides


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, DecodeLimits]:
    p = argparse.ArgumentParser(prog="fuzz_decoders", description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=None, help="stop after this long (default 60 s)")
    p.add_argument("--examples", type=int, default=None, help="stop after this many inputs")
    p.add_argument("--seed", type=int, default=0, help="seed of the mutations (a run is reproducible)")
    p.add_argument("--kinds", default="", help="comma-separated seed kinds (default all; --list-kinds)")
    p.add_argument("--list-kinds", action="store_true", help="print the seed kinds and exit")
    p.add_argument("--json", type=Path, default=None, help="also write the report here")
    p.add_argument("--verbose", action="store_true", help="log every decode_error with its traceback")
    args, overrides = parse_args_and_overrides(p, sys.argv[1:] if argv is None else argv)
    bad = [o for o in overrides if not o.startswith("--data.limits.")]
    if bad:
        p.error(f"unknown options {bad} (caps: --data.limits.KEY=VALUE)")
    try:  # typed and checked as a run's config is
        limits = config_from_dict(apply_overrides({}, overrides)).data.limits
    except ValueError as e:
        p.error(str(e))
    if args.seconds is None and args.examples is None:
        args.seconds = 60.0
    return args, limits


def main(argv: list[str] | None = None) -> int:
    args, limits = parse_args(argv)
    from mico_ds.data import fuzz  # after argument parsing: --help stays fast

    if args.list_kinds:
        print("\n".join(fuzz.seeds()))
        return 0
    # A worker logs its first decode_error skips with tracebacks; here only the counts matter.
    logging.basicConfig(level=logging.WARNING if args.verbose else logging.ERROR)
    kinds = [k for k in args.kinds.split(",") if k] or None
    try:
        report = fuzz.run_fuzz(args.seconds, args.examples, args.seed, kinds, limits)
    except ValueError as e:
        return fail("fuzz_decoders", e)
    out = report.as_dict()
    out["limits"] = dataclasses.asdict(limits)
    out["machine"] = f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}"
    print(f"{out['inputs_tried']} inputs tried in {out['seconds']} s (seed {args.seed}); "
          f"{out['crashes']} crashes; peak RSS {out['peak_rss_mib']} MiB, one input at most "
          f"+{out['max_input_rss_growth_mib']} MiB; slowest input {out['slowest_input_s']} s")  # fmt: skip
    print("  inputs  decoded  kind")
    for kind, n in out["inputs"].items():
        print(f"  {n:>6}  {out['decoded'].get(kind, 0):>7}  {kind}")
    print("  skips by reason: " + ", ".join(f"{r} {n}" for r, n in out["skips"].items()))
    for ex in out["crash_examples"]:
        print(
            f"  CRASH {ex['kind']} train={ex['train']} ops={ex['ops']}: {ex['error']}\n    at {ex['where']}"
        )
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=1) + "\n")
    return 1 if out["crashes"] else 0
