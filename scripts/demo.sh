#!/usr/bin/env bash
# The main job (README): a real 2-process L2E pretraining run of the tiny config on CPU through the
# `deepspeed` launcher. Builds the bundled corpus on first use; writes runs/tiny-l2e (checkpoints, TensorBoard,
# config.yaml).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export OMP_NUM_THREADS=1
exec deepspeed --num_gpus 2 --master_port "${MASTER_PORT:-29561}" --module launcher.pretrain --config configs/tiny.yaml "$@"
