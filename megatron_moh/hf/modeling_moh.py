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

``moh_attention_impl``: ``'dense'`` runs the attention interface over every head; ``'sparse'``
(eager and sdpa interfaces) skips what the router did not choose: a decoding step reads only the
key/value groups its token chose (``MoHLlamaAttention.sparse_groups``), and a prompt computes a
routed head's attention to earlier blocks only at the positions that chose it (``sparse_prompt``);
``'auto'`` (the default) uses them where ``configuration_moh.SPARSE_CROSSOVERS`` measured them faster.
Outputs equal the dense path's (fp32 within 1e-5). While torch.compile traces (compiled generation)
every call is dense: the sparse paths plan on the host.
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

from .configuration_moh import MoHLlamaConfig, skipped_attention, sparse_pays

QUERY_NORM_STD_EPS = 1e-6


def prompt_block(length: int) -> int:
    """Positions per block of a prompt's head-sparse attention (MoHLlamaAttention.sparse_prompt):
    shorter blocks follow the causal triangle more closely, longer ones make fewer calls on larger
    query tiles. On CPU (one layer, 1 thread, 128 to 1024 tried) 256 was fastest up to 2048 tokens and
    as fast as 512 and 1024 at 4096; at 8192, 1024 took 0.88 x dense SDPA's time against 0.95 with 256
    (75% active), 0.68 against 0.78 (50%). Longer prompts keep 1024, the longest block measured."""
    return min(1024, max(256, length // 8))


def _flash_cpu():
    """torch's CPU flash-attention op, which also returns the log-sum-exp, or None without it."""
    try:
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    except (AttributeError, RuntimeError):
        return None


_FLASH_CPU = _flash_cpu()


def _runs(flags: list[bool]) -> list[tuple[int, int]]:
    """``(start, end)`` of each run of consecutive True entries."""
    runs, start = [], None
    for i, flag in enumerate([*flags, False]):
        if flag and start is None:
            start = i
        elif not flag and start is not None:
            runs.append((start, i))
            start = None
    return runs


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
        density = self.topk / self.num_routed if self.num_routed else 1.0
        self.skipped = {phase: skipped_attention(phase, self.num_heads, config.num_key_value_heads, self.num_shared,
                                                 density) for phase in ("prefill", "decode")}
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

        The head-sparse paths (:meth:`sparse_path`) or the configured attention interface over
        every head; both give the same gated output.
        """
        path = self.sparse_path(query, key, attention_mask, kwargs)
        if path == "prompt":
            return self.sparse_prompt(query, key, value, gates), None
        if path == "groups":
            return self.sparse_groups(query, key, value, attention_mask, gates), None
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

    def sparse_path(self, query, key, attention_mask, kwargs) -> str | None:
        """Which head-sparse path runs this call, or None for the dense interface.

        ``'prompt'`` (:meth:`sparse_prompt`) for a causal prompt on CPU (no mask and no cache offset,
        what the sdpa interface gets for an unpadded prefill) without autograd (its merge goes through
        log-sum-exps that torch's flash op gives no gradient); ``'groups'`` (:meth:`sparse_groups`)
        for any other call the eager and sdpa interfaces can take. ``moh_attention_impl='sparse'``
        always uses them; ``'auto'`` only where ``sparse_pays`` says they are faster (decoding steps
        on ``'groups'``, causal prompts on ``'prompt'``). Dense while torch.compile traces (the sparse
        paths plan on the host), with dropout or returned attention weights, and for other interfaces.
        """
        impl = self.config.moh_attention_impl
        if (
            impl == "dense"
            or self.num_routed == 0
            or torch.compiler.is_compiling()
            or self.config._attn_implementation not in ("eager", "sdpa")
            or not (attention_mask is None or (isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 4))
            or (self.training and self.attention_dropout > 0)
            or kwargs.get("output_attentions", False)
            or getattr(self.config, "output_attentions", False)
        ):
            return None
        length, keys = query.shape[2], key.shape[2]
        prompt = (attention_mask is None and 1 < length == keys and query.device.type == "cpu"
                  and _FLASH_CPU is not None and not (torch.is_grad_enabled() and query.requires_grad))
        if impl == "sparse":
            return "prompt" if prompt else "groups"
        phase = "decode" if length == 1 else "prefill"
        if phase == "prefill" and not prompt:
            return None
        if sparse_pays(query.device.type, phase, keys, self.skipped[phase], torch.get_num_threads()):
            return "prompt" if prompt else "groups"
        return None

    def sparse_groups(self, query, key, value, attention_mask, gates) -> torch.Tensor:
        """Attention of the key/value groups that a sequence's tokens use, output ``[B, T, H, D]``.

        For each sequence, one SDPA call per run of consecutive groups holding a head with a nonzero
        gate for one of its ``T`` tokens (the shared heads lead, so they join the first run), on views
        of the cache: the keys and values of the other groups are not read. In a decoding step
        (``T = 1``) that is every group the token chose. Heads of unused groups are 0; the mask is
        the interface's (4D bool or additive, or None: causal for several tokens, as sdpa's).
        """
        batch, heads, length, dim = query.shape
        num_kv, keys = key.shape[1], key.shape[2]
        group = heads // num_kv
        if attention_mask is not None:
            attention_mask = attention_mask[..., :keys]
        used = (gates != 0).any(dim=1).view(batch, num_kv, group).any(dim=-1)
        out = query.new_zeros(batch, heads, length, value.shape[-1])
        # One token with GQA: a group's query heads become the query rows of its key/value head (as
        # transformers' sdpa interface does), faster than SDPA's enable_gqa with a mask.
        pack = length == 1 and group > 1
        for b, flags in enumerate(used.tolist()):
            for first, end in _runs(flags):
                a, z = first * group, end * group
                q = query[b : b + 1, a:z]
                mask = None
                if attention_mask is not None:
                    mask = attention_mask[b : b + 1]
                    mask = mask[:, a:z] if mask.shape[1] > 1 else mask
                if pack:
                    q = q.reshape(1, end - first, group, dim)
                    mask = mask if mask is None or mask.shape[1] == 1 else mask.reshape(1, end - first, group, -1)
                attended = F.scaled_dot_product_attention(
                    q, key[b : b + 1, first:end], value[b : b + 1, first:end], attn_mask=mask,
                    is_causal=mask is None and length > 1, scale=self.scaling, enable_gqa=group > 1 and not pack,
                )
                out[b : b + 1, a:z] = attended.reshape(1, z - a, length, -1)
        return out.transpose(1, 2)

    def sparse_prompt(self, query, key, value, gates, block: int | None = None) -> torch.Tensor:
        """Causal attention of a prompt (no mask, no cache offset) that computes each routed head's
        attention to earlier blocks only at the positions whose gate is nonzero, output
        ``[B, T, H, D]`` (rows with a zero gate hold finite values that the gates then zero).

        Groups holding a shared head run torch's causal SDPA. The other key/value groups are lanes
        whose rows are (query head of the group, position) pairs, cut into blocks of
        ``block`` positions. A row sees its own block causally and the blocks before it whole:
        the first part runs for every row, in one causal call over all blocks (a small triangle per
        block); the second only for the chosen rows of each block (padded to the busiest lane), one
        call per block without a mask. The parts merge through their log-sum-exps, which torch's CPU
        flash op returns. The work then follows the causal triangle of the chosen rows.
        """
        batch, heads, length, dim = query.shape
        block = block or prompt_block(length)
        num_kv = key.shape[1]
        group = heads // num_kv
        first = -(-self.num_shared // group)  # groups before it hold a shared head
        out = query.new_empty(batch, heads, length, dim)
        if first:
            out[:, : first * group] = F.scaled_dot_product_attention(
                query[:, : first * group], key[:, :first], value[:, :first], is_causal=True,
                scale=self.scaling, enable_gqa=group > 1,
            )
        lanes = num_kv - first
        if lanes == 0:
            return out.transpose(1, 2)
        out[:, first * group :] = 0
        blocks = -(-length // block)
        pad = blocks * block - length
        device = query.device

        def by_block(t: torch.Tensor, heads_per_lane: int) -> torch.Tensor:
            """``[B, lanes * h, T, D]`` -> ``[B * lanes * blocks, h, block, D]``, zero-padded (a view
            where the layout allows)."""
            t = F.pad(t, (0, 0, 0, pad)) if pad else t
            t = t.reshape(batch, lanes, heads_per_lane, blocks, block, dim)
            return t.transpose(2, 3).reshape(batch * lanes * blocks, heads_per_lane, block, dim)

        q_blocks = by_block(query[:, first * group :], group)
        own_out, own_lse = _FLASH_CPU(q_blocks, by_block(key[:, first:], 1), by_block(value[:, first:], 1),
                                      0.0, True, scale=self.scaling)[:2]

        # chosen[b, lane, j, i * block + o]: head i of the lane's group at position j * block + o
        chosen = F.pad(gates[:, :, first * group :] != 0, (0, 0, 0, pad))
        chosen = chosen.view(batch, blocks, block, lanes, group).permute(0, 3, 1, 4, 2)
        chosen = chosen.reshape(batch, lanes, blocks, group * block)
        counts = chosen.sum(dim=-1).amax(dim=(0, 1)).tolist()  # chosen rows per block, busiest lane
        rows = max(counts)
        # A stable sort of "not chosen" lists the chosen rows first, in order; the padding rows
        # after them are other rows of the block, computed exactly too.
        order = torch.sort((~chosen).to(torch.uint8), dim=-1, stable=True).indices[..., :rows]

        def pick(t: torch.Tensor) -> torch.Tensor:
            """Rows ``order`` of a ``[B * lanes * blocks, h, block, ...]`` tensor."""
            t = t.reshape(batch, lanes, blocks, group * block, -1)
            return t.gather(3, order[..., None].expand(-1, -1, -1, -1, t.shape[-1]))

        q_rows, merged, own_lse = pick(q_blocks), pick(own_out), pick(own_lse)[..., 0]
        for j in range(1, blocks):  # the blocks before block j, whole, for its chosen rows
            r = counts[j]
            if r == 0:
                continue
            before, before_lse = _FLASH_CPU(q_rows[:, :, j, :r], key[:, first:, : j * block],
                                            value[:, first:, : j * block], 0.0, False, scale=self.scaling)[:2]
            own = own_lse[:, :, j, :r]
            lse = torch.logaddexp(before_lse, own)
            merged[:, :, j, :r] = (torch.exp(before_lse - lse)[..., None] * before
                                   + torch.exp(own - lse)[..., None] * merged[:, :, j, :r])

        position = order % block + torch.arange(blocks, device=device)[:, None] * block
        head = (first + torch.arange(lanes, device=device))[:, None, None] * group + order // block
        done = torch.arange(rows, device=device) < torch.tensor(counts, device=device)[:, None]
        done = done & (position < length)  # [B, lanes, blocks, R]
        sequence = torch.arange(batch, device=device)[:, None, None, None].expand_as(done)
        out[sequence[done], head[done], position[done]] = merged[done].to(out.dtype)
        return out.transpose(1, 2)

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
