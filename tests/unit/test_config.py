"""Every impossible MoH setting fails at config time with a one-line message naming the field."""

import pytest

from megatron_moh.config import MoHConfigError
from tests.helpers import tiny_config

CASES = [
    (dict(tensor_model_parallel_size=3), "num_attention_heads=8 is not divisible by tensor_model_parallel_size=3"),
    (dict(num_query_groups=3), "num_query_groups=3 does not divide num_attention_heads=8"),
    (dict(num_query_groups=4, num_attention_heads=12, moh_num_shared_heads=4, tensor_model_parallel_size=6),
     "num_query_groups=4 and tensor_model_parallel_size=6 must divide one another"),
    (dict(moh_topk=5), "moh_topk=5 must be between 0 and the 4 routed heads"),
    (dict(moh_num_shared_heads=8, moh_topk=1), "moh_num_shared_heads=8 leaves no routed heads"),
    (dict(moh_num_shared_heads=9, moh_topk=0), "moh_num_shared_heads=9 is more than num_attention_heads=8"),
    (dict(moh_num_shared_heads=-1), "moh_num_shared_heads=-1 is negative"),
    (dict(moh_topk=0), "moh_topk=0 leaves the 4 routed heads unused"),
    (dict(moh_load_balance_coeff=-0.1), "moh_load_balance_coeff=-0.1 is negative"),
    (dict(moh_router="hash"), "moh_router='hash' is unknown"),
    (dict(moh_gate="soft"), "moh_gate='soft' is unknown"),
    (dict(moh_attention_impl="flash"), "moh_attention_impl='flash' is unknown"),
    (dict(moh_router="query_norm", moh_two_stage=True), "moh_two_stage needs moh_router='learned'"),
    (dict(moh_num_shared_heads=0, moh_two_stage=True), "moh_two_stage weighs shared against routed heads"),
    (dict(moh_router="query_norm", moh_num_shared_heads=7, moh_topk=1), "needs at least 2 routed heads"),
    (dict(context_parallel_size=2), "does not support context parallelism"),
]


@pytest.mark.parametrize("overrides,message", CASES)
def test_bad_setting_is_one_clear_line(overrides, message):
    with pytest.raises(MoHConfigError) as err:
        tiny_config(**overrides)
    text = str(err.value)
    assert message in text
    assert "\n" not in text and ":" in text  # one line: what is wrong, then how to fix it


def test_defaults_follow_the_paper():
    cfg = tiny_config()
    assert (cfg.moh_num_shared_heads, cfg.moh_topk) == (4, 2)  # 50% shared, 25% routed-active
    assert (cfg.moh_router, cfg.moh_gate, cfg.moh_two_stage) == ("learned", "weighted", True)
    assert cfg.moh_load_balance_coeff == 0.01
    qn = tiny_config(moh_router="query_norm")
    assert (qn.moh_gate, qn.moh_two_stage) == ("binary", False)
    dense = tiny_config(moh_num_shared_heads=8)
    assert dense.moh_topk == 0 and dense.moh_two_stage is False
