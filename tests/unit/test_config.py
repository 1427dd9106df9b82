"""Every impossible MoH setting fails at config time with a one-line message naming the field; the
layout type (`megatron_moh.layout.MoHLayout`) and the Hugging Face config's own copy of it agree."""

import itertools

import pytest

from megatron_moh.arguments import parse_megatron_args
from megatron_moh.config import MoHConfigError
from megatron_moh.hf import configuration_moh
from megatron_moh.layout import ATTENTION_IMPLS, GATES, ROUTERS, MoHLayout
from megatron_moh.specs import ROUTER_CLASSES
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
    (dict(moh_attention_impl="sparse", attention_dropout=0.1), "moh_attention_impl='sparse' has no attention "
                                                               "dropout and no sliding window"),
    (dict(moh_attention_impl="sparse", window_size=(8, 0)), "moh_attention_impl='sparse' has no attention dropout"),
    (dict(fused_single_qkv_rope=True), "the MoH router needs the split queries"),
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


def _hf_layout(heads, **fields):
    try:
        cfg = configuration_moh.MoHLlamaConfig(hidden_size=8 * heads, num_attention_heads=heads, num_hidden_layers=1,
                                               intermediate_size=8, **fields)
    except ValueError:
        return "refused"
    return cfg.moh_num_shared_heads, cfg.moh_topk, cfg.moh_router, cfg.moh_gate, cfg.moh_two_stage


def _megatron_layout(heads, **fields):
    layout = MoHLayout.of(type("Fields", (), fields)).resolved(heads)
    try:
        layout.check(heads)
    except MoHConfigError:
        return "refused"
    return layout.num_shared_heads, layout.topk, layout.router, layout.gate, layout.two_stage


@pytest.mark.parametrize("heads", [1, 2, 3, 4, 8])
def test_hf_config_keeps_the_layouts_defaults_and_refusals(heads):
    """configuration_moh.py travels with exports and cannot import the layout type: its copy fills the
    same defaults and refuses the same layouts, over a grid of head counts and every field set or left
    to its default."""
    shared = sorted({-1, 0, 1, heads // 2, heads - 1, heads, heads + 1})
    grid = itertools.product([None, *shared], [None, 0, 1, 2, heads], ROUTERS, [None, *GATES], [None, False, True])
    outcomes = set()
    for values in grid:
        fields = {name: value for name, value in zip(MoHLayout.field_names(), values) if value is not None}
        hf, megatron = _hf_layout(heads, **fields), _megatron_layout(heads, **fields)
        assert hf == megatron, (fields, hf, megatron)
        outcomes.add(hf == "refused")
    assert outcomes == {True, False}


def test_hf_config_has_the_same_choices():
    assert configuration_moh.MOH_ROUTERS == ROUTERS and configuration_moh.MOH_GATES == GATES
    assert configuration_moh.MOH_ATTENTION_IMPLS == ATTENTION_IMPLS
    assert set(ROUTER_CLASSES) == set(ROUTERS)  # each router has a megatron forward path
    for fields in (dict(moh_router="hash"), dict(moh_gate="soft")):
        assert _hf_layout(8, **fields) == _megatron_layout(8, **fields) == "refused"


@pytest.mark.parametrize("layout", [
    MoHLayout(),
    MoHLayout(num_shared_heads=2, topk=3, router="query_norm"),
    MoHLayout(num_shared_heads=4, topk=2, router="learned", gate="weighted", two_stage=False),
    MoHLayout.preset("dense", 8),
    MoHLayout.preset("published", 8),
])
def test_layout_flags_parse_back_to_the_layout(layout):
    """`MoHLayout.flags` is what `finetune_flags` and the import print: pretrain_moh.py reads the same layout."""
    args = parse_megatron_args(layout.flags(), validate=False)
    assert MoHLayout.of(args) == layout
    assert MoHLayout.of(args).resolved(8) == layout.resolved(8)


def test_layout_of_old_arguments_and_presets():
    """Arguments saved without some layout field (older checkpoints) read as its default."""
    old = type("Saved", (), dict(moh_num_shared_heads=4, moh_topk=2))
    assert MoHLayout.of(old).resolved(8) == MoHLayout(4, 2, "learned", "weighted", True)
    assert MoHLayout.preset("published", 16) == MoHLayout(8, 4, "query_norm", "binary", False)
    dense = MoHLayout.preset("dense", 8)
    assert dense.gates_are_one(8) and not MoHLayout(8, 0, "learned", "weighted", False).gates_are_one(8)
    with pytest.raises(MoHConfigError, match="layout='nope' is unknown"):
        MoHLayout.preset("nope", 8)
