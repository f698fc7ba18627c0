#!/usr/bin/env python3
"""Launch helpers for launch/slurm_pretrain.sh and launch/pretrain_local.sh (standard library only).

    python launch/hostfile.py hostnames 'node[01-08]'                 # one host per line
    python launch/hostfile.py hostfile 'node[01-08]' --slots 8 [--out FILE]
    python launch/hostfile.py ds-config --recipe NAME --world-size 64 [--section.key=value ...]
    python launch/hostfile.py node-run -- CMD ... '{node_rank}' ...    # per-node wrapper (srun task)
    python launch/hostfile.py signal --run-dir DIR [--sig USR1]        # stop one run's trainers here

Host lists are expanded with ``scontrol show hostnames`` when SLURM's client is installed and by
:func:`expand_hostlist` (the same syntax: ``a[01-03,7],b[1-2]-c[1-2]``) when it is not.

``node-run`` is the task ``srun`` starts on every node: it runs the per-node DeepSpeed launcher with
SIGUSR1 *ignored* (so the launcher processes, whose default action for SIGUSR1 is to die, survive a
signal meant for the trainers; the trainers install their own handler, mico_ds.train.signals), and on
SIGUSR1 or SIGTERM it sends SIGUSR1 to the trainer processes below it, which then checkpoint at the
next step boundary and exit with code 99.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

NODE_RANK_PLACEHOLDER = "{node_rank}"
RESEND_S = 1.0  # node-run: how often a pending stop is sent (again) to the trainers
# A failing rank writes RUN_DIR/launch/failure.json (mico_ds/train/failfast.py, FAILURE_FILE); the ranks
# still running end themselves within a second, a stopped or hung one cannot: node-run kills what is
# left of its node this long after the notice appeared.
FAILURE_FILE = os.path.join("launch", "failure.json")
FAILURE_GRACE_S = 10.0

# ------------------------------------------------------------------ host lists

_RANGE_RE = re.compile(r"^(\d+)(?:-(\d+))?$")


def _split_top_level(expr: str) -> list[str]:
    """Split on commas outside brackets: 'a[1,2],b' -> ['a[1,2]', 'b']."""
    parts, depth, cur = [], 0, []
    for ch in expr:
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise ValueError(f"host list {expr!r}: unbalanced ']'")
        if ch == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    if depth != 0:
        raise ValueError(f"host list {expr!r}: unbalanced '['")
    parts.append("".join(cur))
    return [p for p in (s.strip() for s in parts) if p]


def _expand_ranges(body: str, expr: str) -> list[str]:
    """'01-03,7' -> ['01', '02', '03', '7']; the width of the lower bound sets zero padding."""
    out = []
    for r in body.split(","):
        m = _RANGE_RE.match(r.strip())
        if not m:
            raise ValueError(f"host list {expr!r}: bad range {r!r} (expected N or N-M)")
        lo, hi = m.group(1), m.group(2) or m.group(1)
        if int(hi) < int(lo):
            raise ValueError(f"host list {expr!r}: range {r!r} runs backwards")
        width = len(lo)
        out += [str(i).zfill(width) for i in range(int(lo), int(hi) + 1)]
    return out


def expand_hostlist(expr: str) -> list[str]:
    """Expand a SLURM host list expression without SLURM.

    Args:
        expr: e.g. ``"node[01-03,07],gpu-[1-2]"``; several bracket groups in one name expand as a
            cartesian product (``"r[1-2]-n[1-2]"`` -> r1-n1, r1-n2, r2-n1, r2-n2).

    Returns:
        Host names in SLURM's order, duplicates kept (scontrol keeps them too).
    """
    hosts: list[str] = []
    for item in _split_top_level(expr):
        pieces = re.split(r"(\[[^\]]*\])", item)
        choices = [_expand_ranges(p[1:-1], expr) if p.startswith("[") else [p] for p in pieces if p]
        hosts += ["".join(c) for c in itertools.product(*choices)]
    return hosts


def hostnames(nodelist: str) -> list[str]:
    """``scontrol show hostnames NODELIST`` when available, else :func:`expand_hostlist`."""
    if shutil.which("scontrol") and os.environ.get("MICO_HOSTLIST_PYTHON") != "1":
        try:
            r = subprocess.run(
                ["scontrol", "show", "hostnames", nodelist],
                capture_output=True,
                text=True,
                timeout=30,
                check=True,
            )
            hosts = r.stdout.split()
            if hosts:
                return hosts
        except (subprocess.SubprocessError, OSError):
            pass  # a client without a reachable config can still fail here: expand it ourselves
    return expand_hostlist(nodelist)


def hostfile_text(hosts: list[str], slots: int) -> str:
    """DeepSpeed/MPI hostfile: one ``host slots=N`` line per node."""
    if slots < 1:
        raise ValueError(f"slots per node must be >= 1, got {slots}")
    if len(set(hosts)) != len(hosts):
        raise ValueError(f"host list has duplicates: {hosts}")
    return "".join(f"{h} slots={slots}\n" for h in hosts)


# ------------------------------------------------------------------ DeepSpeed JSON for a dry run


def resolved_ds_config(recipe: str, world_size: int, overrides: list[str]) -> dict:
    """The DeepSpeed JSON the trainer would use for ``recipe`` at ``world_size`` ranks."""
    from mico_ds.config import load_config
    from mico_ds.distributed.ds_config import resolve_ds_config

    cfg = load_config(recipe, [o for o in overrides if o.startswith("--") and "=" in o])
    return resolve_ds_config(cfg, world_size)


# ------------------------------------------------------------------ processes


def _cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [a.decode(errors="replace") for a in raw.split(b"\0") if a]


def _ppid(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # the command name (field 2) may contain spaces and parentheses: split after the last ')'
    return int(stat.rsplit(")", 1)[1].split()[1])


def catches(pid: int, sig: int) -> bool:
    """Whether ``pid`` has a handler installed for ``sig`` (the SigCgt mask of /proc/PID/status)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("SigCgt:"):
                return bool(int(line.split()[1], 16) >> (sig - 1) & 1)
    except (OSError, ValueError, IndexError):
        pass
    return False


def _pids() -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit()]


def trainer_module() -> str:
    return os.environ.get("MICO_TRAIN_MODULE", "mico_ds.train")


def is_trainer(argv: list[str]) -> bool:
    """A training rank: ``python [-u] -m mico_ds.train ...`` (not the launchers that mention it)."""
    mod = trainer_module()
    return any(a == "-m" and b == mod for a, b in itertools.pairwise(argv))


def run_dir_of(argv: list[str]) -> str | None:
    for i, a in enumerate(argv):
        if a == "--run-dir" and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith("--run-dir="):
            return a.split("=", 1)[1]
    return None


def descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for pid in _pids():
        pp = _ppid(pid)
        if pp is not None:
            children.setdefault(pp, []).append(pid)
    out, todo = [], [root]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def is_node_run(argv: list[str]) -> bool:
    """A ``launch/hostfile.py node-run`` wrapper."""
    return any(a.endswith("hostfile.py") and b == "node-run" for a, b in itertools.pairwise(argv))


def find_trainers(root: int | None = None, run_dir: str | None = None, wrappers: bool = False) -> list[int]:
    """Trainer pids of this user: below ``root`` if given, and/or training into ``run_dir``.

    With ``wrappers`` the node-run wrappers of ``run_dir`` are included too.
    Data-loader workers (forked children of a trainer, with the same command line) are left out:
    the trainer alone acts on a stop request.
    """
    cands = descendants(root) if root is not None else _pids()
    want = os.path.realpath(run_dir) if run_dir else None
    uid = os.getuid()
    out = []
    for pid in cands:
        argv = _cmdline(pid)
        if not (is_trainer(argv) or (wrappers and is_node_run(argv))):
            continue
        parent = _ppid(pid)
        if parent is not None and is_trainer(_cmdline(parent)):
            continue
        try:
            if os.stat(f"/proc/{pid}").st_uid != uid:
                continue
            cwd = os.readlink(f"/proc/{pid}/cwd")
        except OSError:
            continue
        if want is not None:
            rd = run_dir_of(argv)
            if rd is None or os.path.realpath(os.path.join(cwd, rd)) != want:
                continue
        out.append(pid)
    return out


def send(pids: list[int], sig: int) -> list[int]:
    sent = []
    for pid in pids:
        try:
            os.kill(pid, sig)
            sent.append(pid)
        except ProcessLookupError:
            pass
    return sent


def _log(msg: str) -> None:
    host = os.uname().nodename.split(".")[0]
    print(f"[{time.strftime('%H:%M:%S')} {host} mico-launch] {msg}", file=sys.stderr, flush=True)


def node_run(cmd: list[str], new_session: bool = False) -> int:
    """Run ``cmd`` (the per-node launcher) with SIGUSR1 ignored; forward USR1/TERM to its trainers.

    ``{node_rank}`` in ``cmd`` becomes $SLURM_NODEID (else $NODE_RANK, else 0). With ``new_session``
    the wrapper first leaves the terminal's process group (os.setsid), so a Ctrl-C reaches only the
    calling script, which then asks for a clean stop. Returns the launcher's exit code (128 + signal
    number when it was killed by a signal).
    """
    if not cmd:
        raise ValueError("node-run: no command given")
    if new_session:
        os.setsid()
    rank = os.environ.get("SLURM_NODEID", os.environ.get("NODE_RANK", "0"))
    cmd = [rank if a == NODE_RANK_PLACEHOLDER else a for a in cmd]
    # Ignored dispositions survive exec: the launchers inherit SIG_IGN, the trainers replace it.
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    proc = subprocess.Popen(cmd)
    stop: list[str] = []

    def on_signal(signum: int, frame: object) -> None:
        stop.append(signal.Signals(signum).name)

    signal.signal(signal.SIGUSR1, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    told: set[int] = set()  # trainers that got SIGUSR1 while their handler was installed
    logged: set[int] = set()
    run_dir = run_dir_of(cmd)
    failure = os.path.join(run_dir, FAILURE_FILE) if run_dir else None
    started, failed_at = time.time(), None
    while True:
        try:
            rc = proc.wait(timeout=RESEND_S)
            break
        except subprocess.TimeoutExpired:
            pass
        if failure is not None and failed_at is None and _newer_than(failure, started):
            failed_at = time.monotonic()
        if failed_at is not None and time.monotonic() - failed_at >= FAILURE_GRACE_S:
            stuck = find_trainers(root=proc.pid)
            workers = [d for p in stuck for d in descendants(p)]  # before their parents are gone
            left = send(stuck, signal.SIGKILL)
            send(workers, signal.SIGKILL)
            if left:
                _log(
                    f"node {rank}: a rank failed ({_first_line(failure)}); killed the trainers still "
                    f"running here {FAILURE_GRACE_S:.0f} s later (stopped or hung): {sorted(left)}"
                )
            failed_at = float("inf")  # once
        if stop:
            # A trainer still starting up ignores SIGUSR1 (inherited SIG_IGN) until it installs its
            # handler, and a trainer may not exist yet: those get it again at the next round. A trainer
            # that caught it is told once; a second signal could reach it while it exits.
            pending = [p for p in find_trainers(root=proc.pid) if p not in told]
            ready = {p for p in pending if catches(p, signal.SIGUSR1)}
            pids = send(pending, signal.SIGUSR1)
            if set(pids) - logged:
                _log(f"node {rank}: {stop[0]} received; sent SIGUSR1 to trainers {sorted(pids)}")
                logged.update(pids)
            told.update(ready & set(pids))
    return 128 - rc if rc < 0 else rc


def _newer_than(path: str, t: float) -> bool:
    """``path`` exists and was written after ``t`` (a notice of an earlier launch is history)."""
    try:
        return os.stat(path).st_mtime >= t - 1.0
    except OSError:
        return False


def _first_line(path: str | None) -> str:
    try:
        rec = json.loads(Path(path).read_text()) if path else {}
        return f"rank {rec['rank']} on {rec['host']}: {rec['error']}"
    except (OSError, ValueError, KeyError):
        return "see the log"


# ------------------------------------------------------------------ CLI


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="launch/hostfile.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = p.add_subparsers(dest="cmd", required=True)
    h = sub.add_parser("hostnames", help="expand a SLURM host list, one host per line")
    h.add_argument("nodelist")
    f = sub.add_parser("hostfile", help="write/print a DeepSpeed hostfile")
    f.add_argument("nodelist")
    f.add_argument("--slots", type=int, required=True, help="ranks (GPUs or CPU ranks) per node")
    f.add_argument("--out", default=None, help="file to write (default: print)")
    d = sub.add_parser("ds-config", help="print the resolved DeepSpeed JSON of a recipe")
    d.add_argument("--recipe", required=True)
    d.add_argument("--world-size", type=int, required=True)
    n = sub.add_parser("node-run", help="per-node wrapper run by srun")
    n.add_argument("--setsid", action="store_true", help="start a new session (local launches)")
    n.add_argument("command", nargs=argparse.REMAINDER)
    s = sub.add_parser("signal", help="signal this user's trainers (and node-run wrappers) of one run here")
    s.add_argument("--run-dir", required=True)
    s.add_argument("--sig", default="USR1", help="signal name (default USR1)")
    args, rest = p.parse_known_args(argv)

    if args.cmd != "ds-config" and rest:
        p.error(f"unrecognized arguments: {rest}")
    if args.cmd == "hostnames":
        print("\n".join(hostnames(args.nodelist)))
    elif args.cmd == "hostfile":
        text = hostfile_text(hostnames(args.nodelist), args.slots)
        if args.out:
            tmp = Path(f"{args.out}.{os.getpid()}.tmp")
            tmp.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(text)
            os.replace(tmp, args.out)
        else:
            sys.stdout.write(text)
    elif args.cmd == "ds-config":
        print(json.dumps(resolved_ds_config(args.recipe, args.world_size, rest), indent=2, sort_keys=True))
    elif args.cmd == "node-run":
        cmd = args.command[1:] if args.command[:1] == ["--"] else args.command
        return node_run(cmd, new_session=args.setsid)
    elif args.cmd == "signal":
        # The node-run wrappers keep re-sending to trainers that are still starting up; trainers
        # without a wrapper (LAUNCHER=pdsh starts them over ssh) get it directly.
        sig = signal.Signals[f"SIG{args.sig.upper().removeprefix('SIG')}"]
        pids = send(find_trainers(run_dir=args.run_dir, wrappers=True), sig)
        _log(f"sent {sig.name} to {pids} (trainers and node-run wrappers of {args.run_dir})")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except ValueError as e:
        print(f"launch/hostfile.py: error: {e}", file=sys.stderr)
        sys.exit(2)
