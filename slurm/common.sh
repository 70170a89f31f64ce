# Sourced by slurm/train.sh and slurm/prep.sh once they have found the repository folder:
#   NAME=slurm/train.sh; repo=/path/to/repo; source "$repo/slurm/common.sh"
# Sets REPO (absolute), defines log/die with the script's name, and activate_python.

log() { echo "[$NAME] $*"; }
die() {
    echo "[$NAME] error: $*" >&2
    exit 2
}

REPO=$(cd "$repo" && pwd) || die "cannot enter $repo"
[[ -f "$REPO/train.py" && -d "$REPO/data_prep" ]] || die "REPO=$REPO is not the cae-train repository (no train.py and data_prep/)"
export REPO

# VENV (default REPO/.venv): a virtual environment, or a prefix with bin/python such as a conda env.
activate_python() {
    VENV=${VENV:-$REPO/.venv}
    if [[ -f "$VENV/bin/activate" ]]; then
        # shellcheck disable=SC1091
        source "$VENV/bin/activate"
    elif [[ -x "$VENV/bin/python" ]]; then
        export PATH="$VENV/bin:$PATH"
    elif [[ "$VENV" != "$REPO/.venv" ]]; then
        die "VENV=$VENV has neither bin/activate nor bin/python"
    fi
}
