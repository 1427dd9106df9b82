"""A --load whose MoE layout differs from the run's is refused; the same layout written two ways
(an MoE frequency or its 0/1 list; MoE settings of a model without experts) is not."""

from argparse import Namespace

from megatron_moh.checkpoint import compare_model_args

DENSE = dict(num_layers=4, hidden_size=64, num_attention_heads=8, num_experts=None, moe_ffn_hidden_size=None,
             moe_layer_freq=1, moe_router_topk=2, moe_shared_expert_intermediate_size=None,
             moe_shared_expert_gate=False)
MOE = dict(DENSE, num_experts=4, moe_ffn_hidden_size=32)


def test_same_moe_layout_written_two_ways_loads():
    assert compare_model_args(Namespace(**MOE), Namespace(**dict(MOE, moe_layer_freq=[1, 1, 1, 1]))) == []
    assert compare_model_args(Namespace(**dict(MOE, moe_layer_freq=2)),
                              Namespace(**dict(MOE, moe_layer_freq=[1, 0, 1, 0]))) == []
    assert compare_model_args(Namespace(**DENSE), Namespace(**dict(DENSE, moe_router_topk=4))) == []


def test_other_moe_layout_is_refused():
    assert compare_model_args(Namespace(**DENSE), Namespace(**MOE)) == [
        "num_experts=None in the checkpoint but 4 here", "moe_ffn_hidden_size=None in the checkpoint but 32 here",
        "moe_layer_freq=None in the checkpoint but [1, 1, 1, 1] here",
        "moe_router_topk=None in the checkpoint but 2 here"]
    assert compare_model_args(Namespace(**MOE), Namespace(**dict(MOE, moe_layer_freq=2))) == [
        "moe_layer_freq=[1, 1, 1, 1] in the checkpoint but [1, 0, 1, 0] here"]
    assert compare_model_args(Namespace(**MOE), Namespace(**dict(MOE, moe_shared_expert_intermediate_size=64))) == [
        "moe_shared_expert_intermediate_size=None in the checkpoint but 64 here"]
