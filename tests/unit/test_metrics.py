"""The MoH FLOP count removes exactly the attention core of the heads tokens did not use."""

from argparse import Namespace

from megatron_moh.metrics import moh_flops


def test_moh_flops_subtracts_unused_heads_attention_core():
    args = Namespace(num_attention_heads=16, moh_num_shared_heads=8, moh_topk=4, moh_dense_baseline=False,
                     seq_length=1024, kv_channels=64, num_layers=2)
    dense = 1e15
    got = moh_flops(args, 8, dense_flops=lambda *a: dense)
    # 4 unused heads x 2 layers x 8 samples x s^2 x d x (3 fwd+bwd x 2 FMA x 2 products / 2 causal)
    assert got == dense - 4 * 2 * 8 * 1024**2 * 64 * 6
    args.moh_dense_baseline = True
    assert moh_flops(args, 8, dense_flops=lambda *a: dense) == dense
