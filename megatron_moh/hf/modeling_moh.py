"""Llama with Mixture-of-Head attention (MoH, arXiv 2410.11842) for transformers 5.x.

Self-contained (imports only torch and transformers): this file is copied next to exported
weights and loaded with ``AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)``.
Weight names are Llama's plus ``model.layers.N.self_attn.router.weight`` for the learned router,
``self_attn.{q,k,v}_proj.bias`` with ``moh_qkv_bias`` and ``self_attn.{q,k}_norm.weight`` with
``moh_qk_norm`` (Qwen2's and Qwen3's names).

Each head's attention output (after the attention interface, before ``o_proj``) is scaled by a
per-token gate; keys and values are never gated, so the KV cache, generation, left padding and
every attention interface (eager, sdpa, ...) work unchanged. The gate math is the training
code's (megatron_moh.router.gates_from_logits); the convention is in configuration_moh.

With ``moh_attention_impl='sparse'`` (eager and sdpa interfaces) a routed head's attention is
computed only for the query rows whose gate is nonzero, in prefill and in cached decoding, with the
dense path's output (``MoHLlamaAttention.sparse_attend``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.llama.modeling_llama import (
    LlamaAttention,
    LlamaDecoderLayer,
    LlamaForCausalLM,
    LlamaModel,
    LlamaPreTrainedModel,
    LlamaRMSNorm,
    LlamaRotaryEmbedding,
    apply_rotary_pos_emb,
    eager_attention_forward,
)

from .configuration_moh import MoHLlamaConfig

QUERY_NORM_STD_EPS = 1e-6


def moh_gates(
    like: torch.Tensor,
    routed_logits: torch.Tensor | None,
    shared_logits: torch.Tensor | None,
    stage_logits: torch.Tensor | None,
    num_shared: int,
    topk: int,
    gate: str,
) -> torch.Tensor:
    """Float32 gates ``[..., H]`` (shared heads first) from router logits; ``like`` gives the
    token dimensions. Same operations, in the same order, as the training code, so an exported
    model reproduces its logits."""
    if shared_logits is not None:
        shared = num_shared * torch.softmax(shared_logits, dim=-1)
    else:
        shared = torch.ones(*like.shape[:-1], num_shared, dtype=torch.float32, device=like.device)
    if routed_logits is None:
        return shared
    probs = torch.softmax(routed_logits, dim=-1)
    chosen = probs.topk(topk, dim=-1).indices
    mask = torch.zeros_like(probs).scatter_(-1, chosen, 1.0)
    if gate == "weighted":
        kept = probs * mask
        routed = topk * kept / kept.sum(dim=-1, keepdim=True)
    else:  # 1 in the forward pass, gradient of the chosen heads' probabilities (straight-through)
        routed = mask + mask * (probs - probs.detach())  # exactly 0/1 forward
    if stage_logits is not None:
        stage = 2.0 * torch.softmax(stage_logits, dim=-1)
        shared = shared * stage[..., :1]
        routed = routed * stage[..., 1:]
    return torch.cat([shared, routed], dim=-1)


class MoHLlamaAttention(LlamaAttention):
    """Llama attention whose query heads are mixed by per-token router gates."""

    def __init__(self, config: MoHLlamaConfig, layer_idx: int):
        super().__init__(config, layer_idx)
        self.num_heads = config.num_attention_heads
        self.num_shared = config.moh_num_shared_heads
        self.num_routed = self.num_heads - self.num_shared
        self.topk = config.moh_topk
        self.gate = config.moh_gate
        self.router_kind = config.moh_router
        if self.router_kind == "learned":
            self.num_shared_logits = self.num_shared if self.gate == "weighted" else 0
            self.num_stage_logits = 2 if config.moh_two_stage else 0
            self.router = nn.Linear(config.hidden_size, config.moh_router_rows, bias=False)
        if config.moh_qkv_bias:  # Qwen2's attention: q, k, v biased, o not
            kv_width = config.num_key_value_heads * self.head_dim
            self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=True)
            self.k_proj = nn.Linear(config.hidden_size, kv_width, bias=True)
            self.v_proj = nn.Linear(config.hidden_size, kv_width, bias=True)
        self.q_norm = self.k_norm = None
        if config.moh_qk_norm:  # Qwen3's: one RMSNorm over head_dim, shared by the heads
            self.q_norm = LlamaRMSNorm(self.head_dim, eps=config.rms_norm_eps)
            self.k_norm = LlamaRMSNorm(self.head_dim, eps=config.rms_norm_eps)

    def head_gates(self, hidden_states: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
        """Float32 gates ``[B, T, H]`` from the normalised hidden states ``[B, T, hidden]`` and the
        queries ``[B, T, H, D]`` before RoPE and before the q-norm."""
        if self.router_kind == "learned":
            logits = self.router(hidden_states).float()
            shared_logits, routed_logits, stage_logits = logits.split(
                [self.num_shared_logits, self.num_routed, self.num_stage_logits], dim=-1
            )
            return moh_gates(
                logits,
                routed_logits if self.num_routed else None,
                shared_logits if self.num_shared_logits else None,
                stage_logits if self.num_stage_logits else None,
                self.num_shared,
                self.topk,
                self.gate,
            )
        norms = query.float().norm(dim=-1)
        routed_logits = None
        if self.num_routed:
            routed = norms[..., self.num_shared :]
            routed_logits = routed / routed.std(dim=-1, keepdim=True).clamp_min(QUERY_NORM_STD_EPS)
        return moh_gates(norms, routed_logits, None, None, self.num_shared, self.topk, self.gate)

    def attend(self, query, key, value, attention_mask, gates, **kwargs):
        """Attention over all heads, output ``[B, T, H, D]``; ``query`` is ``[B, H, T, D]``,
        ``key``/``value`` ``[B, H_kv, S, D]`` (the whole cache), ``gates`` ``[B, T, H]``.

        With ``moh_attention_impl='sparse'`` the routed heads are computed only for the query rows
        whose gate is nonzero (:meth:`sparse_attend`); the dense interface runs otherwise, and
        where the sparse path does not apply (see :meth:`can_attend_sparse`).
        """
        if self.config.moh_attention_impl == "sparse" and self.can_attend_sparse(attention_mask, kwargs):
            return self.sparse_attend(query, key, value, attention_mask, gates), None
        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        return attention_interface(
            self,
            query,
            key,
            value,
            attention_mask,
            dropout=0.0 if not self.training else self.attention_dropout,
            scaling=self.scaling,
            **kwargs,
        )

    def can_attend_sparse(self, attention_mask, kwargs) -> bool:
        """The sparse path handles the masks of the eager and sdpa interfaces (None, or a 4D bool
        or additive float tensor), without dropout and without returned attention weights."""
        return (
            self.config._attn_implementation in ("eager", "sdpa")
            and (attention_mask is None or (isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 4))
            and not (self.training and self.attention_dropout > 0)
            and not kwargs.get("output_attentions", False)
            and not getattr(self.config, "output_attentions", False)
            and self.num_routed > 0
        )

    def sparse_attend(self, query, key, value, attention_mask, gates) -> torch.Tensor:
        """Head-sparse attention, output ``[B, T, H, D]`` (0 where a routed gate is 0).

        Shared heads run torch's SDPA over every row, with the mask the sdpa interface would use.
        Routed heads: each (sequence, key/value head) pair is a *lane* whose rows are the
        (query head of its group, position) pairs with a nonzero gate. Lanes with no such row are
        dropped (in decoding, a routed head the token did not choose costs nothing); the others'
        rows are packed, in order, into ``[lanes, R, D]`` (padded to the longest lane) and run in
        one SDPA call against all ``S`` keys of their key/value head, with an explicit mask
        gathered at the rows' original positions: the given 4D mask (causal with the cache
        offset, padding), or, when the mask is None, what the sdpa interface does then (causal
        for several queries, none for one). Padding rows attend everywhere and are dropped.
        """
        batch, heads, length, dim = query.shape
        num_kv, keys = key.shape[1], key.shape[2]
        groups = heads // num_kv
        shared = self.num_shared
        out = query.new_zeros(batch, length, heads, value.shape[-1])
        device = query.device

        if attention_mask is not None:
            attention_mask = attention_mask[..., :keys]
        if shared:
            q_shared = query[:, :shared]
            kv_heads = torch.arange(shared, device=device) // groups
            mask = attention_mask
            if mask is not None and mask.shape[1] > 1:
                mask = mask[:, :shared]
            out[:, :, :shared] = F.scaled_dot_product_attention(
                q_shared, key[:, kv_heads], value[:, kv_heads], attn_mask=mask, scale=self.scaling,
                is_causal=mask is None and length > 1,
            ).transpose(1, 2)

        # Rows of lane (b, g): query heads g*groups .. (g+1)*groups-1, each over positions 0..T-1.
        chosen = gates != 0
        chosen[..., :shared] = False
        chosen = chosen.permute(0, 2, 1).reshape(batch * num_kv, groups * length)
        counts = chosen.sum(dim=-1)
        lanes = counts.nonzero().squeeze(1)  # [P]
        if lanes.numel() == 0:
            return out
        counts = counts[lanes]
        rows = int(counts.max())
        # Chosen rows first, in their original order (stable sort), cut at the longest lane.
        order = torch.sort((~chosen[lanes]).to(torch.uint8), dim=-1, stable=True).indices[:, :rows]  # [P, R]
        valid = torch.arange(rows, device=device) < counts[:, None]  # [P, R]
        b = torch.div(lanes, num_kv, rounding_mode="floor")[:, None].expand(-1, rows)  # [P, R]
        g = (lanes % num_kv)[:, None]
        h = g * groups + torch.div(order, length, rounding_mode="floor")  # query head
        t = order % length  # position among the new tokens

        q_rows = query[b, h, t]  # [P, R, D]
        k_lanes, v_lanes = key.reshape(batch * num_kv, keys, -1), value.reshape(batch * num_kv, keys, -1)
        if lanes.numel() < batch * num_kv:  # with every lane used, the cache is not copied
            k_lanes, v_lanes = k_lanes[lanes], v_lanes[lanes]

        if attention_mask is not None:
            mask_heads = h if attention_mask.shape[1] > 1 else torch.zeros_like(h)
            mask = attention_mask[b, mask_heads, t]  # [P, R, S]
            allow = torch.ones((), dtype=torch.bool) if mask.dtype == torch.bool else torch.zeros((), dtype=mask.dtype)
            mask = torch.where(valid[..., None], mask, allow.to(device))
        elif length > 1:  # sdpa's is_causal: query i sees keys 0..i
            mask = torch.arange(keys, device=device) <= t[..., None]
            mask = mask | ~valid[..., None]
        else:
            mask = None
        attended = F.scaled_dot_product_attention(
            q_rows[:, None], k_lanes[:, None], v_lanes[:, None],
            attn_mask=None if mask is None else mask[:, None], scale=self.scaling,
        )[:, 0]  # [P, R, D]
        out[b[valid], t[valid], h[valid]] = attended[valid]
        return out

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        attention_mask: torch.Tensor | None = None,
        cache=None,
        past_key_values=None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Llama's attention with the gates applied between the attention and ``o_proj``."""
        cache = cache if cache is not None else past_key_values  # the name differs across 5.x
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)

        query = self.q_proj(hidden_states).view(hidden_shape)
        gates = self.head_gates(hidden_states, query)  # before the q-norm, as in training
        key = self.k_proj(hidden_states).view(hidden_shape)
        if self.q_norm is not None:
            query, key = self.q_norm(query), self.k_norm(key)
        query_states = query.transpose(1, 2)
        key_states = key.transpose(1, 2)
        value_states = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)

        cos, sin = position_embeddings
        query_states, key_states = apply_rotary_pos_emb(query_states, key_states, cos, sin)
        if cache is not None:  # called exactly as the installed Llama attention calls it
            key_states, value_states = cache.update(key_states, value_states, self.layer_idx, kwargs=kwargs)

        attn_output, attn_weights = self.attend(
            query_states, key_states, value_states, attention_mask, gates, **kwargs
        )
        attn_output = attn_output * gates.unsqueeze(-1).to(attn_output.dtype)
        attn_output = attn_output.reshape(*input_shape, -1).contiguous()
        return self.o_proj(attn_output), attn_weights


class MoHLlamaDecoderLayer(LlamaDecoderLayer):
    """A Llama decoder layer with MoH attention."""

    def __init__(self, config: MoHLlamaConfig, layer_idx: int):
        super().__init__(config, layer_idx)
        self.self_attn = MoHLlamaAttention(config=config, layer_idx=layer_idx)


class MoHLlamaPreTrainedModel(LlamaPreTrainedModel):
    """Binds the MoH config and layer classes to transformers' loading machinery."""

    config_class = MoHLlamaConfig
    config: MoHLlamaConfig
    _no_split_modules = ["MoHLlamaDecoderLayer"]
    _can_record_outputs = {
        "hidden_states": MoHLlamaDecoderLayer,
        "attentions": MoHLlamaAttention,
    }


class MoHLlamaModel(MoHLlamaPreTrainedModel, LlamaModel):
    """LlamaModel with MoH decoder layers; the forward pass is Llama's."""

    def __init__(self, config: MoHLlamaConfig):
        # LlamaModel.__init__ would build (and initialise) plain Llama layers first; skip it.
        LlamaPreTrainedModel.__init__(self, config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList(
            [MoHLlamaDecoderLayer(config, layer_idx) for layer_idx in range(config.num_hidden_layers)]
        )
        self.norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = LlamaRotaryEmbedding(config=config)
        self.gradient_checkpointing = False
        self.post_init()


class MoHLlamaForCausalLM(MoHLlamaPreTrainedModel, LlamaForCausalLM, GenerationMixin):
    """Causal LM head over MoHLlamaModel; forward and generation are Llama's."""

    def __init__(self, config: MoHLlamaConfig):
        LlamaPreTrainedModel.__init__(self, config)
        self.model = MoHLlamaModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()


__all__ = [
    "MoHLlamaAttention",
    "MoHLlamaDecoderLayer",
    "MoHLlamaForCausalLM",
    "MoHLlamaModel",
    "MoHLlamaPreTrainedModel",
    "moh_gates",
]
