#!/usr/bin/env bash
# One node, all its GPUs (or CPU ranks): MODEL=moh_llm_s DATA_PATH=... TOKENIZER_MODEL=... bash examples/single_node.sh
set -euo pipefail
cd "$(dirname "$0")/.."
source examples/common.sh
NPROC=${NPROC:-$(python3 -c 'import torch; print(max(torch.cuda.device_count(), 1))' 2>/dev/null || echo 1)}
exit_if_dry_run
mkdir -p "$RUN_DIR"
.venv/bin/torchrun --standalone --nproc-per-node "$NPROC" pretrain_moh.py \
  "${MODEL_ARGS[@]}" "${TRAIN_ARGS[@]}" 2>&1 | tee -a "$RUN_DIR/train.log"
