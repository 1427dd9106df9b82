"""SDPAttention (torch SDPA) against megatron-core's DotProductAttention (baddbmm + softmax).

Two kernels, fp32: outputs and gradients agree within atol = rtol = 1e-5 (sums in another order).
"""

import pytest
import torch

from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnBackend, AttnMaskType

from megatron_moh.core_attention import SDPAttention, local_core_attention
from tests.helpers import build_attention, tiny_config

FP32_TOL = dict(atol=1e-5, rtol=1e-5)


def _core(cls, cfg, layer_number=1, mask_type=AttnMaskType.causal, **kwargs):
    return cls(config=cfg, layer_number=layer_number, attn_mask_type=mask_type,
               attention_type="self", **kwargs)


def _outputs_and_grads(core, q, k, v, mask):
    leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
    out = core(*leaves, mask)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(9))
    (out * grad_out).sum().backward()
    return [out.detach()] + [t.grad for t in leaves]


def _document_mask(s, b):
    """megatron's boolean mask (True = masked out): causal, with a document boundary per sequence."""
    mask = torch.ones(s, s, dtype=torch.bool).triu(1).expand(b, 1, s, s).clone()
    for i, cut in enumerate(range(3, 3 + b)):
        mask[i, 0, cut:, :cut] = True
    return mask


@pytest.mark.parametrize("heads,groups,scale,layer_scaling,mask_type", [
    (8, 8, None, False, "causal"),  # multi-head
    (8, 2, None, False, "causal"),  # GQA: 4 query heads per key/value group
    (8, 1, 0.3, False, "padding"),  # multi-query, explicit scale, a non-causal layer with a mask
    (8, 4, None, True, "causal"),  # apply_query_key_layer_scaling at layer 3: same overall scale
    (8, 4, None, False, "causal_given_mask"),  # a causal layer ignores the loader's mask, like TE
])
def test_sdpa_core_equals_megatron_dot_product_attention(heads, groups, scale, layer_scaling, mask_type):
    s, b, d = 11, 2, 16
    cfg = tiny_config(num_attention_heads=heads, num_query_groups=groups, hidden_size=heads * d,
                      apply_query_key_layer_scaling=layer_scaling, moh_num_shared_heads=heads // 2,
                      moh_topk=1)
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(s, b, heads, d, generator=gen)
    k, v = (torch.randn(s, b, groups, d, generator=gen) for _ in range(2))
    mask = None if mask_type == "causal" else _document_mask(s, b)
    layer = 3 if layer_scaling else 1
    kind = AttnMaskType.padding if mask_type == "padding" else AttnMaskType.causal
    ours = _outputs_and_grads(_core(SDPAttention, cfg, layer, kind, softmax_scale=scale), q, k, v, mask)
    # megatron's unfused softmax applies a causal layer's given mask; the reference here is the
    # causal function the SDPA core computes.
    reference_mask = None if mask_type == "causal_given_mask" else mask
    theirs = _outputs_and_grads(_core(DotProductAttention, cfg, layer, kind, softmax_scale=scale),
                                q, k, v, reference_mask)
    for name, a, b_ in zip(["output", "query grad", "key grad", "value grad"], ours, theirs):
        torch.testing.assert_close(a, b_, **FP32_TOL, msg=lambda m, name=name: f"{name}: {m}")


def test_one_query_row_attends_to_every_key():
    """A decoding step (one query, causal type, no mask) sees all keys, as in megatron."""
    cfg = tiny_config()
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(1, 2, 8, 8, generator=gen)
    k, v = (torch.randn(5, 2, 4, 8, generator=gen) for _ in range(2))
    ours = _core(SDPAttention, cfg)(q, k, v, None)
    theirs = _core(DotProductAttention, cfg)(q, k, v, None)
    torch.testing.assert_close(ours, theirs, **FP32_TOL)


def test_attention_dropout_follows_the_model_parallel_rng():
    """Training mode drops attention weights (SDPA's dropout, drawn inside megatron's model-parallel
    RNG fork: the same tracker seed gives the same output); eval mode does not drop."""
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    cfg = tiny_config(attention_dropout=0.5)
    core = _core(SDPAttention, cfg)
    gen = torch.Generator().manual_seed(2)
    q, k, v = torch.randn(9, 2, 8, 8, generator=gen), *(torch.randn(9, 2, 4, 8, generator=gen) for _ in range(2))
    core.eval()
    plain = core(q, k, v, None)
    torch.testing.assert_close(plain, _core(DotProductAttention, cfg).eval()(q, k, v, None), **FP32_TOL)
    core.train()
    model_parallel_cuda_manual_seed(5)
    first = core(q, k, v, None)
    model_parallel_cuda_manual_seed(5)
    second = core(q, k, v, None)
    assert torch.equal(first, second)
    assert not torch.allclose(first, plain, atol=1e-3)
    model_parallel_cuda_manual_seed(1234)


@pytest.mark.parametrize("impl,backend,moh_impl,refused", [
    ("local", AttnBackend.auto, "dense", True),  # the SDPA core
    ("local", AttnBackend.unfused, "sparse", True),  # the head-sparse path
    ("local", AttnBackend.unfused, "auto", True),  # the default, which may pick it
    ("transformer_engine", AttnBackend.unfused, "dense", True),  # TE's causal kernels
    ("local", AttnBackend.unfused, "dense", False),  # megatron's DotProductAttention applies it
])
def test_document_masks_need_megatron_core_attention(impl, backend, moh_impl, refused):
    """--reset-attention-mask is refused (one line) wherever the mask would be silently ignored."""
    import copy

    from megatron_moh.config import MoHConfigError, check_moh_config

    args = copy.copy(tiny_config())
    args.reset_attention_mask, args.transformer_impl = True, impl
    args.attention_backend, args.moh_attention_impl = backend, moh_impl
    if not refused:
        check_moh_config(args)
        return
    with pytest.raises(MoHConfigError, match=r"^--reset-attention-mask \(document masks\) is applied only by "
                                             r"megatron's DotProductAttention: pass --transformer-impl local "
                                             r"--attention-backend unfused --moh-attention-impl dense, or drop "
                                             r"--reset-attention-mask$"):
        check_moh_config(args)


def test_local_spec_core_follows_attention_backend():
    """auto/flash/fused take SDPA; unfused/local keep megatron's DotProductAttention (also in the
    built MoH and dense layers)."""
    for backend, expected in [(AttnBackend.auto, SDPAttention), (AttnBackend.flash, SDPAttention),
                              (AttnBackend.fused, SDPAttention),
                              (AttnBackend.unfused, DotProductAttention),
                              (AttnBackend.local, DotProductAttention)]:
        cfg = tiny_config(attention_backend=backend)
        assert local_core_attention(cfg) is expected
        for moh in (True, False):
            assert type(build_attention(cfg, moh=moh).core_attention) is expected


def test_refuses_what_sdpa_cannot_compute():
    with pytest.raises(ValueError, match=r"^window_size=\(4, 0\) \(sliding-window attention\) is not "
                                         r"supported .* --attention-backend unfused"):
        _core(SDPAttention, tiny_config(window_size=(4, 0)))
    with pytest.raises(ValueError, match=r"^softmax_type='off-by-one' is not supported .* "
                                         r"--attention-backend unfused"):
        _core(SDPAttention, tiny_config(softmax_type="off-by-one"))
    core = _core(SDPAttention, tiny_config())
    q, kv = torch.zeros(4, 1, 8, 8), torch.zeros(4, 1, 4, 8)
    with pytest.raises(ValueError, match=r"^attention_mask has dtype torch.float32: .* boolean mask"):
        core(q, kv, kv, torch.zeros(1, 1, 4, 4), attn_mask_type=AttnMaskType.padding)
    with pytest.raises(ValueError, match=r"^a causal mask needs as many queries as keys, got 4 and 3"):
        core(q, kv[:3], kv[:3], None)
    with pytest.raises(ValueError, match=r"^packed sequences \(THD\) are not supported .* transformer_engine"):
        core(q, kv, kv, None, packed_seq_params=object())
