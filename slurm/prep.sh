#!/bin/bash
# Prepare CIFAR-10 as FFCV betons on a compute node: runs `python -m data_prep`. Submit from the
# repository root (mkdir -p logs first):
#
#   SOURCE=/datasets/cifar-10-python.tar.gz DATA=data sbatch slurm/prep.sh
#   sbatch slurm/prep.sh --source /datasets/cifar10-jpeg --out data [--limit N] [--force]
#
# SOURCE (a local CIFAR-10 copy; unset: torchvision downloads it, which needs internet on the node)
# and DATA (output folder, default: data) are used unless --source / --out are given as arguments.
# Other arguments go to data_prep unchanged. REPO and VENV as in slurm/train.sh.
#
#SBATCH --job-name=cae-prep
#SBATCH --output=logs/%x-%j.out
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --time=1:00:00

set -uo pipefail

log() { echo "[slurm/prep.sh] $*"; }
die() {
    echo "[slurm/prep.sh] error: $*" >&2
    exit 2
}

find_repo() {
    local cand
    if [[ -n "${REPO:-}" ]]; then
        [[ -d "$REPO/data_prep" ]] || die "REPO=$REPO has no data_prep/"
        (cd "$REPO" && pwd)
        return
    fi
    for cand in "${SLURM_SUBMIT_DIR:-}" "$(dirname "${BASH_SOURCE[0]}")/.." "$PWD"; do
        if [[ -n "$cand" && -d "$cand/data_prep" && -f "$cand/train.py" ]]; then
            (cd "$cand" && pwd)
            return
        fi
    done
    die "cannot find the repository (no data_prep/ in SLURM_SUBMIT_DIR=${SLURM_SUBMIT_DIR:-}); submit from the repository root or set REPO=/path/to/repo"
}
REPO=$(find_repo) || exit 2
# Relative paths in arguments and SOURCE/DATA are relative to the submit folder.
cd "${SLURM_SUBMIT_DIR:-$PWD}" || die "cannot cd to ${SLURM_SUBMIT_DIR:-$PWD}"

VENV=${VENV:-$REPO/.venv}
if [[ -f "$VENV/bin/activate" ]]; then
    # shellcheck disable=SC1091
    source "$VENV/bin/activate"
elif [[ -x "$VENV/bin/python" ]]; then
    export PATH="$VENV/bin:$PATH" # e.g. a conda prefix
elif [[ "$VENV" != "$REPO/.venv" ]]; then
    die "VENV=$VENV has neither bin/activate nor bin/python"
fi

args=("$@")
has_flag() {
    local a
    for a in "${args[@]}"; do
        [[ "$a" == "$1" || "$a" == "$1="* ]] && return 0
    done
    return 1
}
has_flag --out || args+=(--out "${DATA:-data}")
if ! has_flag --source && [[ -n "${SOURCE:-}" ]]; then
    args+=(--source "$SOURCE")
fi

log "job ${SLURM_JOB_ID:-none} on $(hostname -s): python -m data_prep ${args[*]}"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
python -m data_prep "${args[@]}"
rc=$?
log "data_prep exited with code $rc"
exit "$rc"
