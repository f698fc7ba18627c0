#!/bin/bash
#SBATCH --job-name=mico_ds
#SBATCH --ntasks-per-node=1
#SBATCH --signal=B:USR1@300
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out
# MiCo pretraining under SLURM: N nodes x G GPUs, one DeepSpeed launcher per node, preemption-safe.
#
#   sbatch -N 8 --gpus-per-node 8 launch/slurm_pretrain.sh --recipe NAME --run-dir DIR [--section.key=value ...]
#   launch/slurm_pretrain.sh --help
#   SLURM_JOB_NODELIST='node[01-08]' SLURM_NNODES=8 SLURM_JOB_ID=1 GPUS_PER_NODE=8 \
#       launch/slurm_pretrain.sh --dry-run --recipe debug --run-dir runs/x     # print, launch nothing
#
# Every option and environment variable is described by --help and in docs/operations.md.
set -euo pipefail

usage() {
    cat <<'EOF'
usage: sbatch [SBATCH OPTIONS] launch/slurm_pretrain.sh [--dry-run] [--] TRAIN ARGS...
       launch/slurm_pretrain.sh --help

Starts `python -m mico_ds.train TRAIN ARGS...` on every rank of a SLURM allocation: writes a DeepSpeed
hostfile from SLURM_JOB_NODELIST (`scontrol show hostnames`, slots = ranks per node), then starts ONE
DeepSpeed launcher per node with `srun ... deepspeed --no_ssh --node_rank $SLURM_NODEID` (or a single
pdsh launcher with LAUNCHER=pdsh). TRAIN ARGS are the trainer's: --recipe NAME --run-dir DIR
[--resume latest|TAG] [--section.key=value ...].

Preemption and requeue: SLURM sends SIGUSR1 to this script (#SBATCH --signal=B:USR1@300, i.e. 300 s
before the time limit; `scancel --signal=USR1 --batch JOBID` does the same by hand). The script passes
SIGUSR1 on to the training processes, which save a checkpoint at the next step boundary and exit with
code 99; the script then runs `scontrol requeue $SLURM_JOB_ID`. When the job starts again and
RUN_DIR/checkpoints/latest exists, `--resume latest` is added (unless TRAIN ARGS name --resume).

Options (before TRAIN ARGS):
  --dry-run    print the hostfile, the launch commands (one per node) and the resolved DeepSpeed JSON
               for the recipe at world size NNODES x SLOTS, then exit. Needs no allocation: a fake
               SLURM_JOB_NODELIST / SLURM_NNODES / SLURM_JOB_ID environment is enough.
  -h, --help   this text.
  --           end of this script's options (everything after it goes to mico_ds.train).

Environment (defaults in brackets):
  GPUS_PER_NODE       ranks per node on GPU nodes [SLURM_GPUS_ON_NODE, else the count in
                      SLURM_GPUS_PER_NODE, else `nvidia-smi -L` lines, else 1]
  CPU_RANKS_PER_NODE  if set: CPU ranks (gloo) per node instead of GPUs (CPU-only clusters, tests)
  LAUNCHER            srun: one `deepspeed --no_ssh --node_rank K` per node through srun [srun]
                      pdsh: one `deepspeed --launcher pdsh` on the first node (needs ssh between nodes)
  MASTER_ADDR         rendezvous host [first host of the allocation]
  MASTER_PORT         rendezvous port [20000 + SLURM_JOB_ID % 20000]
  PYTHON              interpreter for the launcher and the ranks [python3]
  MICO_TRAIN_MODULE   the Python module every rank runs [mico_ds.train]
  MICO_ROOT           the mico_ds checkout [found from the script path, SLURM_SUBMIT_DIR or the job's
                      command]; put on PYTHONPATH
  HOSTFILE            where the hostfile is written [RUN_DIR/launch/hostfile.JOBID]; must be visible
                      from every node with LAUNCHER=srun (the run directory must be shared anyway)
  FORWARD_ENV         variable-name prefixes forwarded to the ranks with LAUNCHER=pdsh
                      [NCCL_ MICO_ PYTHONPATH CUDA_ TORCH_ OMP_ HF_ TRANSFORMERS_ TRITON_ GLOO_ FI_
                      UCX_ LD_LIBRARY_PATH PATH]; with srun every variable is inherited (--export=ALL)
  SRUN_ARGS           extra srun options (word-split) [none]
  DS_ARGS             extra DeepSpeed launcher options (word-split), e.g. --bind_cores_to_rank [none]
  REQUEUE_ON_PREEMPT  1: `scontrol requeue` after exit code 99; 0: exit 99 instead [1]
  REQUEUE_ON_TERM     1: requeue also when the stop came from SIGTERM (scancel, SLURM's own
                      preemption or time-out, which end or requeue the job themselves) [0]
  MAX_RESTARTS        stop requeueing once SLURM_RESTART_COUNT reaches this [50]

Exit codes: the trainer's (0 done, 99 checkpoint saved and not requeued, other = failure); 2 for a
usage error.
EOF
}

# ------------------------------------------------------------------ the checkout, the options
# Under sbatch $0 is a copy in slurmd's spool directory, so the checkout is looked for elsewhere too.
find_root() {
    local c cmd
    for c in "${MICO_ROOT:-}" "$(dirname "$0")/.." "${SLURM_SUBMIT_DIR:-}" "$PWD" job-command; do
        if [[ $c == job-command && -n ${SLURM_JOB_ID:-} ]] && command -v scontrol >/dev/null; then
            cmd=$(scontrol show job "$SLURM_JOB_ID" 2>/dev/null | grep -o 'Command=[^ ]*' | head -n1 || true)
            cmd=${cmd#Command=}
            c=${cmd:+$(dirname "$cmd")/..}
        fi
        if [[ -n $c && -f $c/launch/hostfile.py && -d $c/mico_ds ]]; then
            (cd "$c" && pwd)
            return 0
        fi
    done
    return 1
}
if ! ROOT=$(find_root); then
    echo "slurm_pretrain.sh: error: cannot find the mico_ds checkout (launch/hostfile.py): set MICO_ROOT" >&2
    exit 2
fi
# shellcheck source=launch/lib.sh
source "$ROOT/launch/lib.sh"
parse_launch_options "$@"

PYTHON=${PYTHON:-python3}
LAUNCHER=${LAUNCHER:-srun}
REQUEUE_ON_PREEMPT=${REQUEUE_ON_PREEMPT:-1}
REQUEUE_ON_TERM=${REQUEUE_ON_TERM:-0}
MAX_RESTARTS=${MAX_RESTARTS:-50}
FORWARD_ENV=${FORWARD_ENV:-NCCL_ MICO_ PYTHONPATH CUDA_ TORCH_ OMP_ HF_ TRANSFORMERS_ TRITON_ GLOO_ FI_ UCX_ LD_LIBRARY_PATH PATH}
TRAIN_MODULE=${MICO_TRAIN_MODULE:-mico_ds.train}
JOB_ID=${SLURM_JOB_ID:-0}

[[ $LAUNCHER == srun || $LAUNCHER == pdsh ]] || die "LAUNCHER must be srun or pdsh, got '$LAUNCHER'"
HELPER=$ROOT/launch/hostfile.py
export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}

# ------------------------------------------------------------------ trainer arguments
RECIPE=$(arg_value recipe ${TRAIN_ARGS[@]+"${TRAIN_ARGS[@]}"})
RECIPE=${RECIPE:-demo} # the trainer's default
RUN_DIR=$(arg_value run-dir ${TRAIN_ARGS[@]+"${TRAIN_ARGS[@]}"})
if [[ -z $RUN_DIR ]]; then
    # A fixed directory per job id: a requeued job (same id) finds its own checkpoints.
    base=$(basename "$RECIPE")
    RUN_DIR=runs/${base%.yaml}-$JOB_ID
    TRAIN_ARGS+=(--run-dir "$RUN_DIR")
fi
RUN_DIR_ABS=$(realpath -m -- "$RUN_DIR")
RESUME=$(arg_value resume ${TRAIN_ARGS[@]+"${TRAIN_ARGS[@]}"})
if [[ -z $RESUME && -f $RUN_DIR/checkpoints/latest ]]; then
    log "resuming from $RUN_DIR/checkpoints/$(cat "$RUN_DIR/checkpoints/latest") (adding --resume latest)"
    TRAIN_ARGS+=(--resume latest)
fi

# ------------------------------------------------------------------ nodes, ranks, rendezvous
NODELIST=${SLURM_JOB_NODELIST:-${SLURM_NODELIST:-}}
if [[ -z $NODELIST ]]; then
    ((DRY_RUN)) || die "not inside a SLURM allocation (no SLURM_JOB_NODELIST): submit with sbatch, or use launch/pretrain_local.sh"
    NODELIST=$(hostname -s)
fi
HOSTS_TEXT=$("$PYTHON" "$HELPER" hostnames "$NODELIST") || die "cannot expand SLURM_JOB_NODELIST='$NODELIST'"
mapfile -t HOSTS <<<"$HOSTS_TEXT"
NNODES=${#HOSTS[@]}
if [[ -n ${SLURM_NNODES:-} && $SLURM_NNODES != "$NNODES" ]]; then
    die "SLURM_NNODES=$SLURM_NNODES but SLURM_JOB_NODELIST='$NODELIST' names $NNODES hosts"
fi

detect_gpus() {
    local n
    if [[ -n ${SLURM_GPUS_ON_NODE:-} ]]; then
        echo "$SLURM_GPUS_ON_NODE"
    elif [[ -n ${SLURM_GPUS_PER_NODE:-} ]]; then
        echo "${SLURM_GPUS_PER_NODE##*:}" # "a100:8" -> 8
    elif n=$(nvidia_gpus) && ((n > 0)); then
        echo "$n"
    else
        echo 1
    fi
}
if [[ -n ${CPU_RANKS_PER_NODE:-} ]]; then
    SLOTS=$CPU_RANKS_PER_NODE
    DEVICE="CPU ranks"
else
    GPUS_PER_NODE=${GPUS_PER_NODE:-$(detect_gpus)}
    SLOTS=$GPUS_PER_NODE
    DEVICE="GPUs"
fi
if ! is_uint "$SLOTS" || ((SLOTS < 1)); then
    die "ranks per node must be a positive integer, got '$SLOTS' ($DEVICE)"
fi
WORLD_SIZE=$((NNODES * SLOTS))
MASTER_ADDR=${MASTER_ADDR:-${HOSTS[0]}}
MASTER_PORT=${MASTER_PORT:-$((20000 + JOB_ID % 20000))}
HOSTFILE=${HOSTFILE:-$RUN_DIR_ABS/launch/hostfile.$JOB_ID}
ENV_FILE=$RUN_DIR_ABS/launch/env.$JOB_ID

# ------------------------------------------------------------------ commands
# shellcheck disable=SC2206  # DS_ARGS / SRUN_ARGS are deliberately word-split
DS=("$PYTHON" -u -m deepspeed.launcher.runner --hostfile "$HOSTFILE" --master_addr "$MASTER_ADDR"
    --master_port "$MASTER_PORT" --no_local_rank ${DS_ARGS:-})
if [[ $LAUNCHER == srun ]]; then
    NODE_CMD=("${DS[@]}" --no_ssh --node_rank '{node_rank}' --module "$TRAIN_MODULE" ${TRAIN_ARGS[@]+"${TRAIN_ARGS[@]}"})
    # shellcheck disable=SC2206
    LAUNCH=(srun --nodes="$NNODES" --ntasks="$NNODES" --ntasks-per-node=1 --kill-on-bad-exit=0 --export=ALL
        ${SLURM_CPUS_ON_NODE:+--cpus-per-task="$SLURM_CPUS_ON_NODE"} ${SRUN_ARGS:-}
        "$PYTHON" -u "$HELPER" node-run -- "${NODE_CMD[@]}")
else
    NODE_CMD=("${DS[@]}" --launcher pdsh --module "$TRAIN_MODULE" ${TRAIN_ARGS[@]+"${TRAIN_ARGS[@]}"})
    LAUNCH=("$PYTHON" -u "$HELPER" node-run -- "${NODE_CMD[@]}")
fi

forwarded_env() { # the NAME=VALUE lines LAUNCHER=pdsh writes to DS_ENV_FILE
    local name prefix
    while IFS= read -r name; do
        for prefix in $FORWARD_ENV; do
            if [[ $name == "$prefix"* ]]; then
                printf '%s=%s\n' "$name" "${!name}"
                break
            fi
        done
    done < <(compgen -e | sort)
}

if ((DRY_RUN)); then
    echo "== hostfile $HOSTFILE ($NNODES nodes x $SLOTS $DEVICE = world size $WORLD_SIZE) =="
    "$PYTHON" "$HELPER" hostfile "$NODELIST" --slots "$SLOTS"
    echo "== rendezvous =="
    echo "MASTER_ADDR=$MASTER_ADDR MASTER_PORT=$MASTER_PORT LAUNCHER=$LAUNCHER RUN_DIR=$RUN_DIR_ABS"
    echo "== launch (in the batch script) =="
    quoted "${LAUNCH[@]}"
    echo
    echo "== per-node commands =="
    if [[ $LAUNCHER == srun ]]; then
        for k in "${!HOSTS[@]}"; do
            cmd=("${NODE_CMD[@]}")
            for i in "${!cmd[@]}"; do [[ ${cmd[$i]} == '{node_rank}' ]] && cmd[i]=$k; done
            echo "node_rank=$k host=${HOSTS[$k]}: $(quoted "${cmd[@]}")"
        done
    else
        echo "pdsh from ${HOSTS[0]} to all nodes: $(quoted "${NODE_CMD[@]}")"
        echo "== forwarded environment (DS_ENV_FILE=$ENV_FILE) =="
        forwarded_env | cut -c1-200
    fi
    echo "== deepspeed config (recipe $RECIPE, world size $WORLD_SIZE) =="
    print_ds_config "$HELPER" "$PYTHON" "$RECIPE" "$WORLD_SIZE" ${TRAIN_ARGS[@]+"${TRAIN_ARGS[@]}"}
    exit 0
fi

# ------------------------------------------------------------------ run
[[ -n ${SLURM_JOB_ID:-} ]] || die "SLURM_JOB_ID is not set: submit with sbatch"
mkdir -p "$(dirname "$HOSTFILE")" "$RUN_DIR_ABS/launch"
"$PYTHON" "$HELPER" hostfile "$NODELIST" --slots "$SLOTS" --out "$HOSTFILE"
if [[ $LAUNCHER == pdsh ]]; then
    forwarded_env >"$ENV_FILE"
    export DS_ENV_FILE=$ENV_FILE # DeepSpeed's runner exports these on every node (absolute path wins)
fi
export MASTER_ADDR MASTER_PORT
RESTARTS=${SLURM_RESTART_COUNT:-0}
log "job $SLURM_JOB_ID (restart $RESTARTS): $NNODES nodes x $SLOTS $DEVICE = $WORLD_SIZE ranks, rendezvous $MASTER_ADDR:$MASTER_PORT, launcher $LAUNCHER, run dir $RUN_DIR_ABS"
log "launch: $(quoted "${LAUNCH[@]}")"

STOP_SIGNAL=""
REQUEUED=0
LAUNCH_PID=""
# shellcheck disable=SC2317  # stop_ranks / on_signal run from traps
stop_ranks() { # ask every trainer to checkpoint at its next step boundary and exit 99
    [[ -n $LAUNCH_PID ]] || return 0
    # A helper step signals exactly the trainer processes of this run on every node. Signalling the
    # srun step itself would reach every process in it, data-loader workers included.
    if timeout 120 srun --overlap --quiet --nodes="$NNODES" --ntasks="$NNODES" --ntasks-per-node=1 \
        "$PYTHON" "$HELPER" signal --run-dir "$RUN_DIR_ABS" --sig USR1; then
        return 0
    fi
    log "the signal step failed: sending SIGUSR1 to srun instead (it reaches every process of the step)"
    kill -USR1 "$LAUNCH_PID" 2>/dev/null || true
}
# shellcheck disable=SC2317
on_signal() {
    if ((REQUEUED)); then
        log "received SIG$1 while requeueing; exiting"
        exit 0
    fi
    STOP_SIGNAL=${STOP_SIGNAL:-$1}
    log "received SIG$1: asking the ranks to save a checkpoint and stop"
    stop_ranks
}
trap 'on_signal USR1' USR1
trap 'on_signal TERM' TERM

# In the background so that the traps run while it trains (bash defers traps during a foreground child).
"${LAUNCH[@]}" &
LAUNCH_PID=$!
[[ -z $STOP_SIGNAL ]] || stop_ranks # a signal that came before the launch
wait_launch "$LAUNCH_PID"
rc=$LAUNCH_RC
LAUNCH_PID=""

if ((rc == 0)); then
    log "training finished (exit code 0)"
    exit 0
fi
if ((rc != 99)) && [[ $STOP_SIGNAL == TERM ]]; then
    log "stopped by SIGTERM (exit code $rc): SLURM ends or requeues the job itself"
    exit "$rc"
fi
if ((rc != 99)); then
    log "training failed with exit code $rc; not requeueing"
    exit "$rc"
fi
latest=$(cat "$RUN_DIR_ABS/checkpoints/latest" 2>/dev/null || echo "?")
if ((!REQUEUE_ON_PREEMPT)); then
    log "exit code 99: checkpoint $latest saved; REQUEUE_ON_PREEMPT=0, not requeueing"
    exit 99
fi
if [[ $STOP_SIGNAL == TERM ]] && ((!REQUEUE_ON_TERM)); then
    log "exit code 99 after SIGTERM: checkpoint $latest saved; SLURM ends or requeues the job itself (REQUEUE_ON_TERM=0)"
    exit 99
fi
if ((RESTARTS >= MAX_RESTARTS)); then
    log "exit code 99: checkpoint $latest saved; restart $RESTARTS >= MAX_RESTARTS=$MAX_RESTARTS, not requeueing"
    exit 99
fi
log "exit code 99: checkpoint $latest saved; requeue: scontrol requeue $SLURM_JOB_ID"
REQUEUED=1
if ! scontrol requeue "$SLURM_JOB_ID"; then
    log "scontrol requeue $SLURM_JOB_ID failed (is the job requeueable? JobRequeue / --requeue); exit 99"
    exit 99
fi
exit 0
