#!/usr/bin/env bash
# Continue-tune a Hugging Face Llama-3-8B into MoH, the paper's LLM recipe (arXiv 2410.11842,
# MoH-LLaMA3-8B): the parameter-free query-norm router with binary gates, 16 shared heads and the
# top 8 of the 16 routed heads per token (75% of the heads). Five steps, each after the one before:
#
#   export HF_MODEL=/models/Meta-Llama-3-8B TEXT="/data/train-*.jsonl"
#   bash examples/continue_tune/llama3_8b.sh import   # HF weights -> megatron checkpoint (streamed: ~2 GB of RAM)
#   bash examples/continue_tune/llama3_8b.sh data     # text -> indexed dataset, with the model's own tokenizer
#   bash examples/continue_tune/llama3_8b.sh plan     # computed GPU memory of the layout (nothing runs)
#   bash examples/continue_tune/llama3_8b.sh train    # one node here; NODES=4: sbatch, resumes when requeued
#   bash examples/continue_tune/llama3_8b.sh export   # -> Hugging Face directory (trust_remote_code)
#   bash examples/continue_tune/llama3_8b.sh eval     # lm-evaluation-harness on the export
#
# Variables: HF_MODEL (config.json, safetensors, tokenizer.json: Meta's Meta-Llama-3-8B directory),
# TEXT (.jsonl / .txt files), WORK (runs/llama3-8b-moh), NODES (1), TRAIN_TOKENS (10000000000: the paper's
# model recovered over 95% of Llama-3-8B's scores within 10B tokens), GLOBAL_BATCH (512 sequences of 8192
# tokens, 4.2M tokens a step), WORKERS (preprocessing processes, 16), LM_EVAL_TASKS, EXTRA_ARGS.
# Training settings not listed here are examples/common.sh's (AdamW 0.9/0.95, weight decay 0.1, clip 1.0,
# cosine decay, bf16, the distributed optimizer, checkpoints every SAVE_INTERVAL=500 iterations).
# DRY_RUN=1 prints what a step would run (train: pretrain_moh.py's flags, one per line), creating nothing.
set -euo pipefail
cd "$(dirname "$0")/../.."
STEP=${1:?usage: llama3_8b.sh import|data|plan|train|export|eval}
HF_MODEL=${HF_MODEL:?set HF_MODEL to the Hugging Face Llama-3-8B directory}
WORK=${WORK:-runs/llama3-8b-moh}
NODES=${NODES:-1}
TRAIN_TOKENS=${TRAIN_TOKENS:-10000000000}
GLOBAL_BATCH=${GLOBAL_BATCH:-512}
SEQ=8192

# Parallel layout on 8 x 80 GB GPUs per node (STEP=plan prints megatron's memory estimate for it): TP=2 with
# sequence parallelism inside each pair of GPUs, no pipeline, data parallel over the rest; the distributed
# optimizer shards the fp32 state over data-parallel ranks, so more nodes leave room for micro-batches of 2.
TP=${TP:-2}
PP=${PP:-1}
MICRO_BATCH=${MICRO_BATCH:-$([[ "$NODES" -ge 4 ]] && echo 2 || echo 1)}
TRAIN_ITERS=${TRAIN_ITERS:-$(( TRAIN_TOKENS / (GLOBAL_BATCH * SEQ) ))}

run() {  # a step's command, or just its words under DRY_RUN
  if [[ "${DRY_RUN:-0}" == 1 ]]; then printf '%s\n' "$*"; else "$@"; fi
}
train_env=(MODEL=moh_llama3_8b IMPORT_DIR="$WORK/import" DATA_PATH="$WORK/data/text_document"
           TOKENIZER_MODEL="$HF_MODEL" RUN_DIR="$WORK/run" TP="$TP" PP="$PP" MICRO_BATCH="$MICRO_BATCH"
           GLOBAL_BATCH="$GLOBAL_BATCH" TRAIN_ITERS="$TRAIN_ITERS" SAVE_INTERVAL="${SAVE_INTERVAL:-500}"
           EVAL_INTERVAL="${EVAL_INTERVAL:-500}" EXTRA_ARGS="${EXTRA_ARGS:-}")

case "$STEP" in
  import)
    run .venv/bin/python tools/convert_checkpoint.py import-hf --hf "$HF_MODEL" --out "$WORK/import" \
      --layout published --tensor-model-parallel-size "$TP" --pipeline-model-parallel-size "$PP" --dtype bf16 ;;
  data)
    run .venv/bin/python tools/preprocess_data.py --input ${TEXT:?set TEXT to the .jsonl/.txt files} \
      --output-prefix "$WORK/data/text_document" --tokenizer-model "$HF_MODEL" --workers "${WORKERS:-16}" ;;
  plan)  # computes only, also under DRY_RUN
    env "${train_env[@]}" DRY_RUN=1 bash examples/single_node.sh |
      .venv/bin/python examples/continue_tune/memory_plan.py --nodes "$NODES" ;;
  train)
    launcher=examples/single_node.sh
    [[ "$NODES" -gt 1 ]] && launcher=examples/slurm/pretrain_moh.sbatch
    if [[ "${DRY_RUN:-0}" == 1 || "$NODES" -eq 1 ]]; then
      env "${train_env[@]}" bash "$launcher"  # under DRY_RUN it prints the flags
    else
      env "${train_env[@]}" sbatch --nodes "$NODES" "$launcher"
    fi ;;
  export)
    run .venv/bin/python tools/convert_checkpoint.py export-hf --load "$WORK/run/checkpoints" --out "$WORK/hf" ;;
  eval)
    run .venv/bin/lm_eval --model hf --model_args "pretrained=$WORK/hf,trust_remote_code=True,dtype=bfloat16" \
      --tasks "${LM_EVAL_TASKS:-arc_easy,arc_challenge,hellaswag,piqa,winogrande,boolq,openbookqa,sciq,lambada_openai}" \
      --batch_size auto --output_path "$WORK/eval" ;;
  *)
    echo "llama3_8b.sh: error: unknown step '$STEP': use import, data, plan, train, export or eval" >&2; exit 2 ;;
esac
