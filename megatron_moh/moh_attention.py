"""Mixture-of-Head attention as a megatron-core self-attention module.

Queries, keys and values come from megatron's own column-parallel projection (so TP, SP and GQA
sharding are megatron's); a router turns each token into per-head gates; each TP rank scales its
heads' attention outputs by their gates before the row-parallel output projection. Keys and values
are never gated.

With ``--qk-layernorm`` (per-head RMSNorm of queries and keys, as Qwen3 and OLMo-2) the router sees
the queries *before* the q-norm: after it every head's query has the same RMS (times the shared
norm weight, all ones at the start), so query norms would no longer tell heads apart. A forward
pre-hook on the q-norm keeps its input for the router, so megatron's projection code is not copied.

`MoHSelfAttention.forward` follows megatron's ``Attention.forward`` for training: QKV projection,
RoPE (``rotary_interleaved`` too), selective recompute of the core attention, NVTX ranges
(``--nvtx-ranges``) and the output projection. What it leaves out is refused before start-up
(``preflight.REFUSED``, ``check_moh_config``; tests/unit/test_flags.py has a row for each): the
inference paths (KV cache, flash decode, dynamic batching, CUDA-graph decoding), packed sequences
(THD), context parallelism, CUDA graphs, fine-grained activation offloading of ``qkv_linear``,
``core_attn`` and ``attn_proj`` (`ATTENTION_OFFLOAD_MODULES`), the fused single-kernel QKV RoPE, and
the output gate and RoPE-free layers that MoH replaces.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from megatron.core import tensor_parallel
from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.transformer.utils import is_layer_window_attention
from megatron.core.utils import nvtx_range_pop, nvtx_range_push

from megatron_moh.config import MoHTransformerConfig
from megatron_moh.flex_sparse_attention import flex_available, flex_head_sparse_attention
from megatron_moh.hf.configuration_moh import skipped_attention, sparse_pays
from megatron_moh.sparse_attention import head_sparse_attention


# megatron's fine-grained activation offloading points inside Attention.forward (--offload-modules).
ATTENTION_OFFLOAD_MODULES = ("qkv_linear", "core_attn", "attn_proj")


@dataclass
class MoHSelfAttentionSubmodules(SelfAttentionSubmodules):
    """SelfAttention's submodules plus the head router."""

    router: type | ModuleSpec | None = None


def gate_heads(core_attn_out: Tensor, gates: Tensor) -> Tensor:
    """Scale each head's attention output ``[s, b, heads * d]`` by its gate ``[s, b, heads]``."""
    s, b, width = core_attn_out.shape
    heads = gates.shape[-1]
    out = core_attn_out.view(s, b, heads, width // heads) * gates.unsqueeze(-1).to(core_attn_out.dtype)
    return out.view(s, b, width)


class MoHSelfAttention(SelfAttention):
    """Self-attention whose heads are mixed by per-token router gates (MoH, arXiv 2410.11842)."""

    def __init__(
        self,
        config: MoHTransformerConfig,
        submodules: MoHSelfAttentionSubmodules,
        layer_number: int,
        **kwargs: Any,
    ):
        super().__init__(config=config, submodules=submodules, layer_number=layer_number, **kwargs)
        self.router = build_module(
            submodules.router, config=config, layer_number=layer_number, tp_group=self.pg_collection.tp
        )
        # Shared heads come first globally, so this rank's shared heads are its leading ones.
        first_head = self.router.head_offset
        self.num_local_shared_heads = min(max(config.moh_num_shared_heads - first_head, 0),
                                          self.num_attention_heads_per_partition)
        routed = config.num_attention_heads - config.moh_num_shared_heads
        self.skipped = skipped_attention(
            "train", self.num_attention_heads_per_partition, self.num_query_groups_per_partition,
            self.num_local_shared_heads, config.moh_topk / routed if routed else 1.0)
        self.window_attention = is_layer_window_attention(config.window_size, config.window_attn_skip_freq,
                                                          layer_number)
        self._routing_query: Tensor | None = None
        if self.q_layernorm is not None:
            self.q_layernorm.register_forward_pre_hook(self._keep_routing_query)

    def _keep_routing_query(self, q_layernorm: Any, args: tuple[Tensor, ...]) -> None:
        """The q-norm's input, ``[s, b, heads on this rank, d]``: what the router routes on."""
        self._routing_query = args[0]

    def forward(
        self,
        hidden_states: Tensor,
        attention_mask: Tensor,
        rotary_pos_emb: Tensor | tuple[Tensor, Tensor] | None = None,
        inference_context: Any = None,
        packed_seq_params: Any = None,
        attention_bias: Tensor | None = None,
        **unused: Any,
    ) -> tuple[Tensor, Tensor | None]:
        """``[s, b, hidden]`` in (``s`` local under sequence parallelism), ``[s, b, hidden]`` out."""
        if inference_context is not None or unused.get("inference_params") is not None:
            raise NotImplementedError(
                "MoH attention has no megatron inference path: export the checkpoint to Hugging "
                "Face format (tools/convert_checkpoint.py) and generate there"
            )
        if packed_seq_params is not None:
            raise NotImplementedError("MoH attention does not support packed sequences (THD) yet")

        nvtx_range_push(suffix="qkv")
        query, key, value = self.get_query_key_value_tensors(hidden_states)
        routing_query, self._routing_query = self._routing_query, None  # set by the q-norm's pre-hook
        if routing_query is None:
            if self.q_layernorm is not None:
                raise RuntimeError("megatron's get_query_key_value_tensors no longer calls q_layernorm: the "
                                   "query-norm router would route on normalised queries")
            routing_query = query
        gates = self.router(hidden_states, routing_query)  # [s, b, heads on this rank]
        nvtx_range_pop(suffix="qkv")

        nvtx_range_push(suffix="rotary_pos_emb")
        if rotary_pos_emb is not None:
            q_pos_emb, k_pos_emb = (
                rotary_pos_emb if isinstance(rotary_pos_emb, tuple) else (rotary_pos_emb,) * 2
            )
            cp_group = self.pg_collection.cp
            mscale = self._yarn_concentration_factor
            query = apply_rotary_pos_emb(query, q_pos_emb, config=self.config, mscale=mscale, cp_group=cp_group)
            key = apply_rotary_pos_emb(key, k_pos_emb, config=self.config, mscale=mscale, cp_group=cp_group)
        nvtx_range_pop(suffix="rotary_pos_emb")

        nvtx_range_push(suffix="core_attention")
        if self._head_sparse(query):
            core_attn_out = self._head_sparse_attention(query, key, value, gates)
        else:
            core_attn_out = gate_heads(self._dense_attention(query, key, value, attention_mask, attention_bias), gates)
        nvtx_range_pop(suffix="core_attention")

        nvtx_range_push(suffix="linear_proj")
        output = self.linear_proj(core_attn_out)
        nvtx_range_pop(suffix="linear_proj")
        return output

    def _head_sparse(self, query: Tensor) -> bool:
        """``--moh-attention-impl sparse``, or ``auto`` where the head-sparse core is measured to be
        faster for this sequence length and this rank's heads (configuration_moh.SPARSE_CROSSOVERS)
        and computes the same function: it has no attention dropout and no sliding window, so
        ``auto`` computes every head with either (``check_moh_config`` refuses them with ``sparse``)."""
        impl = self.config.moh_attention_impl
        if impl != "auto":
            return impl == "sparse"
        if self.window_attention or (self.training and self.config.attention_dropout > 0):
            return False
        return sparse_pays(query.device.type, "train", query.shape[0], self.skipped, torch.get_num_threads())

    def _dense_attention(self, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None,
                         attention_bias: Tensor | None) -> Tensor:
        """megatron's core attention over every head (selective recompute as megatron does it)."""
        if self.checkpoint_core_attention and self.training:
            return self._checkpointed_attention_forward(
                query, key, value, attention_mask, attn_mask_type=self.attn_mask_type, attention_bias=attention_bias
            )
        return self.core_attention(
            query, key, value, attention_mask, attn_mask_type=self.attn_mask_type, attention_bias=attention_bias
        )

    def _head_sparse_attention(self, query: Tensor, key: Tensor, value: Tensor, gates: Tensor) -> Tensor:
        """Causal attention that skips the query rows a routed head was not chosen for; gated.
        FlexAttention on CUDA, the plain-torch path elsewhere (CPU flex has no backward)."""

        def run(q: Tensor, k: Tensor, v: Tensor, g: Tensor) -> Tensor:
            if flex_available(q.device):
                return flex_head_sparse_attention(q, k, v, g, self.num_local_shared_heads,
                                                  self.config.moh_topk, self.config.softmax_scale)
            return head_sparse_attention(q, k, v, g, self.num_local_shared_heads, self.config.softmax_scale)

        if self.checkpoint_core_attention and self.training:
            return tensor_parallel.checkpoint(run, False, query, key, value, gates)
        return run(query, key, value, gates)
