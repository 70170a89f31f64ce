#!/usr/bin/env bash
# Install everything cae-train needs, idempotently:
#   - Debian packages: FFCV's build deps (pkg-config, libturbojpeg, OpenCV), a compiler and venv
#     support; with --test also Slurm and munge for the real-Slurm tests;
#   - the virtual environment .venv/ with the pinned packages of requirements.txt.
# Usage: scripts/setup.sh [--test]. Not root? It prints the apt-get line to run (or see the README's
# conda route) and stops.
set -euo pipefail
cd "$(dirname "$0")/.."

packages=(pkg-config libturbojpeg0-dev libopencv-dev gcc g++ make)
if [[ "${1:-}" == "--test" ]]; then
  packages+=(slurmctld slurmd slurm-client munge)
fi
PYTHON=${PYTHON:-python3}
command -v "$PYTHON" >/dev/null || packages+=(python3)
if command -v "$PYTHON" >/dev/null; then
  "$PYTHON" -c 'import ensurepip, venv' 2>/dev/null || packages+=(python3-venv)
  "$PYTHON" -c 'import os, sysconfig; assert os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h"))' \
    2>/dev/null || packages+=(python3-dev)
fi

missing=()
for package in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" || missing+=("$package")
done
if ((${#missing[@]})); then
  if [[ $(id -u) -ne 0 ]]; then
    echo "setup: missing system packages; run: sudo apt-get install -y ${missing[*]}" >&2
    echo "setup: (no root? use the conda route in README.md)" >&2
    exit 1
  fi
  echo "setup: installing ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  [[ " ${missing[*]} " == *" python3-venv "* || " ${missing[*]} " == *" python3 "* ]] && PYTHON=python3
fi

if [[ ! -x .venv/bin/python ]]; then
  echo "setup: creating .venv with $("$PYTHON" --version)"
  "$PYTHON" -m venv .venv
fi
stamp=.venv/.requirements.sha256
want=$(sha256sum requirements.txt | cut -d' ' -f1)
if [[ "$(cat "$stamp" 2>/dev/null)" != "$want" ]]; then
  echo "setup: installing Python packages from requirements.txt (torch is large: a few minutes the first time)"
  .venv/bin/python -m pip install -q --disable-pip-version-check --upgrade pip
  .venv/bin/python -m pip install -q --disable-pip-version-check -r requirements.txt
  echo "$want" >"$stamp"
fi
echo "setup: ready ($(.venv/bin/python -c 'import ffcv, torch; from importlib.metadata import version; print(", ".join(f"{p} {version(p)}" for p in ("torch", "ffcv", "accelerate", "wandb")))'))"
