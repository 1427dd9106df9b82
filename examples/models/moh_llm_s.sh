# MoH-LLM-S (paper): 12 layers, hidden 768, FFN 2048, 12 heads x 64, seq 2048, lr 3e-4, warmup 2000.
# 6 shared heads + top-3 of 6 routed heads per token = 75% of heads active (MOH_TOPK=0 / SHARED=12: dense).
MOH_SHARED=${MOH_SHARED:-6}
MOH_TOPK=${MOH_TOPK:-3}
MODEL_ARGS=(
  --num-layers 12 --hidden-size 768 --ffn-hidden-size 2048
  --num-attention-heads 12 --kv-channels 64
  --seq-length 2048 --max-position-embeddings 2048
  --lr 3e-4 --min-lr 3e-5 --lr-warmup-iters 2000
  --moh-num-shared-heads "$MOH_SHARED" --moh-topk "$MOH_TOPK"
  --moh-router learned --moh-load-balance-coeff 0.01
)
