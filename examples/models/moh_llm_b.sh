# MoH-LLM-B (paper): 24 layers, hidden 1536, FFN 4096, 16 heads x 96, seq 2048, lr 5e-4, warmup 500.
# 8 shared heads + top-4 of 8 routed heads per token = 75% of heads active.
MOH_SHARED=${MOH_SHARED:-8}
MOH_TOPK=${MOH_TOPK:-4}
MODEL_ARGS=(
  --num-layers 24 --hidden-size 1536 --ffn-hidden-size 4096
  --num-attention-heads 16 --kv-channels 96
  --seq-length 2048 --max-position-embeddings 2048
  --lr 5e-4 --min-lr 5e-5 --lr-warmup-iters 500
  --moh-num-shared-heads "$MOH_SHARED" --moh-topk "$MOH_TOPK"
  --moh-router learned --moh-load-balance-coeff 0.01
)
