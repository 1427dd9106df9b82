"""The MoH layer at TP=1 against the plain-torch equations in tests/reference.py."""

import pytest
import torch

from megatron.core.transformer.enums import AttnBackend
from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

from megatron_moh.router import LOAD_BALANCE_LOSS
from tests.helpers import build_attention, rotary, tiny_config
from tests.reference import RefSettings, reference_load_balance, reference_moh_attention

SEQ, BATCH = 12, 2
FP32_TOL = dict(rtol=1e-5, atol=1e-5)


def _settings(cfg) -> RefSettings:
    return RefSettings(
        heads=cfg.num_attention_heads, groups=cfg.num_query_groups, head_dim=cfg.kv_channels,
        shared=cfg.moh_num_shared_heads, topk=cfg.moh_topk, router=cfg.moh_router,
        gate=cfg.moh_gate, two_stage=cfg.moh_two_stage, norm_eps=cfg.layernorm_epsilon,
    )


def _run_layer(cfg, x, grad_out):
    torch.manual_seed(0)
    attn = build_attention(cfg)
    attn.train()
    with torch.no_grad():  # q/k norms start at 1 and biases at 0: make them matter
        for name, param in attn.named_parameters():
            if name.endswith(("layernorm.weight", "linear_qkv.bias")):
                param.uniform_(0.5, 1.5)
    MoEAuxLossAutoScaler.set_loss_scale(torch.tensor(1.0))
    x = x.clone().requires_grad_(True)
    out, _ = attn(x, attention_mask=None, rotary_pos_emb=rotary(cfg, SEQ))
    (out * grad_out).sum().backward()
    return attn, out, x.grad


# Llama-family options of the attention: Qwen3-style per-head q/k RMSNorm, Qwen2-style q/k/v bias.
FAMILY = {"": {}, "qk-norm": dict(qk_layernorm=True), "qk-norm+qkv-bias": dict(qk_layernorm=True, add_qkv_bias=True)}


@pytest.mark.parametrize(
    "router,gate,two_stage,family",
    [("learned", "weighted", True, ""), ("learned", "weighted", False, ""), ("learned", "binary", False, ""),
     ("query_norm", "binary", False, ""), ("query_norm", "weighted", False, ""),
     ("query_norm", "binary", False, "qk-norm"), ("query_norm", "weighted", False, "qk-norm+qkv-bias"),
     ("learned", "weighted", True, "qk-norm+qkv-bias")],
)
def test_layer_matches_paper_equations(router, gate, two_stage, family):
    """With q/k norms the query-norm router routes on the queries before the norm (moh_attention)."""
    cfg = tiny_config(moh_router=router, moh_gate=gate, moh_two_stage=two_stage, **FAMILY[family])
    torch.manual_seed(1)
    x = torch.randn(SEQ, BATCH, cfg.hidden_size)
    grad_out = torch.randn(SEQ, BATCH, cfg.hidden_size)
    attn, out, x_grad = _run_layer(cfg, x, grad_out)

    layer_params = {"qkv": attn.linear_qkv.weight, "proj": attn.linear_proj.weight}
    if router == "learned":
        layer_params["router"] = attn.router.weight
    if cfg.add_qkv_bias:
        layer_params["qkv_bias"] = attn.linear_qkv.bias
    if cfg.qk_layernorm:
        layer_params.update(q_norm=attn.q_layernorm.weight, k_norm=attn.k_layernorm.weight)
    params = {name: p.detach().clone().requires_grad_(True) for name, p in layer_params.items()}
    x_ref = x.clone().requires_grad_(True)
    settings = _settings(cfg)
    ref_out, _, probs, mask = reference_moh_attention(
        x_ref, params["qkv"], params["proj"], params.get("router"), settings, qkv_bias=params.get("qkv_bias"),
        q_norm=params.get("q_norm"), k_norm=params.get("k_norm"))
    aux = reference_load_balance(probs, mask, settings)
    loss = (ref_out * grad_out).sum() + cfg.moh_load_balance_coeff / cfg.num_layers * aux
    loss.backward()

    torch.testing.assert_close(out, ref_out, **FP32_TOL)
    torch.testing.assert_close(x_grad, x_ref.grad, **FP32_TOL)
    for name, param in layer_params.items():
        torch.testing.assert_close(param.grad, params[name].grad, **FP32_TOL, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("topk", [1, 2, 4])
def test_load_balance_loss_value_and_gradient(topk):
    """The paper's load-balance loss (its reference code's formula, tests/reference.py) for k = 1,
    2 and 4 of 4 routed heads: value, gradient, and the logged value."""
    from megatron_moh.router import moh_metrics_tracker

    cfg = tiny_config(moh_load_balance_coeff=0.5, moh_router="learned", moh_topk=topk)
    torch.manual_seed(2)
    x = torch.randn(SEQ, BATCH, cfg.hidden_size)
    tracker = moh_metrics_tracker()
    tracker.clear()
    attn, _, _ = _run_layer(cfg, x, torch.zeros(SEQ, BATCH, cfg.hidden_size))
    # The LM-side loss is zero here, so every router gradient comes from the balance loss.
    grad = attn.router.weight.grad
    assert grad is not None and grad.abs().sum() > 0
    w = attn.router.weight.detach().clone().requires_grad_(True)
    qkv = attn.linear_qkv.weight.detach()
    _, _, probs, mask = reference_moh_attention(x, qkv, attn.linear_proj.weight.detach(), w, _settings(cfg))
    aux = reference_load_balance(probs, mask, _settings(cfg))
    (cfg.moh_load_balance_coeff / cfg.num_layers * aux).backward()
    torch.testing.assert_close(grad, w.grad, **FP32_TOL)
    recorded = tracker.metrics[LOAD_BALANCE_LOSS].values[0]
    torch.testing.assert_close(recorded, aux.detach(), **FP32_TOL)
    assert aux.item() >= cfg.moh_topk - 1e-5  # uniform routing (the minimum) gives k


def test_all_shared_heads_equal_megatron_self_attention():
    cfg = tiny_config(moh_num_shared_heads=8, moh_topk=0, moh_router="query_norm")
    torch.manual_seed(3)
    x = torch.randn(SEQ, BATCH, cfg.hidden_size, requires_grad=True)
    moh = build_attention(cfg, moh=True)
    dense = build_attention(cfg, moh=False)
    dense.load_state_dict(moh.state_dict(), strict=False)
    rot = rotary(cfg, SEQ)
    out_moh, _ = moh(x, attention_mask=None, rotary_pos_emb=rot)
    out_dense, _ = dense(x, attention_mask=None, rotary_pos_emb=rot)
    assert torch.equal(out_moh, out_dense)
    g = torch.randn_like(out_moh)
    grads_moh = torch.autograd.grad((out_moh * g).sum(), [x, moh.linear_qkv.weight])
    grads_dense = torch.autograd.grad((out_dense * g).sum(), [x, dense.linear_qkv.weight])
    for a, b in zip(grads_moh, grads_dense):
        assert torch.equal(a, b)


@pytest.mark.parametrize("router,gate", [("learned", "weighted"), ("query_norm", "binary")])
def test_head_usage_counts_routing_slots(router, gate):
    """Each routed head's logged share equals the share of (token, top-k slot) pairs whose gate for
    that head is non-zero, counted here from the gates the router returned."""
    cfg = tiny_config(moh_router=router, moh_gate=gate, moh_topk=2)
    torch.manual_seed(4)
    seen = []
    x = torch.randn(SEQ, BATCH, cfg.hidden_size)
    attn = build_attention(cfg)
    attn.train()
    attn.router.register_forward_hook(lambda module, args, gates: seen.append(gates.detach().clone()))
    MoEAuxLossAutoScaler.set_loss_scale(torch.tensor(1.0))
    for _ in range(2):  # usage accumulates over forwards until it is reset
        out, _ = attn(x.clone().requires_grad_(True), attention_mask=None, rotary_pos_emb=rotary(cfg, SEQ))
        out.sum().backward()
        x = torch.randn_like(x)
    chosen = torch.cat([g[..., cfg.moh_num_shared_heads:] != 0 for g in seen]).reshape(-1, cfg.moh_num_routed_heads)
    assert (chosen.sum(-1) == cfg.moh_topk).all()
    expected = chosen.sum(0) / (chosen.shape[0] * cfg.moh_topk)
    usage = attn.router.reset_head_usage()
    torch.testing.assert_close(usage, expected.float(), rtol=0, atol=1e-7)
    assert len(set(expected.tolist())) > 1  # an uneven routing, so a per-head mistake would show
    assert attn.router.tokens_routed.item() == 0 and attn.router.head_usage.sum().item() == 0


def test_binary_gates_are_exactly_zero_or_one():
    from megatron_moh.router import gates_from_logits

    torch.manual_seed(5)
    logits = torch.randn(64, 3, 12, requires_grad=True)
    gates, probs, mask = gates_from_logits(logits, logits, None, None, num_shared=4, topk=3, gate="binary")
    assert torch.equal(gates[..., 4:], mask) and torch.equal(gates[..., :4], torch.ones(64, 3, 4))
    upstream = torch.randn(64, 3, 12)
    (gates[..., 4:] * upstream).sum().backward()
    # Straight-through: the chosen heads' gates pass their gradient to their softmax probabilities,
    # d logits = p * (v - sum(p * v)) with v = mask * upstream; unchosen heads pass nothing.
    p = torch.softmax(logits.detach(), dim=-1)
    v = mask.detach() * upstream
    torch.testing.assert_close(logits.grad, p * (v - (p * v).sum(-1, keepdim=True)), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("layout,seq,sparse", [
    ({}, 1024, False),  # 4 shared + 2 of 4 routed: a quarter of the work skipped, sparse from 2048 tokens
    ({}, 4096, True),
    (dict(moh_num_shared_heads=2, moh_topk=2), 1024, True),  # 2 + 2 of 6: half skipped, from 1024
    (dict(moh_num_shared_heads=2, moh_topk=2), 512, False),
    (dict(moh_num_shared_heads=2, moh_topk=4), 4096, False),  # routed heads busier than half: dense
])
def test_auto_impl_picks_the_core_per_call(layout, seq, sparse, one_thread):
    """--moh-attention-impl auto (the default) runs the head-sparse core on CPU where
    configuration_moh.SPARSE_CROSSOVERS says it is faster, from the sequence length of the call,
    with one torch thread or two."""
    cfg = tiny_config(**layout)
    assert cfg.moh_attention_impl == "auto"
    attention = build_attention(cfg)
    assert attention._head_sparse(torch.empty(seq, 1, 8, 8)) is sparse
    torch.set_num_threads(2)
    assert attention._head_sparse(torch.empty(seq, 1, 8, 8)) is sparse


@pytest.mark.parametrize("settings,training,sparse", [
    (dict(attention_dropout=0.1), True, False),  # the head-sparse core has no attention dropout
    (dict(attention_dropout=0.1), False, True),  # evaluation drops nothing
    (dict(window_size=(64, 0), attention_backend=AttnBackend.unfused), False, False),  # nor a sliding window
])
def test_auto_impl_keeps_dropout_and_windows(settings, training, sparse, one_thread):
    """``auto`` computes every head where the head-sparse core would drop a setting, even where it is faster."""
    attention = build_attention(tiny_config(moh_num_shared_heads=2, moh_topk=2, **settings))
    attention.train(training)
    assert attention._head_sparse(torch.empty(4096, 1, 8, 8)) is sparse


@pytest.mark.parametrize("router", ["learned", "query_norm"])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, dict(rtol=1e-5, atol=1e-5)),
                                       (torch.bfloat16, dict(rtol=2e-2, atol=2e-2))])
def test_head_sparse_layer_equals_dense_layer(router, dtype, tol):
    """Outputs and every gradient of --moh-attention-impl sparse equal the dense path (GQA: 8 heads,
    4 groups; fp32 and bf16 stated separately)."""
    grads = {}
    torch.manual_seed(6)
    x = torch.randn(SEQ, BATCH, 64, dtype=dtype)
    grad_out = torch.randn(SEQ, BATCH, 64, dtype=dtype)
    for impl in ("dense", "sparse"):
        cfg = tiny_config(moh_router=router, moh_attention_impl=impl, params_dtype=dtype, bf16=dtype == torch.bfloat16)
        attn, out, x_grad = _run_layer(cfg, x, grad_out)
        grads[impl] = {"out": out, "x": x_grad, **{n: p.grad for n, p in attn.named_parameters()}}
    assert grads["dense"].keys() == grads["sparse"].keys()
    for name, dense in grads["dense"].items():
        torch.testing.assert_close(grads["sparse"][name].float(), dense.float(), **tol,
                                   msg=lambda m, name=name: f"{name}: {m}")
