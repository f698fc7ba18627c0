"""Pretrain a MiCo model with DeepSpeed.

    # demo: generates the demo corpus if needed and launches 2 CPU ranks itself
    python -m mico_ds.train --recipe demo

    # one node, G processes (GPUs, or CPU ranks with gloo)
    deepspeed --num_gpus G --module mico_ds.train --recipe NAME --run-dir DIR [--section.key=value ...]

    # N nodes (see launch/slurm_pretrain.sh, which writes the hostfile and starts one launcher per node)
    deepspeed --hostfile HOSTS --no_ssh --node_rank R --master_addr A --master_port P \
        --module mico_ds.train --recipe NAME --run-dir DIR --resume latest

    # torchrun-style environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) works too.

Overrides are dotted config keys (``--optim.lr=3e-4 --train.max_steps=100``); ``--help-config`` lists
them all with their documentation.
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
import time
import traceback
import warnings
from pathlib import Path

import yaml

from mico_ds.config import help_text, list_recipes, load_config, parse_args_and_overrides, to_dict
from mico_ds.distributed.launch import deepspeed_command, exit_now, launched


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(
        prog="python -m mico_ds.train",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--recipe", default="demo", help=f"recipe name or YAML path; one of {list_recipes()}")
    p.add_argument("--run-dir", default=None, help="run directory (default: runs/<recipe>-<timestamp>)")
    p.add_argument("--resume", default=None, help="'latest' or a checkpoint tag (stepNNNNNNNN) in RUN_DIR")
    p.add_argument(
        "--init",
        default=None,
        metavar="PATH",
        help="start from these weights only (fresh optimizer, schedule and data): a mico_ds run dir, "
        "checkpoint dir (any ZeRO stage, universal too), consolidated weights from tools/zero_to_fp32.py, "
        "or its exported branches; sets model.init. A --resume of this run ignores it",
    )
    p.add_argument(
        "--allow-config-change",
        action="store_true",
        help="resume even if seed/batch/world size changed (sample order not exact; warns)",
    )
    p.add_argument(
        "--nproc",
        type=int,
        default=None,
        help="when not started by a launcher: processes to start under DeepSpeed's launcher "
        "(default: the recipe's launch.nproc, else 1)",
    )
    p.add_argument("--help-config", action="store_true", help="list every config key and exit")
    p.add_argument(
        "--print-config",
        action="store_true",
        help="print the config the recipe and overrides resolve to, and exit",
    )
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # set by deepspeed
    return parse_args_and_overrides(p, argv)


def self_launch(args: argparse.Namespace, overrides: list[str], nproc: int) -> int:
    """Re-run this command under DeepSpeed's launcher (with this interpreter) on ``nproc`` local ranks."""
    train_args = ["--recipe", args.recipe, "--run-dir", args.run_dir]
    if args.resume:
        train_args += ["--resume", args.resume]
    if args.allow_config_change:
        train_args.append("--allow-config-change")
    cmd = deepspeed_command(nproc, "mico_ds.train", [*train_args, *overrides])
    print("launching:", " ".join(cmd), flush=True)
    env = dict(os.environ, MICO_SELF_LAUNCHED="1")
    return subprocess.call(cmd, env=env)


def main(argv: list[str] | None = None) -> int:
    args, overrides = parse_args(sys.argv[1:] if argv is None else argv)
    if args.help_config:
        print(help_text())
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # DeepSpeed 0.19 still calls the collectives torch 2.14 renamed; one warning per call floods the log.
    warnings.filterwarnings(
        "ignore", r"`torch\.distributed\.\w+` is deprecated", FutureWarning, r"torch\.distributed"
    )
    if args.init is not None:
        overrides = [*overrides, f"--model.init={args.init}"]
    cfg = load_config(args.recipe, overrides)
    if args.print_config:
        print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")
        return 0
    if args.run_dir is None:
        args.run_dir = str(Path("runs") / f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}")
    nproc = args.nproc or int(cfg.launch.get("nproc", 1))
    if not launched() and nproc > 1:
        return self_launch(args, overrides, nproc)
    from mico_ds.train.loop import Trainer

    trainer = Trainer(
        cfg, Path(args.run_dir), resume=args.resume, allow_config_change=args.allow_config_change
    )
    try:
        code = trainer.fit()
    except Exception as e:
        trainer.report_failure(e)  # names this rank and any peer it sees dead, before the traceback
        if trainer.world > 1:
            # Leave now: a normal exit can hang joining data workers, and while this process lives its
            # peers wait for it in their collectives (train/failfast.py).
            traceback.print_exc()
            exit_now(1)
        trainer.close()
        raise
    trainer.close()
    # Shut the process groups down while every rank is still here; after a failure they are left
    # alone (the exit code already says what happened).
    from mico_ds import distributed as mdist

    mdist.destroy()
    return code


if __name__ == "__main__":
    # Everything is written and closed when main returns; leave without the interpreter's teardown,
    # which can abort a finished distributed run (distributed/launch.py, exit_now).
    exit_now(main())
