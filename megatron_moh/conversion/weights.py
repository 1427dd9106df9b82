"""Megatron <-> Hugging Face weight maps for Llama-shaped MoH models.

Pure functions on whole (TP=1, PP=1) state dicts, so whoever gathers a sharded megatron
checkpoint calls them once the tensors are whole. Megatron's fused QKV weight holds, for each
query group, its query heads' rows then one key head's rows then one value head's rows; its
``linear_fc1`` stacks the SwiGLU gate rows on the up rows; the fused QKV bias (``--add-qkv-bias``)
follows the weight's rows. The maps only split and concatenate, so
``hf_to_megatron(megatron_to_hf(sd, c), c)`` equals ``sd`` bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from megatron_moh.conversion import ConversionError

EXTRA_STATE_SUFFIX = "_extra_state"

# Per-layer tensors that keep their shape: megatron name -> Llama name (both after the layer prefix).
_LAYER_RENAMES = {
    "input_layernorm.weight": "input_layernorm.weight",
    "pre_mlp_layernorm.weight": "post_attention_layernorm.weight",
    "self_attention.linear_proj.weight": "self_attn.o_proj.weight",
    "self_attention.router.weight": "self_attn.router.weight",
    "self_attention.q_layernorm.weight": "self_attn.q_norm.weight",  # --qk-layernorm / Qwen3
    "self_attention.k_layernorm.weight": "self_attn.k_norm.weight",
    "mlp.linear_fc2.weight": "mlp.down_proj.weight",
}
# Transformer Engine layers fuse the norms into the following linear; same tensors, other names.
_TE_NORM_NAMES = {
    "input_layernorm.weight": "self_attention.linear_qkv.layer_norm_weight",
    "pre_mlp_layernorm.weight": "mlp.linear_fc1.layer_norm_weight",
}
_GLOBAL_RENAMES = {
    "embedding.word_embeddings.weight": "model.embed_tokens.weight",
    "decoder.final_layernorm.weight": "model.norm.weight",
    "output_layer.weight": "lm_head.weight",
}


# --------------------------------------------------------------------------------------------
# Shapes shared by both directions


@dataclass(frozen=True)
class LayerShape:
    """The sizes that fix every weight's shape."""

    layers: int
    hidden: int
    heads: int
    groups: int
    head_dim: int
    ffn: int


def shape_of(config: Any) -> LayerShape:
    """Layer count and widths from a megatron TransformerConfig or a Hugging Face Llama config."""
    if hasattr(config, "num_hidden_layers"):  # Hugging Face
        heads = config.num_attention_heads
        return LayerShape(
            layers=config.num_hidden_layers,
            hidden=config.hidden_size,
            heads=heads,
            groups=config.num_key_value_heads or heads,
            head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
            ffn=config.intermediate_size,
        )
    heads = config.num_attention_heads
    return LayerShape(
        layers=config.num_layers,
        hidden=config.hidden_size,
        heads=heads,
        groups=config.num_query_groups or heads,
        head_dim=config.kv_channels or config.hidden_size // heads,
        ffn=config.ffn_hidden_size,
    )


def _take(sd: dict[str, Tensor], key: str, shape: tuple[int, ...] | None = None) -> Tensor:
    """Pop ``key``, checking its shape, with an error that names the key."""
    if key not in sd:
        raise ConversionError(f"state dict has no {key!r}: pass the full (TP=1, PP=1) state dict of a "
                              f"model built with the same config")
    tensor = sd.pop(key)
    if shape is not None and tuple(tensor.shape) != shape:
        raise ConversionError(f"{key!r} has shape {tuple(tensor.shape)}, expected {shape}: "
                              f"the state dict does not match the config")
    return tensor


def _split_qkv(fused: Tensor, s: LayerShape) -> tuple[Tensor, Tensor, Tensor]:
    """megatron's per-group ``[q rows, k rows, v rows]`` (weight or bias) -> q, k, v copies."""
    q_rows = s.heads // s.groups * s.head_dim
    per_group = fused.reshape(s.groups, q_rows + 2 * s.head_dim, *fused.shape[1:])
    q, k, v = per_group.split([q_rows, s.head_dim, s.head_dim], dim=1)
    return tuple(t.reshape(-1, *fused.shape[1:]).clone() for t in (q, k, v))


def _fuse_qkv(q: Tensor, k: Tensor, v: Tensor, s: LayerShape) -> Tensor:
    """Inverse of `_split_qkv`."""
    per_group = [t.reshape(s.groups, -1, *t.shape[1:]) for t in (q, k, v)]
    return torch.cat(per_group, dim=1).reshape(-1, *q.shape[1:])


def _refuse_leftovers(sd: dict[str, Tensor], what: str) -> None:
    if sd:
        names = ", ".join(sorted(sd)[:4])
        raise ConversionError(f"{len(sd)} {what} tensors have no counterpart ({names}, ...): biases, "
                              f"extra norms and pipeline-split state dicts are not supported")


# --------------------------------------------------------------------------------------------
# Weight maps


def megatron_to_hf(state_dict: dict[str, Any], config: Any) -> dict[str, Tensor]:
    """Full (TP=1, PP=1) megatron GPTModel state dict -> ``moh_llama`` (Llama names + router).

    ``config`` is the model's MoHTransformerConfig (or a Hugging Face config of the same shape).
    ``_extra_state`` entries are ignored; a state dict without ``output_layer.weight`` (tied
    embeddings) gives one without ``lm_head.weight``. Renamed tensors are passed through (not
    copied, to spare memory on large models); the pieces of split tensors are copies, so no two
    output tensors share storage (safetensors refuses shared storage).
    """
    s = shape_of(config)
    sd = {k: v for k, v in state_dict.items() if not k.endswith(EXTRA_STATE_SUFFIX)}
    out: dict[str, Tensor] = {}
    for megatron_name, hf_name in _GLOBAL_RENAMES.items():
        if megatron_name in sd:
            out[hf_name] = sd.pop(megatron_name)
    if "model.embed_tokens.weight" not in out:
        raise ConversionError("state dict has no 'embedding.word_embeddings.weight': pass the full "
                              "(TP=1, PP=1) state dict, not one pipeline stage")
    for i in range(s.layers):
        src, dst = f"decoder.layers.{i}.", f"model.layers.{i}."
        for te_name_key, te_name in _TE_NORM_NAMES.items():
            if src + te_name in sd:
                sd[src + te_name_key] = sd.pop(src + te_name)
        for megatron_name, hf_name in _LAYER_RENAMES.items():
            if src + megatron_name in sd:
                out[dst + hf_name] = sd.pop(src + megatron_name)
        qkv_rows = (s.heads + 2 * s.groups) * s.head_dim
        qkv = _take(sd, src + "self_attention.linear_qkv.weight", (qkv_rows, s.hidden))
        for name, tensor in zip("qkv", _split_qkv(qkv, s)):
            out[dst + f"self_attn.{name}_proj.weight"] = tensor
        if src + "self_attention.linear_qkv.bias" in sd:
            bias = _take(sd, src + "self_attention.linear_qkv.bias", (qkv_rows,))
            for name, tensor in zip("qkv", _split_qkv(bias, s)):
                out[dst + f"self_attn.{name}_proj.bias"] = tensor
        gate, up = _take(sd, src + "mlp.linear_fc1.weight", (2 * s.ffn, s.hidden)).split(s.ffn, dim=0)
        out[dst + "mlp.gate_proj.weight"] = gate.clone()
        out[dst + "mlp.up_proj.weight"] = up.clone()
        for name in ("input_layernorm.weight", "post_attention_layernorm.weight", "self_attn.o_proj.weight"):
            if dst + name not in out:
                raise ConversionError(f"state dict has no megatron tensor for {dst + name!r}: pass the "
                                      f"full (TP=1, PP=1) state dict of a Llama-style model")
    _refuse_leftovers(sd, "megatron")
    return out


def hf_to_megatron(state_dict: dict[str, Tensor], config: Any, backend: str = "local") -> dict[str, Tensor]:
    """``moh_llama`` / Llama state dict -> megatron GPTModel state dict; inverse of `megatron_to_hf`.

    ``backend='te'`` names the pre-MLP norm as Transformer Engine's fused ``linear_fc1`` does.
    No ``_extra_state`` entries are produced; ``GPTModel.load_state_dict(..., strict=True)``
    accepts the result. Without ``lm_head.weight``, or with a Hugging Face ``config`` whose
    ``tie_word_embeddings`` is set, there is no ``output_layer.weight`` (tied embeddings).
    """
    if backend not in ("local", "te"):
        raise ConversionError(f"backend={backend!r} is unknown: use 'local' or 'te'")
    s = shape_of(config)
    sd = dict(state_dict)
    if getattr(config, "tie_word_embeddings", False):  # HF state dicts list the tied head too
        sd.pop("lm_head.weight", None)
    out: dict[str, Tensor] = {}
    for megatron_name, hf_name in _GLOBAL_RENAMES.items():
        if hf_name in sd:
            out[megatron_name] = sd.pop(hf_name)
    if "embedding.word_embeddings.weight" not in out:
        raise ConversionError("state dict has no 'model.embed_tokens.weight': pass a whole Llama state dict")
    for i in range(s.layers):
        src, dst = f"model.layers.{i}.", f"decoder.layers.{i}."
        for megatron_name, hf_name in _LAYER_RENAMES.items():
            if src + hf_name in sd:
                out[dst + megatron_name] = sd.pop(src + hf_name)
        widths = {"q": s.heads * s.head_dim, "k": s.groups * s.head_dim, "v": s.groups * s.head_dim}
        qkv = [_take(sd, src + f"self_attn.{n}_proj.weight", (width, s.hidden)) for n, width in widths.items()]
        out[dst + "self_attention.linear_qkv.weight"] = _fuse_qkv(*qkv, s)
        if src + "self_attn.q_proj.bias" in sd:  # Qwen2-style: q, k and v all biased
            biases = [_take(sd, src + f"self_attn.{n}_proj.bias", (width,)) for n, width in widths.items()]
            out[dst + "self_attention.linear_qkv.bias"] = _fuse_qkv(*biases, s)
        gate = _take(sd, src + "mlp.gate_proj.weight", (s.ffn, s.hidden))
        up = _take(sd, src + "mlp.up_proj.weight", (s.ffn, s.hidden))
        out[dst + "mlp.linear_fc1.weight"] = torch.cat([gate, up], dim=0)
        if backend == "te":
            for local_name, te_name in _TE_NORM_NAMES.items():
                if local_name.startswith("pre_mlp") and dst + local_name in out:
                    out[dst + te_name] = out.pop(dst + local_name)
    _refuse_leftovers(sd, "Hugging Face")
    return out
