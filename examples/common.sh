# Shared by the launch scripts: training recipe (paper: AdamW, wd 0.1, clip 1.0, cosine to 10%),
# data, checkpoints and logs. Override any of these variables in the environment.
: "${MODEL:?set MODEL to one of: $(cd "$(dirname "${BASH_SOURCE[0]}")/models" && ls | sed 's/\.sh$//' | tr '\n' ' ')}"
source "$(dirname "${BASH_SOURCE[0]}")/models/${MODEL}.sh"

DATA_PATH=${DATA_PATH:?set DATA_PATH to a preprocessed prefix (tools/preprocess_data.py) or a blend \"0.7 a 0.3 b\"}
TOKENIZER_MODEL=${TOKENIZER_MODEL:?set TOKENIZER_MODEL to the sentencepiece model (tools/train_tokenizer.py) or a Hugging Face tokenizer directory}
# megatron's name for the tokenizer's kind: a directory is a Hugging Face tokenizer
TOKENIZER_TYPE=${TOKENIZER_TYPE:-$([[ -d "$TOKENIZER_MODEL" ]] && echo HuggingFaceTokenizer || echo GPTSentencePieceTokenizer)}
RUN_DIR=${RUN_DIR:-runs/${MODEL}}
TP=${TP:-1}
PP=${PP:-1}
MICRO_BATCH=${MICRO_BATCH:-4}
GLOBAL_BATCH=${GLOBAL_BATCH:-256}
TRAIN_ITERS=${TRAIN_ITERS:-100000}
SAVE_INTERVAL=${SAVE_INTERVAL:-1000}
EVAL_INTERVAL=${EVAL_INTERVAL:-1000}
LOG_INTERVAL=${LOG_INTERVAL:-10}
PRECISION=${PRECISION---bf16}   # e.g. "--bf16 --fp8-format hybrid --fp8-recipe delayed" with Transformer Engine; empty: fp32
EXTRA_ARGS=${EXTRA_ARGS:-}      # more pretrain_moh.py flags, last, so they override the ones above

TRAIN_ARGS=(
  --tensor-model-parallel-size "$TP" --pipeline-model-parallel-size "$PP"
  --use-distributed-optimizer
  --micro-batch-size "$MICRO_BATCH" --global-batch-size "$GLOBAL_BATCH" --train-iters "$TRAIN_ITERS"
  --lr-decay-style cosine --weight-decay 0.1 --adam-beta1 0.9 --adam-beta2 0.95 --clip-grad 1.0
  $PRECISION
  --data-path $DATA_PATH --split 989,10,1
  --tokenizer-type "$TOKENIZER_TYPE" --tokenizer-model "$TOKENIZER_MODEL"
  --save "$RUN_DIR/checkpoints" --load "$RUN_DIR/checkpoints" --save-interval "$SAVE_INTERVAL" --ckpt-format torch_dist
  --eval-interval "$EVAL_INTERVAL" --eval-iters 20 --log-interval "$LOG_INTERVAL"
  --tensorboard-dir "$RUN_DIR/tensorboard" --log-timers-to-tensorboard  # iteration time, TFLOP/s: tools/compare_runs.py
  --exit-signal-handler
)
[[ "$TP" -gt 1 ]] && TRAIN_ARGS+=(--sequence-parallel)
TRAIN_ARGS+=($EXTRA_ARGS)

# DRY_RUN=1 prints the pretrain_moh.py arguments, one per line, and exits before anything is
# created or launched (tests use it).
exit_if_dry_run() {
  if [[ "${DRY_RUN:-0}" == 1 ]]; then
    printf '%s\n' "${MODEL_ARGS[@]}" "${TRAIN_ARGS[@]}"
    exit 0
  fi
}
