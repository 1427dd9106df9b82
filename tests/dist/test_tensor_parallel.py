"""TP=2 and TP=4 (with and without sequence parallelism, with GQA) against TP=1: outputs, loss,
every parameter's gradient, the input gradient, and router weights after optimizer steps; also with
per-head q/k norms (--qk-layernorm) and q/k/v biases (--add-qkv-bias)."""

import pytest
import torch

from tests.launcher import launch

SEQ, BATCH = 16, 2
# fp32 sums split over TP ranks add in another order: a few 1e-5 on gradients of order 10 (measured up to
# 2.4e-5 on qkv_grad at TP=4); a wrong gradient (a gate missing its all-reduce) is off by its own size.
TOL = dict(rtol=1e-5, atol=5e-5)
# The head-sparse path runs torch's flash kernels (online softmax): fp32 sums in another order.
SPARSE_TOL = dict(rtol=1e-4, atol=1e-4)


def _tp_worker(rank, world, cfg_kwargs, sequence_parallel, weights, x, grad_out, steps):
    import torch.distributed as dist

    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    from tests.helpers import build_attention, rotary, tiny_config

    parallel_state.initialize_model_parallel(tensor_model_parallel_size=world)
    model_parallel_cuda_manual_seed(7)
    cfg = tiny_config(**cfg_kwargs, tensor_model_parallel_size=world, sequence_parallel=sequence_parallel)
    attn = build_attention(cfg)
    attn.train()
    with torch.no_grad():
        attn.linear_qkv.weight.copy_(weights["qkv"].chunk(world, dim=0)[rank])
        attn.linear_proj.weight.copy_(weights["proj"].chunk(world, dim=1)[rank])
        if "router" in weights:
            attn.router.weight.copy_(weights["router"])
        if "qkv_bias" in weights:
            attn.linear_qkv.bias.copy_(weights["qkv_bias"].chunk(world, dim=0)[rank])
        if "q_norm" in weights:
            attn.q_layernorm.weight.copy_(weights["q_norm"])
            attn.k_layernorm.weight.copy_(weights["k_norm"])
    MoEAuxLossAutoScaler.set_loss_scale(torch.tensor(1.0))
    rot = rotary(cfg, SEQ)

    def local_tokens(t):
        return t.chunk(world, dim=0)[rank] if sequence_parallel else t

    def gather(t, dim):
        parts = [torch.empty_like(t) for _ in range(world)]
        dist.all_gather(parts, t.contiguous())
        return torch.cat(parts, dim=dim)

    def sync_sequence_parallel_grads():
        # What finalize_model_grads does for params tagged sequence_parallel (router, norms) and,
        # with qk_layernorm, for the q/k norms (each rank saw only its own heads).
        for name, p in attn.named_parameters():
            qk_norm = cfg.qk_layernorm and ("q_layernorm" in name or "k_layernorm" in name)
            if (sequence_parallel and getattr(p, "sequence_parallel", False) or qk_norm) and p.grad is not None:
                dist.all_reduce(p.grad)

    x_local = local_tokens(x).clone().requires_grad_(True)
    out, _ = attn(x_local, attention_mask=None, rotary_pos_emb=rot)
    loss = (out * local_tokens(grad_out)).sum()
    loss.backward()
    sync_sequence_parallel_grads()
    result = {
        "out": gather(out, 0) if sequence_parallel else out,
        "x_grad": gather(x_local.grad, 0) if sequence_parallel else x_local.grad,
        "qkv_grad": gather(attn.linear_qkv.weight.grad, 0),
        "proj_grad": gather(attn.linear_proj.weight.grad, 1),
    }
    if "router" in weights:
        result["router_grad"] = attn.router.weight.grad.clone()
    if "qkv_bias" in weights:
        result["qkv_bias_grad"] = gather(attn.linear_qkv.bias.grad, 0)
    if "q_norm" in weights:
        result["q_norm_grad"] = attn.q_layernorm.weight.grad.clone()
        result["k_norm_grad"] = attn.k_layernorm.weight.grad.clone()

    optimizer = torch.optim.Adam(attn.parameters(), lr=1e-2)
    generator = torch.Generator().manual_seed(11)
    for _ in range(steps):
        optimizer.step()
        optimizer.zero_grad()
        xs = torch.randn(SEQ, BATCH, cfg.hidden_size, generator=generator)
        out, _ = attn(local_tokens(xs), attention_mask=None, rotary_pos_emb=rot)
        # Under SP each rank holds a share of the tokens: shares of a sum add up to the loss.
        (out.square().sum() / xs.numel()).backward()
        sync_sequence_parallel_grads()
    if "router" in weights:
        result["router_after_steps"] = gather(attn.router.weight.detach()[None], 0)
    if "q_norm" in weights:
        result["q_norm_after_steps"] = gather(attn.q_layernorm.weight.detach()[None], 0)
    return result


CASES = [
    # tp, sequence_parallel, router, query groups, attention implementation
    (2, False, "learned", 4, "dense"),
    (2, True, "learned", 4, "dense"),
    (2, True, "query_norm", 4, "dense"),
    (4, False, "query_norm", 2, "dense"),
    (4, True, "learned", 2, "dense"),
    (4, False, "learned", 4, "dense"),
    (2, True, "learned", 4, "sparse"),
    (2, False, "query_norm", 2, "sparse"),
]


@pytest.mark.parametrize("tp,sp,router,groups,impl", CASES)
def test_tensor_parallel_matches_one_process(tp, sp, router, groups, impl):
    """The reference is always one process with the dense (compute-every-head) attention."""
    _check_against_one_process(tp, sp, impl, dict(moh_router=router, num_query_groups=groups))


# tp, sequence_parallel, router, query groups (4: each rank has its own key heads; 2 at TP=4: two
# ranks share a key head, so both add to its k-norm gradient)
QK_NORM_CASES = [(2, False, "query_norm", 4), (2, True, "learned", 4), (4, True, "query_norm", 2)]


@pytest.mark.parametrize("tp,sp,router,groups", QK_NORM_CASES)
def test_qk_layernorm_and_qkv_bias_tensor_parallel_match_one_process(tp, sp, router, groups):
    """Per-head q/k norms (replicated, each rank normalising its own heads) and q/k/v biases."""
    _check_against_one_process(tp, sp, "dense", dict(moh_router=router, num_query_groups=groups,
                                                     qk_layernorm=True, add_qkv_bias=True))


def _check_against_one_process(tp, sp, impl, cfg_kwargs):
    from tests.helpers import tiny_config

    cfg_kwargs = dict(cfg_kwargs, moh_load_balance_coeff=0.1)
    cfg = tiny_config(**cfg_kwargs)
    groups, router = cfg.num_query_groups, cfg.moh_router
    torch.manual_seed(5)
    d_qkv = cfg.kv_channels * (cfg.num_attention_heads + 2 * groups)
    weights = {
        "qkv": torch.randn(d_qkv, cfg.hidden_size) * 0.2,
        "proj": torch.randn(cfg.hidden_size, cfg.kv_channels * cfg.num_attention_heads) * 0.2,
    }
    if router == "learned":
        rows = cfg.moh_num_shared_heads + cfg.moh_num_routed_heads + 2
        weights["router"] = torch.randn(rows, cfg.hidden_size) * 0.5
    if cfg.add_qkv_bias:
        weights["qkv_bias"] = torch.randn(d_qkv) * 0.2
    if cfg.qk_layernorm:
        weights.update(q_norm=torch.rand(cfg.kv_channels) + 0.5, k_norm=torch.rand(cfg.kv_channels) + 0.5)
    x = torch.randn(SEQ, BATCH, cfg.hidden_size)
    grad_out = torch.randn(SEQ, BATCH, cfg.hidden_size)

    (ref,) = launch(_tp_worker, 1, cfg_kwargs, False, weights, x, grad_out, 3)
    results = launch(_tp_worker, tp, dict(cfg_kwargs, moh_attention_impl=impl), sp, weights, x, grad_out, 3)
    for rank, res in enumerate(results):
        for key in ("out", "x_grad", "qkv_grad", "proj_grad", "router_grad", "qkv_bias_grad", "q_norm_grad",
                    "k_norm_grad"):
            if key in ref:
                tol = TOL if impl == "dense" else SPARSE_TOL
                torch.testing.assert_close(res[key], ref[key], **tol,
                                           msg=lambda m, rank=rank, key=key: f"rank {rank} {key}: {m}")
        for key in ("router_after_steps", "q_norm_after_steps"):
            if key in ref:
                after = res[key]
                for other in after[1:]:
                    assert torch.equal(other, after[0]), f"{key}: weights differ across TP ranks"
                torch.testing.assert_close(after[0], ref[key][0], rtol=1e-4, atol=1e-5)
