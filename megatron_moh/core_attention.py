"""torch SDPA as megatron's core attention on the local spec, and the choice between cores.

megatron's local ``DotProductAttention`` materialises ``heads x seq x seq`` scores (baddbmm,
softmax, bmm). ``SDPAttention`` keeps its interface (same constructor, same forward: query, key and
value ``[s, b, heads, d]`` in, ``[s, b, heads * d]`` out) and computes the same function with
``torch.nn.functional.scaled_dot_product_attention``: flash / cuDNN kernels on a GPU, the flash
kernel on CPU, no score matrix, GQA without copying keys and values. Checkpoints, TP, SP and
recompute are unchanged: it subclasses ``DotProductAttention`` and overrides only ``forward``.

Which core the local spec uses follows megatron's own ``--attention-backend`` (a TransformerConfig
field; with Transformer Engine it picks TE's kernels): ``auto`` (the default), ``flash`` and
``fused`` take SDPA (torch then picks its fastest kernel for the inputs); ``unfused`` and ``local``
keep megatron's ``DotProductAttention``, e.g. for a sliding window or a softmax offset, which SDPA
cannot compute.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from megatron.core import tensor_parallel
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnBackend, AttnMaskType
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.utils import is_layer_window_attention

# --attention-backend values that keep megatron's materialised-scores DotProductAttention.
MEGATRON_CORE_BACKENDS = (AttnBackend.unfused, AttnBackend.local)


class SDPAttention(DotProductAttention):
    """megatron's core attention computed by torch's scaled_dot_product_attention.

    Honours: the causal mask type (``is_causal``; a one-row query attends to every key, as in
    megatron), ``softmax_scale``, attention dropout (under megatron's model-parallel RNG tracker),
    GQA. A causal layer ignores an explicit ``attention_mask``, as Transformer Engine and megatron's
    fused softmax do (the data loader's mask is the causal one; document masks are refused in
    ``check_moh_config``); other mask types apply a given boolean mask (True = masked out,
    megatron's convention), which on a GPU rules out the flash kernel.
    ``apply_query_key_layer_scaling`` is an fp16 overflow guard that leaves the scale unchanged;
    SDPA's kernels softmax in fp32 for half inputs, so it and ``attention_softmax_in_fp32`` need
    nothing more. Refused at construction
    (one line, naming ``--attention-backend unfused``): a sliding window and softmax offsets.
    """

    def __init__(self, config: TransformerConfig, layer_number: int, attn_mask_type: AttnMaskType,
                 attention_type: str, attention_dropout: float | None = None,
                 softmax_scale: float | None = None, **kwargs: Any):
        if is_layer_window_attention(config.window_size, config.window_attn_skip_freq, layer_number):
            raise ValueError(f"window_size={config.window_size} (sliding-window attention) is not "
                             f"supported by the SDPA core attention: pass --attention-backend "
                             f"unfused for megatron's DotProductAttention")
        if config.softmax_type != "vanilla":
            raise ValueError(f"softmax_type={config.softmax_type!r} is not supported by the SDPA "
                             f"core attention: pass --attention-backend unfused for megatron's "
                             f"DotProductAttention")
        super().__init__(config, layer_number, attn_mask_type, attention_type,
                         attention_dropout=attention_dropout, softmax_scale=softmax_scale, **kwargs)
        # The parent splits the scale into alpha * layer_number when apply_query_key_layer_scaling
        # is on; the product is the scale below either way.
        head_dim = self.hidden_size_per_attention_head
        self.sdpa_scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(head_dim)

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        attention_mask: Tensor | None,
        attn_mask_type: AttnMaskType | None = None,
        attention_bias: Tensor | None = None,
        packed_seq_params: Any = None,
    ) -> Tensor:
        """``[sq, b, hp, d]`` queries, ``[sk, b, g, d]`` keys and values -> ``[sq, b, hp * d]``."""
        if packed_seq_params is not None:
            raise ValueError("packed sequences (THD) are not supported by the SDPA core attention: "
                             "use --transformer-impl transformer_engine")
        if attention_bias is not None:
            raise ValueError("attention_bias is not supported by the SDPA core attention: "
                             "use --transformer-impl transformer_engine")
        mask_type = self.attn_mask_type if attn_mask_type is None else attn_mask_type
        sq, b, hp, d = query.shape
        sk = key.shape[0]
        mask, causal = None, False
        if mask_type == AttnMaskType.causal:
            if sq > 1 and sq != sk:
                raise ValueError(f"a causal mask needs as many queries as keys, got {sq} and {sk}")
            causal = sq > 1
        elif attention_mask is not None:
            if attention_mask.dtype != torch.bool:
                raise ValueError(f"attention_mask has dtype {attention_mask.dtype}: the SDPA core "
                                 f"attention takes megatron's boolean mask (True = masked out)")
            mask = ~attention_mask
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, heads, s, d]
        dropout = self.attention_dropout.p if self.training else 0.0

        def attend() -> Tensor:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout,
                                                  is_causal=causal, scale=self.sdpa_scale,
                                                  enable_gqa=k.shape[1] != hp)

        if dropout and not self.config.sequence_parallel:
            with tensor_parallel.get_cuda_rng_tracker().fork():
                out = attend()
        else:
            out = attend()
        return out.permute(2, 0, 1, 3).reshape(sq, b, hp * d)


def local_core_attention(config: TransformerConfig) -> type[DotProductAttention]:
    """The core attention class of the local spec for ``config.attention_backend``."""
    if config.attention_backend in MEGATRON_CORE_BACKENDS:
        return DotProductAttention
    return SDPAttention
