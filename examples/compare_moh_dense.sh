#!/usr/bin/env bash
# Dense attention vs MoH at 75% and 50% active heads, with the same seed, data and token budget,
# then the two analysis tools: tools/compare_runs.py (losses, load balance, throughput) and
# tools/analyze_heads.py (which heads the routers pick on prose and on code).
#
#   bash examples/compare_moh_dense.sh          # CPU: the built-in tiny model and corpus (minutes)
#   MODEL=moh_llm_s DATA_PATH=data/corpus_text_document TOKENIZER_MODEL=tok.model TRAIN_ITERS=20000 \
#       bash examples/compare_moh_dense.sh      # GPUs: a paper model through examples/single_node.sh
#
# Variables: OUT (default runs/compare: one directory per run, compare/, heads_moh75/, heads_moh50/),
# TRAIN_ITERS, ANALYSIS_TOKENS (tokens per dataset for the head analysis, default 32768),
# ANALYSIS_DATA (NAME=SOURCE ... for the head analysis; default: the training corpus as "prose" and
# Python's asyncio sources as "code"), PYTHON (default .venv/bin/python); with MODEL, everything
# examples/single_node.sh reads (TP, PP, GLOBAL_BATCH, PRECISION, ...). 75% active heads: H/2
# shared + top-H/4 of the other H/2; 50%: H/4 shared + top-H/4 of the other 3H/4. DRY_RUN=1 prints
# each run's pretrain_moh.py flags after a "# NAME" line and creates nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
OUT=${OUT:-runs/compare}
ANALYSIS_TOKENS=${ANALYSIS_TOKENS:-32768}
DRY_RUN=${DRY_RUN:-0}

if [[ -z "${MODEL:-}" ]]; then
  # The built-in tiny preset (8 heads) on the built-in corpus: pretrain_moh.py's defaults.
  TRAIN_ITERS=${TRAIN_ITERS:-300}
  HEADS=8
  train() {  # NAME FLAGS...
    local name=$1; shift
    local flags=(--train-iters "$TRAIN_ITERS" --seed 1234 --eval-interval 50
                 --save "$OUT/$name/checkpoints" --save-interval "$TRAIN_ITERS"
                 --tensorboard-dir "$OUT/$name/tensorboard" --log-timers-to-tensorboard "$@")
    if [[ "$DRY_RUN" == 1 ]]; then printf '# %s\n' "$name"; printf '%s\n' "${flags[@]}"; return; fi
    mkdir -p "$OUT/$name"
    echo "compare_moh_dense.sh: training $name ($OUT/$name/train.log)"
    "$PYTHON" pretrain_moh.py "${flags[@]}" > "$OUT/$name/train.log" 2>&1
  }
  train dense --moh-dense-baseline
  train moh75 --moh-num-shared-heads $((HEADS / 2)) --moh-topk $((HEADS / 4))
  train moh50 --moh-num-shared-heads $((HEADS / 4)) --moh-topk $((HEADS / 4))
else
  [[ "$MODEL" == moh_* ]] || { echo "compare_moh_dense.sh: error: MODEL must be an MoH model (moh_llm_s, moh_llm_b)" >&2; exit 2; }
  HEADS=$(DRY_RUN=1 bash examples/single_node.sh | grep -x -A1 -- --num-attention-heads | tail -1)
  export TRAIN_ITERS=${TRAIN_ITERS:-20000}
  train() {  # NAME VAR=VALUE...: examples/single_node.sh into $OUT/NAME
    local name=$1; shift
    [[ "$DRY_RUN" == 1 ]] && printf '# %s\n' "$name"
    env "$@" RUN_DIR="$OUT/$name" bash examples/single_node.sh
  }
  train dense MODEL="dense_${MODEL#moh_}"
  train moh75 MOH_SHARED=$((HEADS / 2)) MOH_TOPK=$((HEADS / 4))
  train moh50 MOH_SHARED=$((HEADS / 4)) MOH_TOPK=$((HEADS / 4))
fi
[[ "$DRY_RUN" == 1 ]] && exit 0

"$PYTHON" tools/compare_runs.py "$OUT/dense" "$OUT/moh75" "$OUT/moh50" --out "$OUT/compare"

if [[ -z "${ANALYSIS_DATA:-}" ]]; then
  # The prose the models learnt from (the last prefix of a blend) next to code: each asyncio
  # source file of this Python is one document.
  PROSE=${DATA_PATH:-$("$PYTHON" -c 'from megatron_moh.data.corpus import prepare_builtin_dataset as p; print(p()[0])')}
  "$PYTHON" - "$OUT/code.jsonl" <<'PY'
import json, pathlib, sys, sysconfig
sources = sorted(pathlib.Path(sysconfig.get_paths()["stdlib"], "asyncio").glob("*.py"))
pathlib.Path(sys.argv[1]).write_text("".join(json.dumps({"text": p.read_text()}) + "\n" for p in sources))
PY
  ANALYSIS_DATA="prose=${PROSE##* } code=$OUT/code.jsonl"
fi
for name in moh75 moh50; do
  # shellcheck disable=SC2086 # ANALYSIS_DATA is a list of NAME=SOURCE words
  "$PYTHON" tools/analyze_heads.py --load "$OUT/$name/checkpoints" --data $ANALYSIS_DATA \
    --tokens "$ANALYSIS_TOKENS" --out "$OUT/heads_$name" --no-progress
done
