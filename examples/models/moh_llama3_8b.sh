# Meta-Llama-3-8B continued as MoH (examples/continue_tune/llama3_8b.sh): the shape, RoPE base, context
# and vocabulary padding of Meta's config.json (32 layers, hidden 4096, FFN 14336, 32 heads x 128 with
# 8 KV groups, rope_theta 500000, 8192 positions, 128,256 ids), the paper's MoH-LLaMA3-8B layout
# (query-norm router, binary gates, 16 shared + top-8 of 16 routed heads = 75% active), and a
# continue-training learning rate (ours, not the paper's: it does not publish one).
# tests/unit/test_examples.py checks that these flags build exactly the model import-hf writes.
IMPORT_DIR=${IMPORT_DIR:?set IMPORT_DIR to the checkpoint that import-hf wrote (examples/continue_tune/llama3_8b.sh import)}
MOH_SHARED=${MOH_SHARED:-16}
MOH_TOPK=${MOH_TOPK:-8}
MODEL_ARGS=(
  --num-layers 32 --hidden-size 4096 --ffn-hidden-size 14336
  --num-attention-heads 32 --group-query-attention --num-query-groups 8 --kv-channels 128
  --norm-epsilon 1e-5 --seq-length 8192 --max-position-embeddings 8192 --rotary-base 500000
  --make-vocab-size-divisible-by 128 --recompute-granularity selective
  --lr 2e-5 --min-lr 2e-6 --lr-warmup-iters 100
  --moh-num-shared-heads "$MOH_SHARED" --moh-topk "$MOH_TOPK" --moh-router query_norm --moh-gate binary
  --no-moh-two-stage
  --pretrained-checkpoint "$IMPORT_DIR"  # the first launch fine-tunes from it; requeues resume from --load
)
