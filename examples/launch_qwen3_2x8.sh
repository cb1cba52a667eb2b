#!/usr/bin/env bash
# Qwen3-8B -> Qwen3-1.7B OPRD on 2 training nodes x 8 GPUs, rollouts on a separate SGLang node
# (documented example; not run in CI). Config: examples/qwen3_1.7b_from_8b_2x8.yaml.
#
#   ROLE=rollout ./examples/launch_qwen3_2x8.sh          # on the rollout node (rollout-head)
#   ROLE=train NODE_RANK=0 ./examples/launch_qwen3_2x8.sh  # on train-node-0 (HEAD)
#   ROLE=train NODE_RANK=1 ./examples/launch_qwen3_2x8.sh  # on train-node-1
#
# Paths (/models, /data, /checkpoints, /logs) must be visible on every training node; the
# rollout node needs /models/Qwen3-1.7B. The trainer attaches to the router, checks every
# worker's /health before building any model, and pushes weights to the workers over NCCL
# (rollout.weight_sync.distributed.master_address must be train-node-0 as the workers see it).
set -euo pipefail

ROLE="${ROLE:?set ROLE=rollout or ROLE=train}"
HEAD="${HEAD:-train-node-0}"
CONFIG="${CONFIG:-examples/qwen3_1.7b_from_8b_2x8.yaml}"

case "$ROLE" in
  rollout)
    # Four SGLang workers (TP2 each) on the node's 8 GPUs, behind one router on port 30000.
    for i in 0 1 2 3; do
      CUDA_VISIBLE_DEVICES=$((2 * i)),$((2 * i + 1)) python -m sglang.launch_server \
        --model-path /models/Qwen3-1.7B --tp-size 2 --host 0.0.0.0 --port $((30001 + i)) \
        --mem-fraction-static 0.85 > "sglang-$i.log" 2>&1 &
    done
    python -m sglang_router.launch_router --host 0.0.0.0 --port 30000 \
      --worker-urls http://rollout-head:30001 http://rollout-head:30002 \
      http://rollout-head:30003 http://rollout-head:30004
    ;;
  train)
    # --log-dir: without it torchrun leaves a /tmp/torchelastic_* folder per launch.
    torchrun --nnodes 2 --node-rank "${NODE_RANK:?set NODE_RANK=0 or 1}" --nproc-per-node 8 \
      --master-addr "$HEAD" --master-port 29500 --log-dir "${LOG_DIR:-runs/torchrun-logs}" \
      -m oprd_mega.train --config "$CONFIG" "$@"
    ;;
  *)
    echo "ROLE must be rollout or train" >&2
    exit 2
    ;;
esac
