#!/bin/bash
# Train the autoencoder on one or more Slurm nodes: one `accelerate launch` per node, all GPUs of each
# node (or one CPU process per node when a node has no GPU). Submit from the repository root:
#
#   sbatch slurm/train.sh   # train.py's defaults: --data data/cifar10 (prepared if missing), --out runs/cifar10
#   sbatch [--nodes=2] [--gpus-per-node=8 --cpus-per-task=32] [--partition=P] [--time=T] slurm/train.sh --data data --out runs/r1 [train.py flags]
#   sbatch --array=0-4 slurm/train.sh --recipe fast                              # 5 seeds: --seed + K into OUT/seed-S
#   sbatch --array=0-5 slurm/train.sh --grid grid.txt --seeds 3 --recipe fast    # 2 grid lines x 3 seeds: OUT/line-L-seed-S
#
# Job arrays: ae.sweep maps task K to its run (README "Many runs"), exactly as `python -m ae.sweep`
# does without Slurm; each task is one job here (its own requeue and resume), its log
# logs/cae-train-%A_%a.out, and all of them one W&B group, cae-ARRAYJOBID (or --wandb-group).
#
# CPUs: give each node's task at least one CPU per process, better several (--cpus-per-task, or
# --exclusive): without a CPU request Slurm gives the task ONE CPU per node, which is not enough for
# 8 GPU processes (the script stops and says what to request) and slow for the FFCV loader.
#
# Arguments after the script name go to train.py unchanged. Stops (see the README's Slurm section):
# - USR1 (Slurm sends it 300 s before the time limit, or `scancel --signal=USR1 --batch JOB`): every
#   training process saves a checkpoint and exits; the job is requeued when that checkpoint is newer
#   than the one it started from, and resumes from OUT/checkpoints with the same command.
# - TERM (`scancel JOB`, the time limit itself, Slurm's preemption): the same clean stop, no requeue.
# Environment knobs (all optional): REPO, VENV, CAE_GPUS_PER_NODE, CAE_MASTER_ADDR, CAE_MASTER_PORT,
# CAE_ACCELERATE_CONFIG, CAE_WANDB_RUN_ID, WANDB_MODE, NCCL/Gloo variables; DRY_RUN=1 prints the plan
# and the srun command instead of running it. MASTER_ADDR, MASTER_PORT and WANDB_RUN_ID exported by
# the submitting shell are ignored (sbatch passes the whole environment on).
#
#SBATCH --job-name=cae-train
#SBATCH --output=logs/%x-%j.out
#SBATCH --open-mode=append
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --requeue
#SBATCH --signal=B:USR1@300
#SBATCH --time=4:00:00

set -uo pipefail

NAME=slurm/train.sh
# Under sbatch this file is a copy in Slurm's spool folder: look for the repository in REPO, else the
# submit folder, else this file's parent folder. slurm/common.sh does the rest of the set-up.
for repo in "${REPO:-${SLURM_SUBMIT_DIR:-$PWD}}" "$(dirname "${BASH_SOURCE[0]}")/.." ""; do [[ -f "$repo/slurm/common.sh" ]] && break; done
[[ -n "$repo" ]] || { echo "[$NAME] error: no repository in ${REPO:-${SLURM_SUBMIT_DIR:-$PWD}}; submit from its root or set REPO=/path/to/repo" >&2 && exit 2; }
# shellcheck source=slurm/common.sh
source "$repo/slurm/common.sh"
[[ -n "${SLURM_JOB_ID:-}" ]] || die "run me with sbatch (SLURM_JOB_ID is not set)"
# This job in Slurm's commands: an array task is ARRAYJOBID_TASK (the array's last task has the
# array's job id as its SLURM_JOB_ID, and `scontrol requeue ARRAYJOBID` would requeue every task).
JOB=${SLURM_ARRAY_TASK_ID:+${SLURM_ARRAY_JOB_ID:-}_${SLURM_ARRAY_TASK_ID}}
JOB=${JOB:-$SLURM_JOB_ID}

# ---------------------------------------------------------------- stop signals
# Trapped first thing: a USR1 that comes before the trap would kill this script (a --time shorter
# than the warning gets it at once).
got_signal=""
srun_pid=""
on_signal() {
    log "caught SIG$1: asking every training process to checkpoint and exit"
    got_signal=${got_signal:-$1} # the first one decides: a USR1 stop overtaken by the time limit's TERM still requeues
    # srun forwards USR1 to its tasks (slurm/node.sh on every node), which signal their trainers.
    [[ -n "$srun_pid" ]] && kill -USR1 "$srun_pid" 2>/dev/null
}
trap 'on_signal USR1' USR1
trap 'on_signal TERM' TERM

# Relative --data/--out paths are relative to the submit folder (where sbatch was run).
cd "${SLURM_SUBMIT_DIR:-$REPO}" || die "cannot cd to ${SLURM_SUBMIT_DIR:-$REPO}"

# The stop budget. USR1 comes 300 s before the time limit (#SBATCH --signal above; Slurm may send it
# up to 60 s earlier); at the limit Slurm sends SIGTERM, and SIGKILL KillWait (30 s by default) later.
# Between USR1 and the limit the trainers finish their step, agree to stop (every 10 steps), save a
# checkpoint (seconds) and give W&B at most WANDB_FINISH_S to finish; this script waits for them
# until STOP_MARGIN_S before the limit at the latest, then requeues.
WANDB_FINISH_S=60
STOP_MARGIN_S=30

activate_python
command -v accelerate >/dev/null || die "accelerate is not on PATH (VENV=$VENV); install the requirements or set VENV"

# ---------------------------------------------------------------- job arrays: one run per task
# An array task's log is NAME-ARRAYJOBID_TASK.out (%A_%a): the default NAME-JOBID.out (%j; sbatch's
# --output cannot tell arrays from single jobs, whose %a is 4294967294) is renamed to it, and Slurm
# keeps writing to the open file. A requeued task appends its new start to it.
name_array_log() {
    local log folder target
    log=$(scontrol -o show job "$JOB" 2>/dev/null | grep -o 'StdOut=[^ ]*' | cut -d= -f2)
    folder=$(dirname "$log")
    [[ -f "$log" && "$log" == "$folder/${SLURM_JOB_NAME:-}-${SLURM_JOB_ID}.out" ]] || return 0 # --output chosen
    target="$folder/${SLURM_JOB_NAME}-${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}.out"
    if [[ -e "$target" ]]; then
        cat "$log" >>"$target" && rm -f "$log"
        exec >>"$target" 2>&1
    else
        mv "$log" "$target"
    fi
}
sweep() { PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" python -m ae.sweep "$@"; }
TRAIN_ARGS=("$@")
if [[ -n "${SLURM_ARRAY_TASK_ID:-}" ]]; then
    name_array_log
    if [[ -n "${DRY_RUN:-}" ]]; then
        sweep --list "$((${SLURM_ARRAY_TASK_MAX:-$SLURM_ARRAY_TASK_ID} + 1))" "$@" | sed "s|^|[$NAME] dry run: |"
        ((PIPESTATUS[0] == 0)) || exit 2
    fi
    # Task K's train.py arguments (NUL-separated) and OUT/.../run.json; a one-line error for a task
    # beyond the grid, naming the --array it needs.
    task_args=$(mktemp)
    sweep --task "$SLURM_ARRAY_TASK_ID" ${DRY_RUN:+--dry-run} "$@" >"$task_args" || { rm -f "$task_args"; exit 2; }
    mapfile -d '' TRAIN_ARGS <"$task_args"
    rm -f "$task_args"
else
    for arg in "$@"; do
        case "$arg" in
            --grid | --grid=* | --seeds | --seeds=*) die "$arg needs a job array: sbatch --array=0-N slurm/train.sh ... (python -m ae.sweep --list ... prints the tasks)" ;;
        esac
    done
fi

# ---------------------------------------------------------------- nodes, GPUs, processes, CPUs
NNODES=${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}}

# GPUs per node: what Slurm gave the job (SLURM_GPUS_ON_NODE, set for --gpus-per-node, --gres=gpu:N,
# ...); none when Slurm gave none, even if the node has some (they may belong to other jobs).
GPUS_PER_NODE=${CAE_GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-0}}
[[ "$GPUS_PER_NODE" =~ ^[0-9]+$ ]] || die "cannot count GPUs per node (got '$GPUS_PER_NODE'); set CAE_GPUS_PER_NODE"
# --gpus=N spreads N GPUs over the nodes in any split, but every node runs GPUS_PER_NODE processes.
if ((NNODES > 1 && GPUS_PER_NODE > 0)) && [[ -n "${SLURM_GPUS:-}" && -z "${SLURM_GPUS_PER_NODE:-}${CAE_GPUS_PER_NODE:-}" ]]; then
    die "--gpus=$SLURM_GPUS may give the $NNODES nodes different GPU counts: request --gpus-per-node instead"
fi
if ((GPUS_PER_NODE > 0)); then
    PROCS_PER_NODE=$GPUS_PER_NODE
    DEVICE_ARGS=()
else
    PROCS_PER_NODE=1
    DEVICE_ARGS=(--cpu --mixed_precision no)
fi
NUM_PROCESSES=$((NNODES * PROCS_PER_NODE))

CPUS_ON_NODE=${SLURM_CPUS_ON_NODE:-1}
if ((CPUS_ON_NODE < PROCS_PER_NODE)); then
    die "$PROCS_PER_NODE processes per node but Slurm gave this node $CPUS_ON_NODE CPU(s): request at least --cpus-per-task=$PROCS_PER_NODE (better $((PROCS_PER_NODE * 4))) or --exclusive"
fi

# ---------------------------------------------------------------- rendezvous address
mapfile -t job_nodes < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
first_node=${job_nodes[0]:-}
[[ -n "$first_node" ]] || die "scontrol show hostnames '$SLURM_JOB_NODELIST' gave no node"
node_addr() { scontrol show node "$1" | grep -o 'NodeAddr=[^ ]*' | head -n1 | cut -d= -f2; }
for var in MASTER_ADDR MASTER_PORT WANDB_RUN_ID; do
    [[ -n "${!var:-}" ]] && log "warning: ignoring $var=${!var} from the submitting shell; set CAE_$var to choose it"
done
if [[ -n "${CAE_MASTER_ADDR:-}" ]]; then
    MASTER_ADDR=$CAE_MASTER_ADDR
    known=" ${job_nodes[*]} $(for n in "${job_nodes[@]}"; do node_addr "$n"; done | tr '\n' ' ') "
    [[ "$known" == *" $MASTER_ADDR "* ]] || log "warning: CAE_MASTER_ADDR=$MASTER_ADDR is not one of this job's nodes or their addresses ($(xargs <<<"$known")); the nodes may never meet"
elif getent hosts "$first_node" >/dev/null 2>&1; then
    MASTER_ADDR=$first_node
else
    # The node name does not resolve (e.g. NodeName differs from the host name): use NodeAddr.
    MASTER_ADDR=$(node_addr "$first_node")
    [[ -n "$MASTER_ADDR" ]] || die "cannot resolve the first node '$first_node'; set CAE_MASTER_ADDR"
fi
# Port from the job id (and the restart count, so a requeued run never meets its predecessor's socket).
MASTER_PORT=${CAE_MASTER_PORT:-$((20000 + (SLURM_JOB_ID + 101 * ${SLURM_RESTART_COUNT:-0}) % 12000))}
export MASTER_ADDR MASTER_PORT

ACCELERATE_CONFIG=${CAE_ACCELERATE_CONFIG:-$REPO/accelerate_config.yaml}
CONFIG_ARGS=()
if [[ -f "$ACCELERATE_CONFIG" ]]; then
    CONFIG_ARGS=(--config_file "$ACCELERATE_CONFIG")
else
    log "warning: no accelerate config at $ACCELERATE_CONFIG; using accelerate's defaults"
fi

# ---------------------------------------------------------------- environment for the workers
# W&B: one run per Slurm job, resumed across requeues (the trainer uses WANDB_RUN_ID with resume="allow").
export WANDB_RUN_ID=${CAE_WANDB_RUN_ID:-cae-${SLURM_JOB_ID}}
# The stop budget (see the README): W&B gets at most this long to finish when the trainers exit.
export WANDB_FINISH_TIMEOUT=$WANDB_FINISH_S
# Fail instead of hanging when a peer dies: async NCCL error handling (a stuck collective fails after
# train.py's --dist-timeout, 300 s by default), the watchdog's heartbeat, and srun --kill-on-bad-exit.
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
export NCCL_ASYNC_ERROR_HANDLING=${NCCL_ASYNC_ERROR_HANDLING:-1}
export TORCH_NCCL_HEARTBEAT_TIMEOUT_SEC=${TORCH_NCCL_HEARTBEAT_TIMEOUT_SEC:-300}
# CPU threads per process: the CPUs Slurm gave this node, shared by its processes.
if [[ -z "${OMP_NUM_THREADS:-}" ]]; then
    export OMP_NUM_THREADS=$((CPUS_ON_NODE / PROCS_PER_NODE))
fi
# slurm/node.sh checks that its node has the GPUs planned here.
export CAE_PLANNED_GPUS=$GPUS_PER_NODE
export PYTHONUNBUFFERED=1

# What each node's wrapper runs; slurm/node.sh adds --machine_rank $SLURM_NODEID on each node.
LAUNCH=(accelerate launch
    --num_machines "$NNODES"
    --num_processes "$NUM_PROCESSES"
    --main_process_ip "$MASTER_ADDR"
    --main_process_port "$MASTER_PORT"
    "${CONFIG_ARGS[@]}"
    "${DEVICE_ARGS[@]}")

log "job ${SLURM_JOB_ID} (${SLURM_JOB_NAME:-})${SLURM_ARRAY_TASK_ID:+ array task ${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}} restart ${SLURM_RESTART_COUNT:-0} on ${SLURM_JOB_NODELIST}"
log "nodes=$NNODES gpus_per_node=$GPUS_PER_NODE processes=$NUM_PROCESSES ($PROCS_PER_NODE per node, ${DEVICE_ARGS[*]:-gpu}) cpus_per_node=$CPUS_ON_NODE"
log "master=$MASTER_ADDR:$MASTER_PORT repo=$REPO python=$(command -v python) omp_threads=$OMP_NUM_THREADS"
log "wandb run id=$WANDB_RUN_ID mode=${WANDB_MODE:-from flags}; train.py args: ${TRAIN_ARGS[*]}"

SRUN_ARGS=(--kill-on-bad-exit=1 --nodes="$NNODES" --ntasks="$NNODES" --ntasks-per-node=1)
# Slurm 22.05's srun does not inherit --cpus-per-task from the batch job. Without one (--exclusive,
# --cpus-per-gpu) the task would be bound to one core under TaskPluginParam=autobind=cores.
if [[ -n "${SLURM_CPUS_PER_TASK:-}" ]]; then
    SRUN_ARGS+=(--cpus-per-task="$SLURM_CPUS_PER_TASK")
else
    SRUN_ARGS+=(--cpu-bind=none)
fi

if [[ -n "${DRY_RUN:-}" ]]; then
    log "dry run: srun ${SRUN_ARGS[*]} bash $REPO/slurm/node.sh ${LAUNCH[*]} $REPO/train.py ${TRAIN_ARGS[*]}"
    exit 0
fi

# ---------------------------------------------------------------- stop budget
# The newest checkpoint's step in train.py's --out (0 when there is none): a USR1 stop requeues the
# job only when it has moved since this start, so a --time shorter than the warning cannot requeue
# forever.
checkpoint_step() {
    local out=runs/cifar10 i newest # train.py's default --out
    for ((i = 0; i < ${#TRAIN_ARGS[@]}; i++)); do
        case "${TRAIN_ARGS[i]}" in
            --out) out=${TRAIN_ARGS[i + 1]:-} ;;
            --out=*) out=${TRAIN_ARGS[i]#--out=} ;;
        esac
    done
    newest=$(find "$out/checkpoints" -maxdepth 1 -name 'step_*' -printf "%f\n" 2>/dev/null | sort -V | tail -n1)
    newest=${newest#step_}
    echo $((10#${newest:-0}))
}
START_STEP=$(checkpoint_step)
# When the job ends (seconds since the epoch; empty without a time limit): after a signal, stop
# waiting for the trainers STOP_MARGIN_S before it, so the requeue happens before Slurm's SIGTERM.
END_TIME=$(squeue -h -j "$JOB" -o %e 2>/dev/null)
[[ "$END_TIME" =~ ^[0-9]{4}-[0-9]{2}-[0-9]{2}T ]] && END_TIME=$(date -d "$END_TIME" +%s) || END_TIME=""

# ---------------------------------------------------------------- run
# In the background, then `wait`: bash runs a trap only when its foreground child has exited. A stop
# that came while this script was starting skips the run.
if [[ -z "$got_signal" ]]; then
    srun "${SRUN_ARGS[@]}" bash "$REPO/slurm/node.sh" "${LAUNCH[@]}" "$REPO/train.py" "${TRAIN_ARGS[@]}" &
    srun_pid=$!
fi
# `wait` returns early (128+signal) when a trap ran: keep waiting while srun is alive (after a signal,
# at most until STOP_MARGIN_S before the time limit), then collect its real exit status.
rc=0
while [[ -n "$srun_pid" ]] && kill -0 "$srun_pid" 2>/dev/null; do
    if [[ -n "$got_signal" && -n "$END_TIME" ]] && (($(date +%s) >= END_TIME - STOP_MARGIN_S)); then
        log "training has not exited ${STOP_MARGIN_S} s before the time limit: going on without it"
        rc=124
        break
    fi
    if [[ -n "$got_signal" ]]; then
        sleep 1 &
        wait $! 2>/dev/null
    else
        wait "$srun_pid"
    fi
done
if [[ -n "$srun_pid" ]] && ((rc != 124)); then
    wait "$srun_pid"
    rc=$?
    log "training exited with code $rc"
fi

case "$got_signal" in
    "") exit "$rc" ;;
    TERM)
        log "stopped by SIGTERM (scancel, the time limit or preemption): not requeueing; resubmit the same command to resume"
        exit "$rc"
        ;;
esac
if ((rc != 0 && rc != 124)); then
    log "training failed after SIGUSR1 (code $rc): not requeueing"
    exit "$rc"
fi
step=$(checkpoint_step)
if ((step <= START_STEP)); then
    log "error: no new checkpoint since this start (step $START_STEP): not requeueing; give the job a --time well above the USR1 warning (300 s)"
    exit 1
fi
log "checkpoint at step $step saved after SIGUSR1 (this start began at step $START_STEP); requeueing job $JOB"
scontrol requeue "$JOB" && exit 0
restarts=$(scontrol -o show job "$JOB" | grep -o 'Restarts=[0-9]*' | cut -d= -f2)
if ((${restarts:-0} > ${SLURM_RESTART_COUNT:-0})); then
    log "Slurm has requeued job $JOB already"
    exit 0
fi
log "error: scontrol requeue failed; resubmit the same command to resume"
exit 1
