#!/usr/bin/env bash
# The main job: set up, turn CIFAR-10 into FFCV betons, train the study's recipe.
#   CIFAR_SOURCE  where CIFAR-10 is: an image folder, cifar-10-python.tar.gz or cifar-10-batches-py/;
#                 empty: download with torchvision (needs internet). Default: ../shared/data/cifar10-jpeg
#                 if it exists.
#   DATA, OUT     the prepared data and the run folder (default data/cifar10, runs/cifar10)
#   EPOCHS        default 100 (the study's recipe); GPUS: how many GPUs to use (default: all)
# Extra arguments go to train.py, e.g. scripts/train.sh --max-steps 500 --wandb-mode offline.
# Rerunning resumes the run in $OUT.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh

default_source=../shared/data/cifar10-jpeg
CIFAR_SOURCE=${CIFAR_SOURCE-$([[ -d $default_source ]] && echo "$default_source" || true)}
DATA=${DATA:-data/cifar10}
OUT=${OUT:-runs/cifar10}
EPOCHS=${EPOCHS:-100}

.venv/bin/python -m data_prep --out "$DATA" ${CIFAR_SOURCE:+--source "$CIFAR_SOURCE"}

GPUS=${GPUS:-$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)}
if [[ ${GPUS:-0} -gt 0 ]]; then
  launch=(--config_file accelerate_config.yaml --num_processes "$GPUS")
else
  launch=(--cpu --mixed_precision no --num_processes 1 --num_machines 1 --dynamo_backend no)
fi
exec .venv/bin/accelerate launch "${launch[@]}" train.py --data "$DATA" --out "$OUT" --epochs "$EPOCHS" "$@"
