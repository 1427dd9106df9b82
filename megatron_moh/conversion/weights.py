"""Megatron <-> Hugging Face weight maps for Llama-shaped MoH models, one tensor at a time.

Each megatron tensor is made of one or more Hugging Face tensors by one rule (`_LAYER_RULES`,
`_GLOBAL_RULES`): a rename, megatron's fused QKV (weight or bias), or the SwiGLU ``linear_fc1``.
`tensor_maps` instantiates the rules for a model's layers and shapes. The whole-state-dict maps
`megatron_to_hf` and `hf_to_megatron` are loops over those maps, and the streaming converters
(`megatron_moh.conversion.hf_checkpoint`) run the same maps tensor by tensor, so there is one
conversion, whatever holds the tensors.

Megatron's fused QKV weight holds, for each query group, its query heads' rows then one key head's
rows then one value head's rows; its ``linear_fc1`` stacks the SwiGLU gate rows on the up rows; the
fused QKV bias (``--add-qkv-bias``) follows the weight's rows. The maps only split and concatenate,
so ``hf_to_megatron(megatron_to_hf(sd, c), c)`` equals ``sd`` bit for bit. They work on meta
tensors too, which is how the streaming converters check names and shapes before reading any data.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from megatron_moh.conversion import ConversionError

EXTRA_STATE_SUFFIX = "_extra_state"
BACKENDS = ("local", "te")
# Megatron tensors whose rows are the (padded) vocabulary.
VOCAB_TENSORS = ("embedding.word_embeddings.weight", "output_layer.weight")

Shape = tuple[int | None, ...]  # None: any size (the vocabulary, the router's rows)


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


def _qkv_widths(s: LayerShape) -> tuple[int, int, int]:
    return s.heads * s.head_dim, s.groups * s.head_dim, s.groups * s.head_dim


def _split_qkv(s: LayerShape, fused: Tensor) -> list[Tensor]:
    """megatron's per-group ``[q rows, k rows, v rows]`` (weight or bias) -> q, k, v copies."""
    q_rows = s.heads // s.groups * s.head_dim
    per_group = fused.reshape(s.groups, q_rows + 2 * s.head_dim, *fused.shape[1:])
    q, k, v = per_group.split([q_rows, s.head_dim, s.head_dim], dim=1)
    return [t.reshape(-1, *fused.shape[1:]).clone() for t in (q, k, v)]


def _fuse_qkv(s: LayerShape, tensors: Sequence[Tensor]) -> Tensor:
    """Inverse of `_split_qkv`."""
    per_group = [t.reshape(s.groups, -1, *t.shape[1:]) for t in tensors]
    return torch.cat(per_group, dim=1).reshape(-1, *tensors[0].shape[1:])


def _split_swiglu(s: LayerShape, fused: Tensor) -> list[Tensor]:
    """``linear_fc1`` -> gate and up copies (copies: safetensors refuses tensors sharing storage)."""
    return [half.clone() for half in fused.split(s.ffn, dim=0)]


def _fuse_swiglu(s: LayerShape, tensors: Sequence[Tensor]) -> Tensor:
    return torch.cat(list(tensors), dim=0)


def _only(s: LayerShape, tensors: Sequence[Tensor]) -> Tensor:
    return tensors[0]


def _alone(s: LayerShape, tensor: Tensor) -> list[Tensor]:
    return [tensor]


# --------------------------------------------------------------------------------------------
# The rules


@dataclass(frozen=True)
class _Rule:
    """One megatron tensor (name after ``decoder.layers.{i}.`` for a layer rule) and the Hugging
    Face tensors (after ``model.layers.{i}.``) it is made of."""

    megatron: str
    hf: tuple[str, ...]
    shapes: Callable[[LayerShape], tuple[Shape, ...]]  # the Hugging Face tensors' shapes
    fuse: Callable[[LayerShape, Sequence[Tensor]], Tensor] = _only  # Hugging Face -> megatron
    split: Callable[[LayerShape, Tensor], list[Tensor]] = _alone  # megatron -> Hugging Face
    optional: bool = False  # only some models have it: whether this one does is its state dict's to say
    te_name: str | None = None  # its name in this project's Transformer Engine layers
    aliases: tuple[str, ...] = ()  # other megatron names that hold it (megatron's own TE layers)


def _norm(s: LayerShape) -> tuple[Shape, ...]:
    return ((s.hidden,),)


_LAYER_RULES = (
    # Transformer Engine layers fuse a norm into the following linear (same tensor, other name).
    # This project's TE spec fuses the pre-MLP norm only (the learned router reads the normed input,
    # so the input norm stays a module of its own); megatron's TE layers also fuse the input norm.
    _Rule("input_layernorm.weight", ("input_layernorm.weight",), _norm,
          aliases=("self_attention.linear_qkv.layer_norm_weight",)),
    _Rule("self_attention.linear_qkv.weight",
          ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"),
          lambda s: tuple((width, s.hidden) for width in _qkv_widths(s)), _fuse_qkv, _split_qkv),
    _Rule("self_attention.linear_qkv.bias",  # --add-qkv-bias / Qwen2: q, k and v all biased
          ("self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"),
          lambda s: tuple((width,) for width in _qkv_widths(s)), _fuse_qkv, _split_qkv, optional=True),
    _Rule("self_attention.q_layernorm.weight", ("self_attn.q_norm.weight",),  # --qk-layernorm / Qwen3
          lambda s: ((s.head_dim,),), optional=True),
    _Rule("self_attention.k_layernorm.weight", ("self_attn.k_norm.weight",),
          lambda s: ((s.head_dim,),), optional=True),
    _Rule("self_attention.router.weight", ("self_attn.router.weight",),  # learned router only
          lambda s: ((None, s.hidden),), optional=True),
    _Rule("self_attention.linear_proj.weight", ("self_attn.o_proj.weight",),
          lambda s: ((s.hidden, s.heads * s.head_dim),)),
    _Rule("pre_mlp_layernorm.weight", ("post_attention_layernorm.weight",), _norm,
          te_name="mlp.linear_fc1.layer_norm_weight"),
    _Rule("mlp.linear_fc1.weight", ("mlp.gate_proj.weight", "mlp.up_proj.weight"),
          lambda s: ((s.ffn, s.hidden), (s.ffn, s.hidden)), _fuse_swiglu, _split_swiglu),
    _Rule("mlp.linear_fc2.weight", ("mlp.down_proj.weight",), lambda s: ((s.hidden, s.ffn),)),
)
_GLOBAL_RULES = (
    _Rule("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), lambda s: ((None, s.hidden),)),
    _Rule("decoder.final_layernorm.weight", ("model.norm.weight",), _norm),
    _Rule("output_layer.weight", ("lm_head.weight",), lambda s: ((None, s.hidden),), optional=True),  # untied
)


@dataclass(frozen=True)
class TensorMap:
    """One megatron tensor of a model (``layer`` None: outside the layers) and the Hugging Face
    tensors it is made of."""

    megatron: str  # its name in a state dict of the chosen backend
    aliases: tuple[str, ...]  # other megatron names that hold it
    hf: tuple[str, ...]
    hf_shapes: tuple[Shape, ...]
    optional: bool
    layer: int | None
    rule: _Rule
    shape: LayerShape

    @property
    def names(self) -> tuple[str, ...]:
        """Every megatron name that holds this tensor, the backend's first."""
        return (self.megatron, *self.aliases)

    @property
    def megatron_shape(self) -> Shape:
        """The megatron tensor's shape (None where any size goes)."""
        if len(self.hf_shapes) == 1:  # a rename keeps the shape
            return self.hf_shapes[0]
        return tuple(self.to_megatron([torch.empty(shape, device="meta") for shape in self.hf_shapes]).shape)

    def to_megatron(self, hf_tensors: Sequence[Tensor]) -> Tensor:
        """The megatron tensor, from the Hugging Face tensors in `hf`'s order."""
        return self.rule.fuse(self.shape, hf_tensors)

    def to_hf(self, tensor: Tensor) -> dict[str, Tensor]:
        """The Hugging Face tensors by name, from the megatron tensor."""
        return dict(zip(self.hf, self.rule.split(self.shape, tensor), strict=True))


def tensor_maps(config: Any, backend: str = "local") -> list[TensorMap]:
    """Every tensor a Llama-shaped megatron model of ``config`` (megatron or Hugging Face) can have,
    optional ones included, with its Hugging Face counterparts; ``backend='te'`` names the pre-MLP
    norm as Transformer Engine's fused ``linear_fc1`` does."""
    if backend not in BACKENDS:
        raise ConversionError(f"backend={backend!r} is unknown: use 'local' or 'te'")
    s = shape_of(config)

    def make(rule: _Rule, layer: int | None) -> TensorMap:
        src, dst = ("", "") if layer is None else (f"decoder.layers.{layer}.", f"model.layers.{layer}.")
        names = [rule.megatron, *([rule.te_name] if rule.te_name else []), *rule.aliases]
        if backend == "te" and rule.te_name:
            names.insert(0, names.pop(1))
        return TensorMap(megatron=src + names[0], aliases=tuple(src + name for name in names[1:]),
                         hf=tuple(dst + name for name in rule.hf), hf_shapes=rule.shapes(s),
                         optional=rule.optional, layer=layer, rule=rule, shape=s)

    return [make(_GLOBAL_RULES[0], None),
            *(make(rule, i) for i in range(s.layers) for rule in _LAYER_RULES),
            *(make(rule, None) for rule in _GLOBAL_RULES[1:])]


def _fits(shape: Sequence[int], expected: Shape) -> bool:
    return len(shape) == len(expected) and all(e is None or e == d for d, e in zip(shape, expected))


def _take(sd: dict[str, Tensor], key: str, shape: Shape, whole: str) -> Tensor:
    """Pop ``key``, checking its shape, with an error that names the key (``whole``: what to pass)."""
    if key not in sd:
        raise ConversionError(f"state dict has no {key!r}: pass {whole}")
    tensor = sd.pop(key)
    if not _fits(tensor.shape, shape):
        expected = tuple("any" if d is None else d for d in shape)
        raise ConversionError(f"{key!r} has shape {tuple(tensor.shape)}, expected {expected}: "
                              f"the state dict does not match the config")
    return tensor


def _refuse_leftovers(sd: dict[str, Tensor], what: str) -> None:
    if sd:
        names = ", ".join(sorted(sd)[:4])
        raise ConversionError(f"{len(sd)} {what} tensors have no counterpart ({names}, ...): only Llama-family "
                              f"weights convert (no o_proj or MLP biases, no MoE layers)")


# --------------------------------------------------------------------------------------------
# Whole state dicts

_WHOLE_MEGATRON = "the full (TP=1, PP=1) state dict of a model built with the same config"
_WHOLE_HF = "every tensor of a Llama checkpoint of this config"


def megatron_to_hf(state_dict: dict[str, Any], config: Any) -> dict[str, Tensor]:
    """Full (TP=1, PP=1) megatron GPTModel state dict -> ``moh_llama`` (Llama names + router).

    ``config`` is the model's MoHTransformerConfig (or a Hugging Face config of the same shape).
    ``_extra_state`` entries are ignored; either backend's names are read; a state dict without
    ``output_layer.weight`` (tied embeddings) gives one without ``lm_head.weight``. Renamed tensors
    are passed through (not copied, to spare memory on large models); the pieces of split tensors
    are copies, so no two output tensors share storage (safetensors refuses shared storage).
    """
    sd = {k: v for k, v in state_dict.items() if not k.endswith(EXTRA_STATE_SUFFIX)}
    out: dict[str, Tensor] = {}
    for m in tensor_maps(config):
        name = next((name for name in m.names if name in sd), None)
        if name is None and m.optional:
            continue
        out.update(m.to_hf(_take(sd, name or m.megatron, m.megatron_shape, _WHOLE_MEGATRON)))
    _refuse_leftovers(sd, "megatron")
    return out


def hf_to_megatron(state_dict: dict[str, Tensor], config: Any, backend: str = "local") -> dict[str, Tensor]:
    """``moh_llama`` / Llama state dict -> megatron GPTModel state dict; inverse of `megatron_to_hf`.

    ``backend='te'`` names the pre-MLP norm as Transformer Engine's fused ``linear_fc1`` does.
    No ``_extra_state`` entries are produced; ``GPTModel.load_state_dict(..., strict=True)``
    accepts the result. Without ``lm_head.weight``, or with a Hugging Face ``config`` whose
    ``tie_word_embeddings`` is set, there is no ``output_layer.weight`` (tied embeddings).
    """
    maps = tensor_maps(config, backend)
    sd = dict(state_dict)
    if getattr(config, "tie_word_embeddings", False):  # HF state dicts list the tied head too
        sd.pop("lm_head.weight", None)
    out: dict[str, Tensor] = {}
    for m in maps:
        if m.optional and not any(name in sd for name in m.hf):
            continue
        out[m.megatron] = m.to_megatron([_take(sd, name, shape, _WHOLE_HF) for name, shape in zip(m.hf, m.hf_shapes)])
    _refuse_leftovers(sd, "Hugging Face")
    return out
