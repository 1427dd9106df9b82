"""GPU checks: run by benchmarks/gpu/check.sh on a CUDA machine (which sets MOH_TEST_GPU=1);
skipped everywhere else, CI included.

bf16 on the GPU against fp32: relative error (norm of the difference / norm of the reference) at
most 2e-2, on outputs and every gradient. Shapes match the kit's benchmarks where a compile can be
shared (head dim 128, 16 heads, 4 of 12 routed heads active).
"""

import os

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

from megatron_moh import flex_sparse_attention
from megatron_moh.core_attention import SDPAttention
from megatron_moh.flex_sparse_attention import flex_head_sparse_attention
from megatron_moh.sparse_attention import head_sparse_attention
from tests.helpers import build_attention, rotary, tiny_config
from tests.reference import RefSettings, reference_moh_attention
from tests.unit.test_flex_sparse_attention import routing
from tests.unit.test_sparse_attention import compare, random_inputs, run

ON_GPU = os.environ.get("MOH_TEST_GPU", "0") == "1" and torch.cuda.is_available()
pytestmark = pytest.mark.skipif(
    not ON_GPU, reason="needs a CUDA GPU (and MOH_TEST_GPU=1, which benchmarks/gpu/check.sh sets)")

BF16_REL_TOL = 2e-2
# Shared by the layer and function tests: one flex compile serves both.
SEQ, BATCH, HEADS, GROUPS, HEAD_DIM, SHARED, TOPK = 1024, 2, 16, 4, 128, 4, 4


def check_bf16(a, b, name):
    rel = ((a.float() - b.float()).norm() / b.float().norm()).item()
    assert rel <= BF16_REL_TOL, f"{name}: relative error {rel:.3g} > {BF16_REL_TOL}"


@pytest.mark.parametrize("impl", ["dense", "sparse"])
@pytest.mark.parametrize("router,gate,two_stage", [("learned", "weighted", True),
                                                   ("query_norm", "binary", False)])
def test_moh_layer_bf16_cuda_matches_fp32_cpu_reference(impl, router, gate, two_stage):
    """The MoH layer in bf16 on CUDA (SDPA core; flex for sparse) against tests/reference.py in
    fp32 on the CPU, from the same bf16 weights and input. The reference takes the GPU's top-k
    choice; its own choice may differ only on near-ties (at most 2% of routing slots)."""
    cfg = tiny_config(hidden_size=HEADS * HEAD_DIM, num_attention_heads=HEADS, num_query_groups=GROUPS,
                      moh_num_shared_heads=SHARED, moh_topk=TOPK, moh_router=router, moh_gate=gate,
                      moh_two_stage=two_stage, moh_attention_impl=impl, moh_load_balance_coeff=0.0,
                      params_dtype=torch.bfloat16, bf16=True)
    torch.manual_seed(0)
    attn = build_attention(cfg).cuda()
    assert type(attn.core_attention) is SDPAttention
    x = torch.randn(SEQ, BATCH, cfg.hidden_size).bfloat16()
    grad_out = torch.randn(SEQ, BATCH, cfg.hidden_size)
    captured = {}
    attn.router.register_forward_hook(lambda module, inputs, gates: captured.update(gates=gates))
    MoEAuxLossAutoScaler.set_loss_scale(torch.tensor(1.0, device="cuda"))
    x_gpu = x.cuda().requires_grad_(True)
    out, _ = attn(x_gpu, attention_mask=None, rotary_pos_emb=rotary(cfg, SEQ).cuda())
    (out.float() * grad_out.cuda()).sum().backward()
    if impl == "sparse":
        assert flex_sparse_attention.compiled_flex_attention.cache_info().currsize == 1

    settings = RefSettings(heads=HEADS, groups=GROUPS, head_dim=HEAD_DIM, shared=SHARED, topk=TOPK,
                           router=router, gate=gate, two_stage=two_stage)
    leaf = lambda t: t.detach().float().cpu().requires_grad_(True)
    weights = {"qkv": leaf(attn.linear_qkv.weight), "proj": leaf(attn.linear_proj.weight)}
    if router == "learned":
        weights["router"] = leaf(attn.router.weight)
    gpu_choice = (captured["gates"][..., SHARED:] != 0).float().cpu()
    x_ref = leaf(x)
    ref_out, _, _, _ = reference_moh_attention(x_ref, weights["qkv"], weights["proj"],
                                               weights.get("router"), settings, mask=gpu_choice)
    (ref_out * grad_out).sum().backward()
    with torch.no_grad():
        _, _, _, own_choice = reference_moh_attention(x_ref, weights["qkv"], weights["proj"],
                                                      weights.get("router"), settings)
    assert (own_choice != gpu_choice).float().mean() <= 0.02

    check_bf16(out, ref_out, "output")
    check_bf16(x_gpu.grad, x_ref.grad, "input grad")
    check_bf16(attn.linear_qkv.weight.grad, weights["qkv"].grad, "qkv grad")
    check_bf16(attn.linear_proj.weight.grad, weights["proj"].grad, "proj grad")
    if router == "learned":
        check_bf16(attn.router.weight.grad, weights["router"].grad, "router grad")


@pytest.mark.parametrize("kind", ["uniform", "skewed", "none", "all"])
@pytest.mark.parametrize("gate", ["binary", "weighted"])
def test_flex_bf16_cuda_matches_plain_path(kind, gate):
    """Triton flex kernels with the block tables (bf16) against the plain path in fp32 on CUDA:
    output, query/key/value gradients and nonzero gate gradients."""
    (q, k, v), grad_out, gen = random_inputs(SEQ, BATCH, HEADS, GROUPS, HEAD_DIM, seed=1)
    gates = routing(kind, SEQ, BATCH, SHARED, HEADS - SHARED, TOPK, seed=2)
    if gate == "weighted":
        gates = gates * (0.5 + torch.rand(gates.shape, generator=gen))
    q, k, v, gates, grad_out = (t.cuda() for t in (q, k, v, gates, grad_out))
    flex = run(lambda *x: flex_head_sparse_attention(*x, SHARED, TOPK),
               [q.bfloat16(), k.bfloat16(), v.bfloat16(), gates], grad_out)
    plain = run(lambda *x: head_sparse_attention(*x, SHARED), [q, k, v, gates], grad_out)
    compare(gates, flex, plain, SHARED, check_bf16)


def test_flex_cuda_compiles_once_and_never_synchronises():
    """Three routings after the first compile: no recompile (dynamo's counters) and no host
    synchronisation in forward or backward (torch.cuda.set_sync_debug_mode raises on one)."""
    from torch._dynamo.utils import counters

    (q, k, v), grad_out, _ = random_inputs(SEQ, BATCH, HEADS, GROUPS, HEAD_DIM, seed=3)
    q, k, v = (t.cuda().bfloat16().requires_grad_(True) for t in (q, k, v))
    grad_out = grad_out.cuda()
    routings = [routing(kind, SEQ, BATCH, SHARED, HEADS - SHARED, TOPK, seed=4).cuda()
                for kind in ("uniform", "skewed", "all", "none")]

    def step(gates):
        (flex_head_sparse_attention(q, k, v, gates, SHARED, TOPK).float() * grad_out).sum().backward()

    step(routings[0])  # compiles (or reuses the compile of the tests above)
    torch.cuda.synchronize()
    before = (counters["frames"]["total"], counters["stats"]["unique_graphs"])
    torch.cuda.set_sync_debug_mode("error")
    try:
        for gates in routings[1:]:
            step(gates)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    assert (counters["frames"]["total"], counters["stats"]["unique_graphs"]) == before


def test_sdpa_core_bf16_cuda_uses_fused_kernels_and_matches_megatron():
    """SDPAttention in bf16 (GQA, causal, no mask) runs with only the flash and cuDNN kernels
    allowed, and equals megatron's DotProductAttention in fp32."""
    cfg = tiny_config(hidden_size=HEADS * HEAD_DIM, num_attention_heads=HEADS, num_query_groups=GROUPS,
                      moh_num_shared_heads=SHARED, moh_topk=TOPK)
    (q, k, v), grad_out, _ = random_inputs(SEQ, BATCH, HEADS, GROUPS, HEAD_DIM, seed=5)
    q, k, v, grad_out = (t.cuda() for t in (q, k, v, grad_out))

    def core(cls):
        module = cls(config=cfg, layer_number=1, attn_mask_type=AttnMaskType.causal, attention_type="self")
        return lambda *x: module(*x, None, attn_mask_type=AttnMaskType.causal)

    with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION]):
        ours = run(core(SDPAttention), [q.bfloat16(), k.bfloat16(), v.bfloat16()], grad_out)
    theirs = run(core(DotProductAttention), [q, k, v], grad_out)
    for name, a, b in zip(["output", "query grad", "key grad", "value grad"], ours, theirs):
        check_bf16(a, b, name)
