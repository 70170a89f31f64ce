#!/bin/bash
# Train the autoencoder on one or more Slurm nodes: one `accelerate launch` per node, all GPUs of each
# node (or one CPU process per node when a node has no GPU). Submit from the repository root:
#
#   sbatch slurm/train.sh   # train.py's defaults: --data data/cifar10 (prepared if missing), --out runs/cifar10
#   sbatch [--nodes=2] [--gpus-per-node=8] [--partition=P] [--time=T] slurm/train.sh --data data --out runs/r1 [train.py flags]
#
# Arguments after the script name go to train.py unchanged. Preemption / time limit: Slurm sends USR1
# to this script 120 s before the limit (or `scancel --signal=USR1 --batch JOB`); the script tells
# every training process to save a checkpoint and exit, then requeues the job, which resumes from
# OUT/checkpoints with the same command. Environment knobs (all optional): REPO, VENV, GPUS_PER_NODE,
# MASTER_ADDR, MASTER_PORT, ACCELERATE_CONFIG, WANDB_RUN_ID, WANDB_MODE, NCCL/Gloo
# variables; DRY_RUN=1 prints the plan and the srun command instead of running it.
#
#SBATCH --job-name=cae-train
#SBATCH --output=logs/%x-%j.out
#SBATCH --open-mode=append
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --requeue
#SBATCH --signal=B:USR1@120
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

# Relative --data/--out paths are relative to the submit folder (where sbatch was run).
cd "${SLURM_SUBMIT_DIR:-$REPO}" || die "cannot cd to ${SLURM_SUBMIT_DIR:-$REPO}"

activate_python
command -v accelerate >/dev/null || die "accelerate is not on PATH (VENV=$VENV); install the requirements or set VENV"

# ---------------------------------------------------------------- nodes, GPUs, processes
NNODES=${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}}

count_gpus() {
    local n
    if [[ -n "${GPUS_PER_NODE:-}" ]]; then
        echo "$GPUS_PER_NODE"
        return
    fi
    if [[ -n "${SLURM_GPUS_ON_NODE:-}" ]]; then
        echo "$SLURM_GPUS_ON_NODE"
        return
    fi
    if [[ -n "${CUDA_VISIBLE_DEVICES+x}" ]]; then
        # Set but empty (or NoDevFiles) means: no GPU for us.
        if [[ -z "$CUDA_VISIBLE_DEVICES" || "$CUDA_VISIBLE_DEVICES" == NoDevFiles* || "$CUDA_VISIBLE_DEVICES" == "-1" ]]; then
            echo 0
        else
            awk -F, '{print NF}' <<<"$CUDA_VISIBLE_DEVICES"
        fi
        return
    fi
    if command -v nvidia-smi >/dev/null 2>&1; then
        n=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU ') || n=0
        echo "${n:-0}"
        return
    fi
    echo 0
}
GPUS_PER_NODE=$(count_gpus)
[[ "$GPUS_PER_NODE" =~ ^[0-9]+$ ]] || die "cannot count GPUs per node (got '$GPUS_PER_NODE'); set GPUS_PER_NODE"
if ((GPUS_PER_NODE > 0)); then
    PROCS_PER_NODE=$GPUS_PER_NODE
    DEVICE_ARGS=()
else
    PROCS_PER_NODE=1
    DEVICE_ARGS=(--cpu --mixed_precision no)
fi
NUM_PROCESSES=$((NNODES * PROCS_PER_NODE))

# ---------------------------------------------------------------- rendezvous address
first_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)
[[ -n "$first_node" ]] || die "scontrol show hostnames '$SLURM_JOB_NODELIST' gave no node"
if [[ -z "${MASTER_ADDR:-}" ]]; then
    if getent hosts "$first_node" >/dev/null 2>&1; then
        MASTER_ADDR=$first_node
    else
        # The node name does not resolve (e.g. NodeName differs from the host name): use NodeAddr.
        MASTER_ADDR=$(scontrol show node "$first_node" | grep -o 'NodeAddr=[^ ]*' | head -n1 | cut -d= -f2)
        [[ -n "$MASTER_ADDR" ]] || die "cannot resolve the first node '$first_node'; set MASTER_ADDR"
    fi
fi
# Port from the job id (and the restart count, so a requeued run never meets its predecessor's socket).
MASTER_PORT=${MASTER_PORT:-$((20000 + (SLURM_JOB_ID + 101 * ${SLURM_RESTART_COUNT:-0}) % 12000))}
export MASTER_ADDR MASTER_PORT

ACCELERATE_CONFIG=${ACCELERATE_CONFIG:-$REPO/accelerate_config.yaml}
CONFIG_ARGS=()
if [[ -f "$ACCELERATE_CONFIG" ]]; then
    CONFIG_ARGS=(--config_file "$ACCELERATE_CONFIG")
else
    log "warning: no accelerate config at $ACCELERATE_CONFIG; using accelerate's defaults"
fi

# ---------------------------------------------------------------- environment for the workers
# W&B: one run per Slurm job, resumed across requeues (the trainer uses WANDB_RUN_ID with resume="allow").
export WANDB_RUN_ID=${WANDB_RUN_ID:-cae-${SLURM_JOB_ID}}
# Fail instead of hanging when a peer dies: async NCCL error handling (a stuck collective fails after
# train.py's --dist-timeout, 300 s by default), the watchdog's heartbeat, and srun --kill-on-bad-exit.
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
export NCCL_ASYNC_ERROR_HANDLING=${NCCL_ASYNC_ERROR_HANDLING:-1}
export TORCH_NCCL_HEARTBEAT_TIMEOUT_SEC=${TORCH_NCCL_HEARTBEAT_TIMEOUT_SEC:-300}
# CPU threads per process: the CPUs Slurm gave this node, shared by its processes.
if [[ -z "${OMP_NUM_THREADS:-}" ]]; then
    cpus=${SLURM_CPUS_ON_NODE:-1}
    OMP_NUM_THREADS=$((cpus / PROCS_PER_NODE))
    ((OMP_NUM_THREADS >= 1)) || OMP_NUM_THREADS=1
    export OMP_NUM_THREADS
fi
export PYTHONUNBUFFERED=1

# What each node's wrapper runs; slurm/node.sh adds --machine_rank $SLURM_NODEID on each node.
LAUNCH=(accelerate launch
    --num_machines "$NNODES"
    --num_processes "$NUM_PROCESSES"
    --main_process_ip "$MASTER_ADDR"
    --main_process_port "$MASTER_PORT"
    "${CONFIG_ARGS[@]}"
    "${DEVICE_ARGS[@]}")

log "job ${SLURM_JOB_ID} (${SLURM_JOB_NAME:-}) restart ${SLURM_RESTART_COUNT:-0} on ${SLURM_JOB_NODELIST}"
log "nodes=$NNODES gpus_per_node=$GPUS_PER_NODE processes=$NUM_PROCESSES ($PROCS_PER_NODE per node, ${DEVICE_ARGS[*]:-gpu})"
log "master=$MASTER_ADDR:$MASTER_PORT repo=$REPO python=$(command -v python) omp_threads=$OMP_NUM_THREADS"
log "wandb run id=$WANDB_RUN_ID mode=${WANDB_MODE:-from flags}; train.py args: $*"

# ---------------------------------------------------------------- run, forwarding preemption signals
got_signal=""
srun_pid=""
on_signal() {
    log "caught SIG$1: asking every training process to checkpoint and exit"
    got_signal=$1
    # srun forwards USR1 to its tasks (slurm/node.sh on every node), which signal their workers.
    [[ -n "$srun_pid" ]] && kill -USR1 "$srun_pid" 2>/dev/null
}
trap 'on_signal USR1' USR1
trap 'on_signal TERM' TERM

SRUN_ARGS=(--kill-on-bad-exit=1 --nodes="$NNODES" --ntasks="$NNODES" --ntasks-per-node=1)
# Slurm 22.05's srun does not inherit --cpus-per-task from the batch job.
[[ -n "${SLURM_CPUS_PER_TASK:-}" ]] && SRUN_ARGS+=(--cpus-per-task="$SLURM_CPUS_PER_TASK")

if [[ -n "${DRY_RUN:-}" ]]; then
    log "dry run: srun ${SRUN_ARGS[*]} bash $REPO/slurm/node.sh ${LAUNCH[*]} $REPO/train.py $*"
    exit 0
fi

# Run in the background and `wait`: bash runs a trap only when its foreground child has exited.
srun "${SRUN_ARGS[@]}" bash "$REPO/slurm/node.sh" "${LAUNCH[@]}" "$REPO/train.py" "$@" &
srun_pid=$!
# `wait` returns early (128+signal) when a trap ran: keep waiting while srun is alive, then collect
# its real exit status (bash remembers it).
while kill -0 "$srun_pid" 2>/dev/null; do
    wait "$srun_pid"
done
wait "$srun_pid"
rc=$?
log "training exited with code $rc"

if [[ -n "$got_signal" ]]; then
    if ((rc == 0)); then
        log "checkpoint saved after SIG$got_signal; requeueing job $SLURM_JOB_ID"
        if scontrol requeue "$SLURM_JOB_ID"; then
            exit 0
        fi
        log "error: scontrol requeue failed; resubmit the same command to resume"
        exit 1
    fi
    log "training failed after SIG$got_signal (code $rc): not requeueing"
fi
exit "$rc"
