#!/usr/bin/env bash
# Multi-node launch with torchrun's c10d rendezvous. Run the same command on every node:
#   NNODES=2 NODE_RANK=<0|1> MASTER_ADDR=<node 0 address> bash examples/launch_torchrun.sh examples/RECIPE.yaml [key=value ...]
set -euo pipefail
recipe=$1; shift
torchrun --nnodes "${NNODES:-1}" --nproc-per-node "${GPUS_PER_NODE:-8}" \
  --rdzv-backend c10d --rdzv-endpoint "${MASTER_ADDR:-127.0.0.1}:${MASTER_PORT:-29500}" --rdzv-id "${RDZV_ID:-longpo}" \
  -m megatron_longpo.train --config "$recipe" "$@"
