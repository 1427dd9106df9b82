"""The FlexAttention head-sparse path on CPU, against the plain-torch path and flex's own mask tools.

What a CPU checks here: the packed layout and the block tables (against ``create_block_mask``,
which evaluates ``mask_mod`` on every point), the forward through ``torch.compile(flex_attention)``
(fp32, atol = rtol = 1e-5 against ``head_sparse_attention``: two kernels, sums in another order),
the backward through the eager math path of flex's higher-order op (fp64, 1e-10: the same math in
another order; that path ignores the block tables, which is why they are tested on their own), one
compile for every routing, and no host-synchronising op in forward or backward.
What only a GPU checks (tests/gpu/test_cuda.py): the Triton kernels' forward and backward with the
block tables, bf16, and no synchronisation under ``torch.cuda.set_sync_debug_mode("error")``.
"""

import pytest
import torch
from torch._dynamo.utils import counters
from torch._higher_order_ops.flex_attention import flex_attention as flex_attention_op
from torch.nn.attention.flex_attention import create_block_mask
from torch.utils._python_dispatch import TorchDispatchMode

from megatron_moh import flex_sparse_attention
from megatron_moh.flex_sparse_attention import (flex_head_sparse_attention, pack_routed_rows,
                                                packed_length, routed_block_mask)
from megatron_moh.sparse_attention import head_sparse_attention
from tests.helpers import tiny_config
from tests.unit.test_sparse_attention import FP32_TOL, compare, fp32_check, make_gates, random_inputs, run

BLOCK = 16  # small tiles for small shapes; GPUs use 128
FP64_TOL = dict(atol=1e-10, rtol=1e-10)


def eager_flex(query, key, value, block_mask, scale):
    """flex's higher-order op called eagerly: its math path, with autograd, on CPU."""
    out, *_ = flex_attention_op(query, key, value, lambda score, *index: score,
                                block_mask.as_tuple(), scale, {})
    return out


def routing(kind, s, b, shared, routed, topk, seed=0):
    """Binary gates with shared heads on: uniform top-k, skewed towards the first routed heads, a
    routed head nobody chooses, or one everybody chooses."""
    gen = torch.Generator().manual_seed(seed)
    if kind == "skewed":
        scores = torch.rand(s, b, routed, generator=gen) + torch.linspace(1.0, 0.0, routed)
        mask = torch.zeros(s, b, routed).scatter_(-1, scores.topk(topk, dim=-1).indices, 1.0)
        return torch.cat([torch.ones(s, b, shared), mask], dim=-1)
    force = {"none": dict(force_none=0), "all": dict(force_all=routed - 1)}.get(kind, {})
    return make_gates(s, b, shared, routed, topk, "binary", gen, **force)


@pytest.mark.parametrize("kind", ["uniform", "skewed", "none", "all"])
@pytest.mark.parametrize("s,hp,g,shared,topk", [
    (64, 8, 4, 2, 2),  # GQA, tile-aligned groups
    (40, 6, 2, 1, 3),  # group boundaries inside a key tile, short last tile, odd shared count
])
def test_flex_block_tables_equal_create_block_mask(kind, s, hp, g, shared, topk):
    b = 2
    gates = routing(kind, s, b, shared, hp - shared, topk)
    rows = pack_routed_rows(gates, shared, hp // g, topk, BLOCK)
    ours = routed_block_mask(rows, g * s, BLOCK)
    length = packed_length(s, topk, hp - shared, BLOCK)
    theirs = create_block_mask(ours.mask_mod, b, 1, length, g * s, device="cpu", BLOCK_SIZE=BLOCK)
    for name in ("kv", "full_kv", "q", "full_q"):
        count, ref_count = getattr(ours, f"{name}_num_blocks"), getattr(theirs, f"{name}_num_blocks")
        assert torch.equal(count, ref_count), name
        index, ref_index = getattr(ours, f"{name}_indices"), getattr(theirs, f"{name}_indices")
        listed = torch.arange(index.shape[-1]) < count[..., None]
        assert torch.equal(index[listed], ref_index[listed]), name
    # Every chosen row is packed once, in position order within its lane.
    chosen = gates[:, :, shared:] != 0
    assert rows.valid.sum() == chosen.sum()
    for batch in range(b):
        for head in range(shared, hp):
            lane = rows.valid[batch] & (rows.head[batch] == head)
            expected = torch.nonzero(chosen[:, batch, head - shared]).flatten()
            assert torch.equal(rows.position[batch][lane], expected)


def test_flex_compiled_forward_equals_plain_path_without_recompiling():
    """torch.compile(flex_attention) on CPU for three routings: each equals the plain path (fp32),
    and only the first call compiles (fixed packed length)."""
    s, b, hp, g, d, shared, topk = 64, 2, 8, 4, 16, 2, 2
    (q, k, v), _, _ = random_inputs(s, b, hp, g, d, seed=1)
    compiles = []
    for seed, kind in enumerate(["uniform", "skewed", "all"]):
        gates = routing(kind, s, b, shared, hp - shared, topk, seed=seed)
        with torch.no_grad():
            out = flex_head_sparse_attention(q, k, v, gates, shared, topk, block=BLOCK)
            torch.testing.assert_close(out, head_sparse_attention(q, k, v, gates, shared), **FP32_TOL)
        compiles.append((counters["frames"]["total"], counters["stats"]["unique_graphs"]))
    assert compiles[1] == compiles[0] and compiles[2] == compiles[0], f"recompiled: {compiles}"


@pytest.mark.parametrize("kind", ["uniform", "skewed", "none", "all"])
@pytest.mark.parametrize("s,b,hp,g,shared,topk,gate", [
    (48, 2, 8, 4, 2, 2, "binary"),  # GQA, shared heads cover whole groups
    (33, 1, 8, 2, 3, 3, "weighted"),  # shared heads end inside a group; partial tiles everywhere
    (32, 2, 4, 1, 0, 1, "weighted"),  # multi-query, every head routed
])
def test_flex_backward_through_eager_op_equals_plain_path(kind, s, b, hp, g, shared, topk, gate):
    d = 8
    (q, k, v), grad_out, gen = random_inputs(s, b, hp, g, d, dtype=torch.float64, seed=2)
    gates = routing(kind, s, b, shared, hp - shared, topk, seed=3).double()
    if gate == "weighted":
        gates = gates * (0.5 + torch.rand(gates.shape, generator=gen, dtype=torch.float64))
    flex = run(lambda *x: flex_head_sparse_attention(*x, shared, topk, block=BLOCK, kernel=eager_flex),
               [q, k, v, gates], grad_out.double())
    plain = run(lambda *x: head_sparse_attention(*x, shared), [q, k, v, gates], grad_out.double())

    def check(a, b_, name):
        torch.testing.assert_close(a, b_, **FP64_TOL, msg=lambda m: f"{name}: {m}")

    compare(gates, flex, plain, shared, check)


class _RecordOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.add(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


def test_flex_path_has_no_host_synchronising_op():
    """Forward and backward around the kernel (layout, block tables, gathers, scatters, shared
    heads) use no op that waits for the device: no .item(), no nonzero / boolean indexing."""
    s, b, hp, g, d, shared, topk = 32, 2, 8, 4, 8, 2, 2
    (q, k, v), _, _ = random_inputs(s, b, hp, g, d, seed=4)
    gates = routing("uniform", s, b, shared, hp - shared, topk).requires_grad_(True)
    q.requires_grad_(True)

    def stand_in_kernel(query, key, value, block_mask, scale):  # flex itself is checked on a GPU
        return query * scale + 0 * (key.sum() + value.sum())

    with _RecordOps() as recorded:
        flex_head_sparse_attention(q, k, v, gates, shared, topk, block=BLOCK,
                                   kernel=stand_in_kernel).sum().backward()
    syncing = {"_local_scalar_dense", "item", "nonzero", "masked_select", "unique", "_unique2",
               "masked_scatter", "repeat_interleave"}
    assert "searchsorted" in recorded.ops  # the recording saw the layout code
    assert not recorded.ops & syncing, recorded.ops & syncing


@pytest.mark.parametrize("impl_topk", [1, 2])
def test_flex_layer_equals_dense_layer(impl_topk, monkeypatch):
    """The MoH layer's sparse impl with the flex path (as on CUDA; here with flex's eager op) equals
    the dense impl: output and every gradient, fp32, GQA."""
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    from tests.helpers import build_attention, rotary

    monkeypatch.setattr(flex_sparse_attention, "flex_available", lambda device: True)
    monkeypatch.setattr(flex_sparse_attention, "compiled_flex_attention", lambda: eager_flex)
    monkeypatch.setattr("megatron_moh.moh_attention.flex_available", lambda device: True)
    calls = []
    flex = flex_sparse_attention.flex_head_sparse_attention
    monkeypatch.setattr("megatron_moh.moh_attention.flex_head_sparse_attention",
                        lambda *a, **k: calls.append(a[5]) or flex(*a, **k))
    seq, batch = 12, 2
    torch.manual_seed(6)
    x = torch.randn(seq, batch, 64)
    grad_out = torch.randn(seq, batch, 64)
    grads = {}
    for impl in ("dense", "sparse"):
        cfg = tiny_config(moh_attention_impl=impl, moh_topk=impl_topk)
        torch.manual_seed(0)
        attn = build_attention(cfg)
        MoEAuxLossAutoScaler.set_loss_scale(torch.tensor(1.0))
        leaf = x.clone().requires_grad_(True)
        out, _ = attn(leaf, attention_mask=None, rotary_pos_emb=rotary(cfg, seq))
        (out * grad_out).sum().backward()
        grads[impl] = {"out": out, "x": leaf.grad, **{n: p.grad for n, p in attn.named_parameters()}}
    assert calls == [impl_topk]
    for name, dense in grads["dense"].items():
        fp32_check(grads["sparse"][name], dense, name)


def test_flex_rejects_bad_shapes():
    q, kv = torch.zeros(4, 1, 6, 8), torch.zeros(4, 1, 3, 8)
    with pytest.raises(ValueError, match=r"^key/value \(4, 1, 4, 8\)/\(4, 1, 4, 8\) do not fit query"):
        flex_head_sparse_attention(q, torch.zeros(4, 1, 4, 8), torch.zeros(4, 1, 4, 8), torch.ones(4, 1, 6), 2, 1)
    with pytest.raises(ValueError, match=r"^gates \(4, 1, 5\) should be \[s, b, heads\]"):
        flex_head_sparse_attention(q, kv, kv, torch.ones(4, 1, 5), 2, 1)
    with pytest.raises(ValueError, match=r"^topk=0: routed heads need topk >= 1"):
        flex_head_sparse_attention(q, kv, kv, torch.ones(4, 1, 6), 2, 0)
