# Dense baseline of MoH-LLM-S: the same model with megatron-core's multi-head attention.
source "$(dirname "${BASH_SOURCE[0]}")/moh_llm_s.sh"
MODEL_ARGS+=(--moh-dense-baseline)
