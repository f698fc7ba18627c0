#!/bin/bash
# MiCo pretraining on one machine (no SLURM): one DeepSpeed launcher, G GPUs or N CPU ranks.
#
#   launch/pretrain_local.sh --recipe NAME --run-dir DIR [--section.key=value ...]
#   GPUS=4 launch/pretrain_local.sh --recipe NAME --run-dir DIR
#   CPU_RANKS=2 launch/pretrain_local.sh --recipe debug --run-dir runs/debug
#   RESTART_ON_PREEMPT=1 launch/pretrain_local.sh --recipe NAME --run-dir DIR --train.max_minutes=60
#   launch/pretrain_local.sh --dry-run --recipe debug --run-dir runs/debug     # print, launch nothing
#
# Every option and environment variable is described by --help and in docs/operations.md.
set -euo pipefail

usage() {
    cat <<'EOF'
usage: launch/pretrain_local.sh [--dry-run] [--] --run-dir DIR [TRAIN ARGS...]
       launch/pretrain_local.sh --help

Runs `python -m mico_ds.train TRAIN ARGS...` on this machine under the DeepSpeed launcher, one rank
per GPU (or CPU_RANKS gloo ranks). When DIR/checkpoints/latest exists, `--resume latest` is added
(unless TRAIN ARGS name --resume).

Stopping: `kill -USR1 <pid of this script>`, `kill <pid>` or Ctrl-C ask every rank to save a checkpoint
at its next step boundary; the ranks then exit with code 99 and so does this script. A second Ctrl-C
(or SIGTERM) kills the ranks without saving.

Options (before TRAIN ARGS):
  --dry-run    print the launch command and the resolved DeepSpeed JSON, then exit
  -h, --help   this text
  --           end of this script's options

Environment (defaults in brackets):
  GPUS                GPU ranks [`nvidia-smi -L` lines; when there is no GPU: CPU ranks, see CPU_RANKS]
  CPU_RANKS           if set, or when no GPU is found: CPU ranks (gloo) [2]
  MASTER_ADDR         rendezvous address [127.0.0.1]
  MASTER_PORT         rendezvous port [a free port]
  PYTHON              interpreter [python3]
  MICO_TRAIN_MODULE   the Python module every rank runs [mico_ds.train]
  DS_ARGS             extra DeepSpeed launcher options (word-split), e.g. --bind_cores_to_rank [none]
  RESTART_ON_PREEMPT  1: when the ranks exit with 99 on their own (train.max_minutes, or a SIGUSR1 sent
                      to them directly), start again with --resume latest; a stop asked of this script
                      is never restarted [0]
  MAX_RESTARTS        restarts allowed with RESTART_ON_PREEMPT=1 [50]

Exit codes: the trainer's (0 done, 99 checkpoint saved after a stop, other = failure); 2 usage error.
EOF
}

ROOT=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck source=launch/lib.sh
source "$ROOT/launch/lib.sh"
parse_launch_options "$@"

PYTHON=${PYTHON:-python3}
TRAIN_MODULE=${MICO_TRAIN_MODULE:-mico_ds.train}
RESTART_ON_PREEMPT=${RESTART_ON_PREEMPT:-0}
MAX_RESTARTS=${MAX_RESTARTS:-50}
HELPER=$ROOT/launch/hostfile.py
[[ -f $HELPER ]] || die "cannot find launch/hostfile.py next to $0"
if [[ -d $ROOT/mico_ds ]]; then # a checkout: its package first (else the installed one)
    export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}
fi

RECIPE=$(arg_value recipe ${TRAIN_ARGS[@]+"${TRAIN_ARGS[@]}"})
RECIPE=${RECIPE:-demo}
RUN_DIR=$(arg_value run-dir ${TRAIN_ARGS[@]+"${TRAIN_ARGS[@]}"})
[[ -n $RUN_DIR ]] || die "pass --run-dir DIR: the directory a restart resumes from"
USER_RESUME=$(arg_value resume ${TRAIN_ARGS[@]+"${TRAIN_ARGS[@]}"})

if [[ -n ${CPU_RANKS:-} ]]; then
    NPROC=$CPU_RANKS DEVICE="CPU ranks"
elif [[ -n ${GPUS:-} ]]; then
    NPROC=$GPUS DEVICE="GPUs"
elif (($(nvidia_gpus) > 0)); then
    NPROC=$(nvidia_gpus) DEVICE="GPUs"
else
    NPROC=2 DEVICE="CPU ranks"
fi
if ! [[ $NPROC =~ ^[0-9]+$ ]] || ((NPROC < 1)); then
    die "the number of ranks must be a positive integer, got '$NPROC' ($DEVICE)"
fi
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("", 0)); print(s.getsockname()[1])')}

# shellcheck disable=SC2206  # DS_ARGS is deliberately word-split
DS=("$PYTHON" -u -m deepspeed.launcher.runner --hostfile /dev/null --num_gpus "$NPROC" --master_addr "$MASTER_ADDR"
    --master_port "$MASTER_PORT" --no_local_rank ${DS_ARGS:-} --module "$TRAIN_MODULE")

build_args() { # ARGS for attempt $1: a restart always resumes from latest
    local attempt=$1
    if ((attempt > 0)); then
        without_resume ${TRAIN_ARGS[@]+"${TRAIN_ARGS[@]}"}
        ARGS=(${BASE_ARGS[@]+"${BASE_ARGS[@]}"})
        RESUME=""
    else
        ARGS=(${TRAIN_ARGS[@]+"${TRAIN_ARGS[@]}"})
        RESUME=$USER_RESUME
    fi
    if [[ -z $RESUME && -f $RUN_DIR/checkpoints/latest ]]; then
        log "resuming from $RUN_DIR/checkpoints/$(cat "$RUN_DIR/checkpoints/latest") (adding --resume latest)"
        ARGS+=(--resume latest)
    fi
}
if ((DRY_RUN)); then
    build_args 0
    echo "== launch ($NPROC $DEVICE, rendezvous $MASTER_ADDR:$MASTER_PORT) =="
    quoted "$PYTHON" -u "$HELPER" node-run --setsid -- "${DS[@]}" ${ARGS[@]+"${ARGS[@]}"}
    echo
    echo "== deepspeed config (recipe $RECIPE, world size $NPROC) =="
    print_ds_config "$HELPER" "$PYTHON" "$RECIPE" "$NPROC" ${ARGS[@]+"${ARGS[@]}"}
    exit 0
fi

export MASTER_ADDR MASTER_PORT
STOP_ASKED=""
PID=""
# shellcheck disable=SC2317  # run from traps
on_signal() {
    if [[ -n $STOP_ASKED && $1 != USR1 && -n $PID ]]; then
        log "received SIG$1 again: killing the ranks (no checkpoint)"
        kill -KILL -- "-$PID" 2>/dev/null || true
        return
    fi
    STOP_ASKED=$1
    log "received SIG$1: asking the ranks to save a checkpoint and stop"
    [[ -z $PID ]] || kill -USR1 "$PID" 2>/dev/null || true
}
trap 'on_signal USR1' USR1
trap 'on_signal TERM' TERM
trap 'on_signal INT' INT

attempt=0
while :; do
    build_args "$attempt"
    CMD=("$PYTHON" -u "$HELPER" node-run --setsid -- "${DS[@]}" ${ARGS[@]+"${ARGS[@]}"})
    log "attempt $attempt: $NPROC $DEVICE, rendezvous $MASTER_ADDR:$MASTER_PORT, run dir $RUN_DIR"
    log "launch: $(quoted "${CMD[@]}")"
    # In the background (its own session) so the traps run while it trains and a terminal Ctrl-C
    # reaches only this script, which asks for a clean stop.
    "${CMD[@]}" &
    PID=$!
    wait_launch "$PID"
    rc=$LAUNCH_RC
    PID=""
    if ((rc != 99)); then
        log "ranks exited with code $rc"
        exit "$rc"
    fi
    if [[ -n $STOP_ASKED ]] || ((!RESTART_ON_PREEMPT)); then
        log "exit code 99: checkpoint $(cat "$RUN_DIR/checkpoints/latest" 2>/dev/null || echo "?") saved; stopping"
        exit 99
    fi
    if ((attempt >= MAX_RESTARTS)); then
        log "exit code 99: MAX_RESTARTS=$MAX_RESTARTS reached; stopping"
        exit 99
    fi
    attempt=$((attempt + 1))
    log "exit code 99: checkpoint saved; restarting (RESTART_ON_PREEMPT=1, restart $attempt of at most $MAX_RESTARTS)"
done
