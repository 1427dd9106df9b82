"""head_sparse_attention against dense gated causal attention written in plain torch.

Tolerances: fp32 inputs, atol = rtol = 1e-5 on the output and on every gradient; bf16 inputs,
relative error (norm of the difference / norm of the reference) at most 2e-2 against the same
bf16 values evaluated in fp32. Gate gradients are compared where the gate is nonzero; where a
routed gate is 0 the sparse path returns 0 by design (see megatron_moh/sparse_attention.py).
"""

import math

import pytest
import torch

from megatron_moh.moh_attention import gate_heads
from megatron_moh.router import gates_from_logits
from megatron_moh import sparse_attention
from megatron_moh.sparse_attention import SparsePlan, head_sparse_attention

FP32_TOL = dict(atol=1e-5, rtol=1e-5)
BF16_REL_TOL = 2e-2


def dense_reference(query, key, value, gates, scale=None):
    """Causal softmax attention over every head (GQA by repeating key/value groups), then gates."""
    s, b, hp, d = query.shape
    per_group = hp // key.shape[2]
    key = key.repeat_interleave(per_group, dim=2)
    value = value.repeat_interleave(per_group, dim=2)
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    scores = torch.einsum("sbhd,tbhd->bhst", query, key) * scale
    future = torch.ones(s, s, dtype=torch.bool, device=query.device).triu(1)
    weights = torch.softmax(scores.masked_fill(future, float("-inf")), dim=-1)
    heads = torch.einsum("bhst,tbhd->sbhd", weights, value)
    return (heads * gates.unsqueeze(-1).to(heads.dtype)).reshape(s, b, hp * d)


def make_gates(s, b, shared, routed, topk, kind, generator, force_none=None, force_all=None):
    """Gates [s, b, shared + routed]: shared heads always on, ``topk`` random routed heads per
    token; ``force_none`` / ``force_all`` name a routed head no token / every token chooses."""
    scores = torch.rand(s, b, routed, generator=generator)
    if force_none is not None:
        scores[..., force_none] = -1.0
    if force_all is not None:
        scores[..., force_all] = 2.0
    mask = torch.zeros(s, b, routed).scatter_(-1, scores.topk(topk, dim=-1).indices, 1.0)
    if kind == "binary":
        return torch.cat([torch.ones(s, b, shared), mask], dim=-1)
    weights = 0.5 + torch.rand(s, b, shared + routed, generator=generator)
    return weights * torch.cat([torch.ones(s, b, shared), mask], dim=-1)


def sparse_fn(shared, **kwargs):
    """head_sparse_attention with ``shared`` dense heads, called like dense_reference."""
    return lambda *x: head_sparse_attention(*x, num_dense_heads=shared, **kwargs)


def run(fn, inputs, grad_out):
    """Output and gradients w.r.t. every input of ``fn(*inputs)``, on fresh leaves (an input the
    output does not depend on, like the queries when no row is computed, gets zeros)."""
    leaves = [x.detach().clone().requires_grad_(True) for x in inputs]
    out = fn(*leaves)
    (out.float() * grad_out).sum().backward()
    return [out.detach()] + [torch.zeros_like(x) if x.grad is None else x.grad for x in leaves]


def random_inputs(s, b, hp, g, d, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(s, b, hp, d, generator=gen)
    k = torch.randn(s, b, g, d, generator=gen)
    v = torch.randn(s, b, g, d, generator=gen)
    grad_out = torch.randn(s, b, hp * d, generator=gen)
    return [t.to(dtype) for t in (q, k, v)], grad_out, gen


def compare(gates, sparse, dense, shared, check):
    """Check output, query/key/value gradients, and gate gradients where the gate is nonzero."""
    names = ["output", "query grad", "key grad", "value grad"]
    for name, a, b in zip(names, sparse[:4], dense[:4]):
        check(a, b, name)
    nonzero = gates != 0
    check(sparse[4][nonzero], dense[4][nonzero], "gate grad (nonzero gates)")
    routed_zero = ~nonzero
    routed_zero[..., :shared] = False
    assert torch.all(sparse[4][routed_zero] == 0), "gate grad must be 0 on skipped rows"


def fp32_check(a, b, name):
    torch.testing.assert_close(a, b, **FP32_TOL, msg=lambda m: f"{name}: {m}")


CASES = [
    # s, b, heads, groups, d, shared, topk, gate kind
    (13, 2, 8, 8, 16, 4, 2, "weighted"),  # plain multi-head attention
    (17, 2, 8, 2, 16, 3, 2, "binary"),  # GQA, shared heads end inside a key/value group
    (16, 1, 6, 1, 8, 0, 3, "weighted"),  # multi-query attention, every head routed
    (70, 2, 8, 4, 16, 2, 3, "binary"),  # several row chunks per head
    (150, 1, 4, 2, 8, 1, 2, "weighted"),  # ~100 rows per routed head: two 64-row chunks
]


# How lanes (one routed head of one sequence) are computed. Tiny test sequences split a chunk's
# keys into an unmasked prefix and a masked band (CPU) whenever a prefix exists.
LAYOUTS = {
    "default": SparsePlan(min_split_prefix=1),
    # every lane packed; many chunks, lanes dropping out
    "small_chunks": SparsePlan(chunk_rows=3, whole_lane_fraction=2.0, min_split_prefix=1),
    # the same, one masked SDPA call per chunk (the path off the CPU)
    "small_chunks_one_call": SparsePlan(chunk_rows=3, whole_lane_fraction=2.0, split_keys=False),
    # every non-empty lane through the causal kernel
    "all_whole": SparsePlan(whole_lane_fraction=0.0, min_split_prefix=1),
    # busy lanes whole, the rest packed (both kinds in most cases)
    "mixed": SparsePlan(chunk_rows=5, whole_lane_fraction=0.45, min_split_prefix=1),
}


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("s,b,hp,g,d,shared,topk,kind", CASES)
def test_fp32_matches_dense(s, b, hp, g, d, shared, topk, kind, layout):
    (q, k, v), grad_out, gen = random_inputs(s, b, hp, g, d)
    gates = make_gates(s, b, shared, hp - shared, topk, kind, gen)
    sparse = run(sparse_fn(shared, plan=LAYOUTS[layout]), [q, k, v, gates], grad_out)
    dense = run(dense_reference, [q, k, v, gates], grad_out)
    compare(gates, sparse, dense, shared, fp32_check)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("kind", ["weighted", "binary"])
def test_uneven_loads(kind, layout):
    """A routed head no token chose (skipped) and one every token chose (all rows), in GQA."""
    s, b, hp, g, d, shared = 40, 2, 8, 4, 16, 2
    (q, k, v), grad_out, gen = random_inputs(s, b, hp, g, d, seed=1)
    gates = make_gates(s, b, shared, hp - shared, 2, kind, gen, force_none=1, force_all=4)
    # batch element 1: a different load pattern, one token with no routed head at all.
    gates[:, 1, shared:] = 0
    gates[: s // 2, 1, shared + 1] = 1.0
    gates[s // 2 + 1 :, 1, shared + 3] = 1.0
    sparse = run(sparse_fn(shared, plan=LAYOUTS[layout]), [q, k, v, gates], grad_out)
    dense = run(dense_reference, [q, k, v, gates], grad_out)
    compare(gates, sparse, dense, shared, fp32_check)


@pytest.mark.parametrize("shared", [0, 3, 8])
def test_no_routed_rows_and_all_dense(shared):
    """Every routed gate 0 (the routed part is skipped); all heads shared; custom scale."""
    s, b, hp, g, d = 11, 2, 8, 2, 8
    (q, k, v), grad_out, _ = random_inputs(s, b, hp, g, d, seed=2)
    gates = torch.zeros(s, b, hp)
    gates[..., :shared] = 1.5
    fn = lambda *x: head_sparse_attention(*x, num_dense_heads=shared, softmax_scale=0.3)
    sparse = run(fn, [q, k, v, gates], grad_out)
    dense = run(lambda *x: dense_reference(*x, scale=0.3), [q, k, v, gates], grad_out)
    compare(gates, sparse, dense, shared, fp32_check)


@pytest.mark.parametrize("layout", ["default", "mixed", "small_chunks", "small_chunks_one_call"])
@pytest.mark.parametrize("kind", ["weighted", "binary"])
def test_bf16_matches_dense(kind, layout):
    s, b, hp, g, d, shared = 48, 2, 8, 2, 32, 4
    (q, k, v), grad_out, gen = random_inputs(s, b, hp, g, d, dtype=torch.bfloat16, seed=3)
    gates = make_gates(s, b, shared, hp - shared, 2, kind, gen, force_none=0)
    sparse = run(sparse_fn(shared, plan=LAYOUTS[layout]), [q, k, v, gates], grad_out)
    assert sparse[0].dtype == torch.bfloat16
    dense = run(dense_reference, [q.float(), k.float(), v.float(), gates], grad_out)

    def check(a, b, name):
        rel = ((a.float() - b).norm() / b.norm()).item()
        assert rel <= BF16_REL_TOL, f"{name}: relative error {rel:.3g} > {BF16_REL_TOL}"

    compare(gates, sparse, dense, shared, check)


def megatron_dense(query, key, value, gates):
    """megatron-core's DotProductAttention (the MoH layer's dense core) followed by gate_heads."""
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType
    from tests.helpers import tiny_config

    s, b, hp, d = query.shape
    cfg = tiny_config(num_attention_heads=hp, num_query_groups=key.shape[2], hidden_size=hp * d,
                      moh_num_shared_heads=hp // 2, moh_topk=1)
    core = DotProductAttention(cfg, layer_number=1, attn_mask_type=AttnMaskType.causal,
                               attention_type="self")
    return gate_heads(core(query, key, value, None, attn_mask_type=AttnMaskType.causal), gates)


def test_matches_megatron_dense_core():
    """Same heads-to-groups mapping and result as the dense path MoHSelfAttention runs."""
    s, b, hp, g, d, shared = 12, 2, 8, 4, 8, 4
    (q, k, v), grad_out, gen = random_inputs(s, b, hp, g, d, seed=4)
    gates = make_gates(s, b, shared, hp - shared, 2, "weighted", gen)
    sparse = run(sparse_fn(shared), [q, k, v, gates], grad_out)
    dense = run(megatron_dense, [q, k, v, gates], grad_out)
    compare(gates, sparse, dense, shared, fp32_check)


@pytest.mark.parametrize("gate,two_stage",
                         [("weighted", True), ("weighted", False), ("binary", False)])
def test_end_to_end_through_router_gradients_exact(gate, two_stage):
    """Through megatron_moh's gate function the unchosen gates carry no gradient, so the router
    logits' gradients (and q, k, v's) are exact even though skipped gates get gradient 0."""
    s, b, hp, g, d, shared, topk = 20, 2, 8, 4, 16, 2, 2
    routed = hp - shared
    (q, k, v), grad_out, gen = random_inputs(s, b, hp, g, d, seed=5)
    num_logits = (shared if gate == "weighted" else 0) + routed + (2 if two_stage else 0)
    logits = torch.randn(s, b, num_logits, generator=gen)

    def layer(attention):
        def fn(query, key, value, router_logits):
            shared_logits = router_logits[..., :shared] if gate == "weighted" else None
            start = shared if gate == "weighted" else 0
            routed_logits = router_logits[..., start : start + routed]
            stage_logits = router_logits[..., -2:] if two_stage else None
            gates, _, _ = gates_from_logits(router_logits, routed_logits, shared_logits,
                                            stage_logits, shared, topk, gate)
            return attention(query, key, value, gates)
        return fn

    sparse = run(layer(sparse_fn(shared)), [q, k, v, logits], grad_out)
    dense = run(layer(dense_reference), [q, k, v, logits], grad_out)
    for name, a, b in zip(["output", "query grad", "key grad", "value grad", "router logit grad"],
                          sparse, dense):
        fp32_check(a, b, name)


def test_rejects_bad_shapes():
    q = torch.zeros(4, 1, 6, 8)
    kv3, kv4 = torch.zeros(4, 1, 3, 8), torch.zeros(4, 1, 4, 8)
    with pytest.raises(ValueError, match="g dividing"):
        head_sparse_attention(q, kv4, kv4, torch.ones(4, 1, 6), 2)
    with pytest.raises(ValueError, match="gates"):
        head_sparse_attention(q, kv3, kv3, torch.ones(4, 1, 5), 2)
    with pytest.raises(ValueError, match="num_dense_heads"):
        head_sparse_attention(q, kv3, kv3, torch.ones(4, 1, 6), 7)


@pytest.mark.skipif(sparse_attention._FLASH_CPU is None, reason="this torch has no CPU flash ops")
def test_cpu_prefix_band_split_is_exercised(monkeypatch):
    """The layouts above reach the two-call (prefix + masked band) path on CPU."""
    calls = []
    apply = sparse_attention._PrefixBandAttention.apply
    monkeypatch.setattr(sparse_attention._PrefixBandAttention, "apply",
                        lambda *a: calls.append(a[1].shape[2]) or apply(*a))
    s, b, hp, g, d, shared = 40, 2, 8, 4, 16, 2
    (q, k, v), grad_out, gen = random_inputs(s, b, hp, g, d, seed=6)
    gates = make_gates(s, b, shared, hp - shared, 2, "binary", gen)
    sparse = run(sparse_fn(shared, plan=LAYOUTS["small_chunks"]), [q, k, v, gates], grad_out)
    dense = run(dense_reference, [q, k, v, gates], grad_out)
    compare(gates, sparse, dense, shared, fp32_check)
    assert calls and all(prefix_keys > 0 for prefix_keys in calls)


@pytest.mark.parametrize("whole_fraction,all_dense", [(0.6, True), (0.9, False)])
def test_busy_lanes_take_the_dense_call(whole_fraction, all_dense, monkeypatch):
    """When every routed lane is busy enough to be computed whole, all heads go through one
    causal call; the result and the zero-gate gradients stay those of the sparse path."""
    dense_calls = []
    dense_heads = sparse_attention.dense_causal_heads
    monkeypatch.setattr(sparse_attention, "dense_causal_heads",
                        lambda *a: dense_calls.append(a[3]) or dense_heads(*a))
    s, b, hp, g, d, shared = 30, 2, 8, 4, 16, 2
    (q, k, v), grad_out, gen = random_inputs(s, b, hp, g, d, seed=7)
    gates = make_gates(s, b, shared, hp - shared, 5, "weighted", gen)  # 5 of 6: busy lanes
    sparse = run(sparse_fn(shared, plan=SparsePlan(whole_lane_fraction=whole_fraction)), [q, k, v, gates], grad_out)
    dense = run(dense_reference, [q, k, v, gates], grad_out)
    compare(gates, sparse, dense, shared, fp32_check)
    assert dense_calls == ([hp] if all_dense else [shared])
