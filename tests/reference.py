"""A plain-torch implementation of MoH attention, written from the paper's equations and the
convention in megatron_moh.config, independent of megatron: the yardstick for the layer tests."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class RefSettings:
    heads: int
    groups: int
    head_dim: int
    shared: int
    topk: int
    router: str  # learned | query_norm
    gate: str  # weighted | binary
    two_stage: bool
    rotary_base: float = 10000.0
    norm_eps: float = 1e-5  # of the q/k norms


def rms_norm(t: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dimension (one attention head for the q/k norms)."""
    return t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + eps) * weight


def rope(t: torch.Tensor, base: float) -> torch.Tensor:
    """Rotary embedding on [s, b, h, d], halves rotated (Llama / megatron non-interleaved)."""
    s, d = t.shape[0], t.shape[-1]
    inv_freq = 1.0 / (base ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
    angles = torch.outer(torch.arange(s, dtype=torch.float32), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)[:, None, None, :]
    first, second = t[..., : d // 2], t[..., d // 2 :]
    return t * angles.cos() + torch.cat([-second, first], dim=-1) * angles.sin()


def reference_gates(x, query, router_weight, cfg: RefSettings, mask=None):
    """Gates [s, b, H], routed probabilities and the top-k mask, per the paper's equations.
    ``mask`` (0/1, [s, b, routed]) replaces the top-k choice: a bf16 run may order near-ties of
    the routing probabilities differently, and that discrete choice is not what a test measures."""
    routed_heads = cfg.heads - cfg.shared
    if cfg.router == "learned":
        logits = (x @ router_weight.t()).float()
        cursor = 0
        if cfg.gate == "weighted" and cfg.shared:
            shared = cfg.shared * torch.softmax(logits[..., : cfg.shared], dim=-1)
            cursor = cfg.shared
        else:
            shared = torch.ones(*x.shape[:-1], cfg.shared)
        routed_logits = logits[..., cursor : cursor + routed_heads]
        stage = 2 * torch.softmax(logits[..., -2:], dim=-1) if cfg.two_stage else None
    else:
        norms = query.float().pow(2).sum(-1).sqrt()[..., cfg.shared :]
        routed_logits = norms / norms.std(dim=-1, keepdim=True)
        shared = torch.ones(*x.shape[:-1], cfg.shared)
        stage = None
    if routed_heads == 0:
        return shared, None, None
    probs = torch.softmax(routed_logits, dim=-1)
    if mask is None:
        order = torch.sort(probs, dim=-1, descending=True).indices[..., : cfg.topk]
        mask = torch.zeros_like(probs)
        mask.scatter_(-1, order, 1.0)
    if cfg.gate == "weighted":
        routed = cfg.topk * (mask * probs) / (mask * probs).sum(-1, keepdim=True)
    else:
        routed = mask + mask * (probs - probs.detach())
    if stage is not None:
        shared = shared * stage[..., 0:1]
        routed = routed * stage[..., 1:2]
    return torch.cat([shared, routed], dim=-1), probs, mask


def reference_load_balance(probs, mask, cfg: RefSettings):
    """The MoH reference code's ``l_aux = mean(me * ce) * E * E``: ``me`` the mean routed
    probability per head, ``ce`` the fraction of tokens that chose each head (summing to k)."""
    routed_heads = cfg.heads - cfg.shared
    me = probs.reshape(-1, routed_heads).mean(0)
    ce = mask.reshape(-1, routed_heads).float().mean(0)
    return torch.mean(me * ce) * routed_heads * routed_heads


def reference_moh_attention(x, w_qkv, w_proj, router_weight, cfg: RefSettings, mask=None, qkv_bias=None,
                            q_norm=None, k_norm=None):
    """x [s, b, hidden] -> (output [s, b, hidden], gates, probs, mask); ``mask`` as in
    reference_gates. ``qkv_bias``: the fused projection's bias (Qwen2-style); ``q_norm``/``k_norm``:
    per-head RMSNorm weights [head_dim] (Qwen3-style), applied before RoPE; the router sees the
    queries before the norm."""
    s, b, _ = x.shape
    per_group = cfg.heads // cfg.groups
    d = cfg.head_dim
    qkv = x @ w_qkv.t() + (0 if qkv_bias is None else qkv_bias)
    qkv = qkv.view(s, b, cfg.groups, (per_group + 2) * d)
    query = qkv[..., : per_group * d].reshape(s, b, cfg.heads, d)
    key = qkv[..., per_group * d : (per_group + 1) * d]
    value = qkv[..., (per_group + 1) * d :]
    gates, probs, mask = reference_gates(x, query, router_weight, cfg, mask)
    if q_norm is not None:
        query, key = rms_norm(query, q_norm, cfg.norm_eps), rms_norm(key, k_norm, cfg.norm_eps)
    query, key = rope(query, cfg.rotary_base), rope(key, cfg.rotary_base)
    key = key.repeat_interleave(per_group, dim=2)
    value = value.repeat_interleave(per_group, dim=2)
    scores = torch.einsum("sbhd,tbhd->bhst", query, key) / math.sqrt(d)
    causal = torch.ones(s, s, dtype=torch.bool).triu(1)
    weights = torch.softmax(scores.masked_fill(causal, float("-inf")), dim=-1)
    heads = torch.einsum("bhst,tbhd->sbhd", weights, value)
    mixed = (heads * gates.unsqueeze(-1)).reshape(s, b, cfg.heads * d)
    return mixed @ w_proj.t(), gates, probs, mask
