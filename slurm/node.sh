#!/bin/bash
# One node's share of a slurm/train.sh job, run by `srun` once per node:
#   bash slurm/node.sh accelerate launch [launch flags] train.py [train flags]
# Adds `--machine_rank $SLURM_NODEID` (this node's index in the job), starts the launcher, and turns a
# USR1/TERM sent to this wrapper into a USR1 for every training process under it (torchrun's agent,
# which `accelerate launch` runs, does not forward USR1; under proctrack/cgroup Slurm signals only
# this wrapper). The training processes then finish their step, save a checkpoint and exit 0. Exits
# with the launcher's exit code.
set -uo pipefail

node_rank=${SLURM_NODEID:?slurm/node.sh runs inside srun}
tag="[slurm/node.sh node_rank=$node_rank host=$(hostname -s)]"

# Insert --machine_rank right after `accelerate launch`.
[[ "${1:-}" == accelerate && "${2:-}" == launch ]] || {
    echo "$tag error: expected 'accelerate launch ...', got: $*" >&2
    exit 2
}
shift 2
cmd=(accelerate launch --machine_rank "$node_rank" "$@")

# slurm/train.sh planned CAE_PLANNED_GPUS processes on every node from the batch node's count.
if [[ -n "${SLURM_GPUS_ON_NODE:-}" && -z "${CAE_GPUS_PER_NODE:-}" && "$SLURM_GPUS_ON_NODE" != "${CAE_PLANNED_GPUS:-$SLURM_GPUS_ON_NODE}" ]]; then
    echo "$tag error: Slurm gave this node $SLURM_GPUS_ON_NODE GPUs, the first node $CAE_PLANNED_GPUS: request --gpus-per-node" >&2
    exit 2
fi

# Every process below $1 (children, grandchildren, ...).
descendants() {
    ps -e -o pid=,ppid= | awk -v root="$1" '
        { kids[$2] = kids[$2] " " $1 }
        END {
            n = split(kids[root], queue, " ")
            for (i = 1; i <= n; i++) {
                printf "%s ", queue[i]
                m = split(kids[queue[i]], more, " ")
                for (j = 1; j <= m; j++) queue[++n] = more[j]
            }
        }'
}

# The training processes among them: RANK (set by torchrun) in their environment but not in their
# parent's. Their own children (torch.compile's workers) must not get USR1: it would kill them. One
# grep and no process per candidate, so that the nodes signal their trainers at nearly the same time.
trainers() {
    local -A ranked=()
    local -a files
    local pid stat
    read -ra files <<<"$(descendants "$1")"
    ((${#files[@]})) || return 0
    files=("${files[@]/#//proc/}")
    for pid in $(grep -lsz '^RANK=' "${files[@]/%//environ}" | cut -d/ -f3); do ranked[$pid]=1; done
    for pid in "${!ranked[@]}"; do
        read -r stat 2>/dev/null <"/proc/$pid/stat" || continue
        stat=${stat##*) } # "S PPID ...": the fields after the command name
        stat=${stat#* }
        [[ -z "${ranked[${stat%% *}]:-}" ]] && echo -n "$pid "
    done
    return 0
}

stop_requested=""
launcher=""
forward_stop() {
    stop_requested=$1
    [[ -n "$launcher" ]] || return 0
    local pids
    pids=$(trainers "$launcher")
    echo "$tag SIG$1: sending USR1 to the training processes (${pids:-none yet})"
    # shellcheck disable=SC2086
    [[ -n "${pids// /}" ]] && kill -USR1 $pids 2>/dev/null
    return 0
}
trap 'forward_stop USR1' USR1
trap 'forward_stop TERM' TERM

# Start the launcher with USR1 ignored: the ignore is inherited through exec by `accelerate launch`,
# torchrun's agent and the trainers; the trainers install their own USR1 handler, the launchers keep
# ignoring it, so a USR1 that reaches every process of the step (srun forwards signals to the whole
# step) stops training instead of killing a launcher.
(
    trap '' USR1
    exec "${cmd[@]}"
) &
launcher=$!

# Re-send while a stop is pending: a trainer that was still starting had USR1 ignored.
while kill -0 "$launcher" 2>/dev/null; do
    if [[ -n "$stop_requested" ]]; then
        sleep 5 &
        wait $! 2>/dev/null
        kill -0 "$launcher" 2>/dev/null && forward_stop "$stop_requested" >/dev/null
    else
        wait "$launcher"
    fi
done
wait "$launcher"
rc=$?
[[ $rc -ne 0 ]] && echo "$tag accelerate launch exited with code $rc" >&2
exit "$rc"
