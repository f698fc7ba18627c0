#!/bin/bash
# Shared by launch/slurm_pretrain.sh and launch/pretrain_local.sh (sourced, not run): logging, the
# trainer's arguments, GPU detection, the dry run's DeepSpeed JSON, and waiting for the launcher
# while signal traps stay live.
# shellcheck disable=SC2034  # DRY_RUN, TRAIN_ARGS, BASE_ARGS and LAUNCH_RC are the sourcing script's

# log MESSAGE...: a timestamped line on stderr, with the host
log() { printf '[%s %s mico-launch] %s\n' "$(date +%H:%M:%S)" "$(hostname -s)" "$*" >&2; }

# die MESSAGE...: log it as an error and exit 2 (a usage error)
die() {
    log "error: $*"
    exit 2
}

is_uint() { [[ $1 =~ ^[0-9]+$ ]]; }

# parse_launch_options ARGS...: the scripts' own options (--dry-run, -h/--help, --), before the
# trainer's; sets DRY_RUN and TRAIN_ARGS (the rest). --help prints the script's `usage` and exits.
parse_launch_options() {
    DRY_RUN=0
    while (($#)); do
        case $1 in
            -h | --help)
                usage
                exit 0
                ;;
            --dry-run)
                DRY_RUN=1
                shift
                ;;
            --)
                shift
                break
                ;;
            *) break ;;
        esac
    done
    TRAIN_ARGS=("$@")
}

# arg_value NAME ARGS...: the value of --NAME V or --NAME=V among ARGS; empty if absent
arg_value() {
    local name=$1
    shift
    while (($#)); do
        case $1 in
            "--$name")
                echo "${2:-}"
                return 0
                ;;
            "--$name="*)
                echo "${1#*=}"
                return 0
                ;;
        esac
        shift
    done
}

# without_resume ARGS...: ARGS minus --resume X / --resume=X, into the array BASE_ARGS
without_resume() {
    BASE_ARGS=()
    while (($#)); do
        case $1 in
            --resume) shift ;;
            --resume=*) ;;
            *) BASE_ARGS+=("$1") ;;
        esac
        shift
    done
}

# quoted ARGS...: ARGS as one shell-quoted line
quoted() { printf '%q ' "$@" | sed 's/ $//'; }

# nvidia_gpus: the number of GPUs nvidia-smi lists (0 without nvidia-smi or GPUs)
nvidia_gpus() {
    local n=0
    if command -v nvidia-smi >/dev/null; then
        n=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
    fi
    echo "${n:-0}"
}

# print_ds_config HELPER PYTHON RECIPE WORLD ARGS...: the DeepSpeed JSON the trainer would resolve for
# RECIPE at WORLD ranks, with the --section.key=value overrides among ARGS
print_ds_config() {
    local helper=$1 python=$2 recipe=$3 world=$4 a
    shift 4
    local overrides=()
    for a in "$@"; do
        [[ $a == --*.*=* ]] && overrides+=("$a")
    done
    "$python" "$helper" ds-config --recipe "$recipe" --world-size "$world" ${overrides[@]+"${overrides[@]}"}
}

# wait_launch PID: wait for the background launch PID while trapped signals run their handlers;
# sets LAUNCH_RC to its exit status
wait_launch() {
    local pid=$1 rc rc2
    while :; do
        rc=0
        wait "$pid" || rc=$?
        if ((rc > 128)) && kill -0 "$pid" 2>/dev/null; then
            continue # `wait` was interrupted by a trapped signal; the launch is still running
        fi
        break
    done
    if ((rc > 128)); then # interrupted just as it ended: collect the real status
        rc2=0
        wait "$pid" 2>/dev/null || rc2=$?
        ((rc2 == 127)) || rc=$rc2
    fi
    LAUNCH_RC=$rc
}
