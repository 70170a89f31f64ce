#!/bin/bash
# Prepare CIFAR-10 as FFCV betons on a compute node: runs `python -m data_prep`. Submit from the
# repository root:
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

NAME=slurm/prep.sh
# The repository, found as slurm/train.sh finds it (REPO, the submit folder, this file's parent).
for repo in "${REPO:-${SLURM_SUBMIT_DIR:-$PWD}}" "$(dirname "${BASH_SOURCE[0]}")/.." ""; do [[ -f "$repo/slurm/common.sh" ]] && break; done
[[ -n "$repo" ]] || { echo "[$NAME] error: no repository in ${REPO:-${SLURM_SUBMIT_DIR:-$PWD}}; submit from its root or set REPO=/path/to/repo" >&2 && exit 2; }
# shellcheck source=slurm/common.sh
source "$repo/slurm/common.sh"
# Relative paths in arguments and SOURCE/DATA are relative to the submit folder.
cd "${SLURM_SUBMIT_DIR:-$PWD}" || die "cannot cd to ${SLURM_SUBMIT_DIR:-$PWD}"

activate_python

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
