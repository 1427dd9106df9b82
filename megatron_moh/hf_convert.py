"""Megatron <-> Hugging Face conversion for MoH Llama models: weight maps, configs, export, import.

The weight maps are pure functions on whole (TP=1, PP=1) state dicts, so whoever gathers a
sharded megatron checkpoint calls them once the tensors are whole. Megatron's fused QKV weight
holds, for each query group, its query heads' rows then one key head's rows then one value head's
rows; its ``linear_fc1`` stacks the SwiGLU gate rows on the up rows. The maps only split and
concatenate, so ``hf_to_megatron(megatron_to_hf(sd, c), c)`` equals ``sd`` bit for bit.

Exports are ``moh_llama`` checkpoints whose configuration and modeling files (megatron_moh/hf)
travel with the weights, so ``AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)``
loads them anywhere transformers 5 is installed. A model whose gates are all exactly 1 can also
be exported as a plain ``LlamaForCausalLM`` with no custom code (`save_dense_hf_checkpoint`).

Imports start from a plain Llama checkpoint and a chosen MoH layout. Initialisation documented
here and relied on by callers:

* query-norm router: nothing to initialise. ``MoHLayout.published(heads)`` is the layout of the
  published MoH-LLaMA3 checkpoints (plain Llama weights, query-norm router, binary gates, first
  50% of heads shared, 25% of heads routed-active); ``MoHLayout.dense(heads)`` keeps every head.
* learned router: the router weight starts at ZERO. Every softmax is then uniform, so shared
  gates are ``h_s * (1 / h_s)``, two-stage weights ``2 * (1 / 2) = 1`` and weighted routed gates
  ``k * (1/E) / (k/E)``: 1 up to float rounding (exactly 1 when the head counts are powers of
  two; off by an ulp otherwise), and the top-k among equal probabilities is whatever
  ``torch.topk`` returns for ties. Only an all-shared layout with binary gates is exactly the
  dense model; any routed layout changes the function until the router is trained.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from megatron_moh.hf.configuration_moh import MoHLlamaConfig

HF_CODE_DIR = Path(__file__).parent / "hf"
HF_CODE_FILES = ("configuration_moh.py", "modeling_moh.py")
EXTRA_STATE_SUFFIX = "_extra_state"

# Per-layer tensors that keep their shape: megatron name -> Llama name (both after the layer prefix).
_LAYER_RENAMES = {
    "input_layernorm.weight": "input_layernorm.weight",
    "pre_mlp_layernorm.weight": "post_attention_layernorm.weight",
    "self_attention.linear_proj.weight": "self_attn.o_proj.weight",
    "self_attention.router.weight": "self_attn.router.weight",
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


class ConversionError(ValueError):
    """A checkpoint or config that cannot be converted; the message says what to change."""


# --------------------------------------------------------------------------------------------
# Shapes shared by both directions


@dataclass(frozen=True)
class _Shape:
    layers: int
    hidden: int
    heads: int
    groups: int
    head_dim: int
    ffn: int


def _shape(config: Any) -> _Shape:
    """Layer count and widths from a megatron TransformerConfig or a Hugging Face Llama config."""
    if hasattr(config, "num_hidden_layers"):  # Hugging Face
        heads = config.num_attention_heads
        return _Shape(
            layers=config.num_hidden_layers,
            hidden=config.hidden_size,
            heads=heads,
            groups=config.num_key_value_heads or heads,
            head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
            ffn=config.intermediate_size,
        )
    heads = config.num_attention_heads
    return _Shape(
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
    s = _shape(config)
    sd = {k: v for k, v in state_dict.items() if not k.endswith(EXTRA_STATE_SUFFIX)}
    q_rows = s.heads // s.groups * s.head_dim
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
        qkv = _take(sd, src + "self_attention.linear_qkv.weight",
                    ((s.heads + 2 * s.groups) * s.head_dim, s.hidden))
        per_group = qkv.view(s.groups, q_rows + 2 * s.head_dim, s.hidden)
        q, k, v = per_group.split([q_rows, s.head_dim, s.head_dim], dim=1)
        out[dst + "self_attn.q_proj.weight"] = q.reshape(s.heads * s.head_dim, s.hidden).clone()
        out[dst + "self_attn.k_proj.weight"] = k.reshape(s.groups * s.head_dim, s.hidden).clone()
        out[dst + "self_attn.v_proj.weight"] = v.reshape(s.groups * s.head_dim, s.hidden).clone()
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
    s = _shape(config)
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
        q = _take(sd, src + "self_attn.q_proj.weight", (s.heads * s.head_dim, s.hidden))
        k = _take(sd, src + "self_attn.k_proj.weight", (s.groups * s.head_dim, s.hidden))
        v = _take(sd, src + "self_attn.v_proj.weight", (s.groups * s.head_dim, s.hidden))
        per_group = [t.reshape(s.groups, -1, s.hidden) for t in (q, k, v)]
        out[dst + "self_attention.linear_qkv.weight"] = torch.cat(per_group, dim=1).reshape(-1, s.hidden)
        gate = _take(sd, src + "mlp.gate_proj.weight", (s.ffn, s.hidden))
        up = _take(sd, src + "mlp.up_proj.weight", (s.ffn, s.hidden))
        out[dst + "mlp.linear_fc1.weight"] = torch.cat([gate, up], dim=0)
        if backend == "te":
            for local_name, te_name in _TE_NORM_NAMES.items():
                if local_name.startswith("pre_mlp") and dst + local_name in out:
                    out[dst + te_name] = out.pop(dst + local_name)
    _refuse_leftovers(sd, "Hugging Face")
    return out


# --------------------------------------------------------------------------------------------
# Configs


@dataclass(frozen=True)
class MoHLayout:
    """Which heads are shared, how many routed heads a token keeps, and the router and gates."""

    num_shared_heads: int
    topk: int
    router: str = "query_norm"
    gate: str = "binary"
    two_stage: bool = False

    @classmethod
    def dense(cls, heads: int) -> MoHLayout:
        """Every head shared, gates exactly 1: the imported model computes what the Llama did."""
        return cls(num_shared_heads=heads, topk=0)

    @classmethod
    def published(cls, heads: int) -> MoHLayout:
        """The published MoH-LLaMA3 layout: first 50% of heads shared, 25% of heads routed-active,
        query-norm router, binary gates."""
        return cls(num_shared_heads=int(heads * 0.5), topk=int(heads * 0.25))

    def as_hf_fields(self) -> dict[str, Any]:
        """The ``moh_*`` fields of a MoHLlamaConfig."""
        return dict(moh_num_shared_heads=self.num_shared_heads, moh_topk=self.topk,
                    moh_router=self.router, moh_gate=self.gate, moh_two_stage=self.two_stage)


LAYOUT_PRESETS = ("dense", "published")


def _resolve_layout(layout: MoHLayout | str, heads: int) -> MoHLayout:
    if isinstance(layout, MoHLayout):
        return layout
    if layout == "dense":
        return MoHLayout.dense(heads)
    if layout == "published":
        return MoHLayout.published(heads)
    raise ConversionError(f"layout={layout!r} is unknown: use a MoHLayout or one of {', '.join(LAYOUT_PRESETS)}")


def _check_llama_like(config: Any) -> None:
    """Refuse megatron settings that a Llama (RMSNorm, SwiGLU, RoPE, no biases) cannot express."""
    problems = {
        "normalization must be 'RMSNorm'": config.normalization != "RMSNorm",
        "gated_linear_unit must be True (SwiGLU)": not config.gated_linear_unit,
        "activation_func must be F.silu": config.activation_func is not F.silu,
        "add_bias_linear must be False": config.add_bias_linear,
        "add_qkv_bias must be False": getattr(config, "add_qkv_bias", False),
        "qk_layernorm must be False": getattr(config, "qk_layernorm", False),
        "layernorm_zero_centered_gamma must be False": getattr(config, "layernorm_zero_centered_gamma", False),
        "rotary_interleaved must be False": getattr(config, "rotary_interleaved", False),
    }
    for what, bad in problems.items():
        if bad:
            raise ConversionError(f"this megatron config is not Llama-shaped: {what} for a Hugging Face export")


def moh_hf_config(
    megatron_config: Any,
    vocab_size: int,
    max_position_embeddings: int,
    rotary_base: float = 10000,
    tie_embeddings: bool = False,
    **extra: Any,
) -> MoHLlamaConfig:
    """MoHLlamaConfig equivalent to a megatron MoHTransformerConfig (plus the GPTModel build
    arguments that the TransformerConfig does not hold). ``extra`` goes to the config as is
    (e.g. ``bos_token_id``, ``eos_token_id``, ``pad_token_id``)."""
    _check_llama_like(megatron_config)
    s = _shape(megatron_config)
    dtype = megatron_config.params_dtype
    return MoHLlamaConfig(
        vocab_size=vocab_size,
        hidden_size=s.hidden,
        intermediate_size=s.ffn,
        num_hidden_layers=s.layers,
        num_attention_heads=s.heads,
        num_key_value_heads=s.groups,
        head_dim=s.head_dim,
        hidden_act="silu",
        max_position_embeddings=max_position_embeddings,
        rms_norm_eps=megatron_config.layernorm_epsilon,
        rope_parameters={"rope_type": "default", "rope_theta": float(rotary_base)},
        tie_word_embeddings=tie_embeddings,
        attention_bias=False,
        mlp_bias=False,
        moh_num_shared_heads=megatron_config.moh_num_shared_heads,
        moh_topk=megatron_config.moh_topk,
        moh_router=megatron_config.moh_router,
        moh_gate=megatron_config.moh_gate,
        moh_two_stage=bool(megatron_config.moh_two_stage),
        moh_attention_impl=megatron_config.moh_attention_impl,
        dtype=str(dtype).removeprefix("torch.") if dtype is not None else None,
        **extra,
    )


def _rope_theta(hf_config: Any) -> float:
    rope = getattr(hf_config, "rope_parameters", None) or {}
    if rope.get("rope_type", "default") != "default":
        raise ConversionError(f"rope_type={rope.get('rope_type')!r} is not supported by the megatron "
                              f"builder: only default RoPE (no scaling) converts")
    return float(rope.get("rope_theta", getattr(hf_config, "rope_theta", 10000.0)))


def moh_config_from_llama(llama_config: Any, layout: MoHLayout | str) -> MoHLlamaConfig:
    """A MoHLlamaConfig for a plain Llama config plus a layout: how a published MoH-LLaMA3
    checkpoint (plain Llama weights and config) becomes a ``moh_llama`` one."""
    fields = llama_config.to_dict()
    for key in ("model_type", "auto_map", "architectures", "transformers_version"):
        fields.pop(key, None)
    return MoHLlamaConfig(**fields, **_resolve_layout(layout, llama_config.num_attention_heads).as_hf_fields())


def megatron_config_kwargs(hf_config: Any, layout: MoHLayout | str | None = None) -> dict[str, Any]:
    """Keyword arguments for `megatron_moh.builder.llama_moh_config` from a Llama or MoH-Llama config.

    A plain Llama config has no MoH fields: pass ``layout`` ('dense', 'published' or a MoHLayout).
    For a MoH-Llama config ``layout`` must be None (its own layout is used).
    """
    if getattr(hf_config, "hidden_act", "silu") != "silu":
        raise ConversionError(f"hidden_act={hf_config.hidden_act!r} is not supported: only SwiGLU (silu) converts")
    if getattr(hf_config, "attention_bias", False) or getattr(hf_config, "mlp_bias", False):
        raise ConversionError("attention_bias / mlp_bias are not supported: only bias-free Llamas convert")
    _rope_theta(hf_config)
    s = _shape(hf_config)
    if getattr(hf_config, "model_type", None) == MoHLlamaConfig.model_type:
        if layout is not None:
            raise ConversionError("this config already has a MoH layout: pass layout=None")
        moh = dict(moh_num_shared_heads=hf_config.moh_num_shared_heads, moh_topk=hf_config.moh_topk,
                   moh_router=hf_config.moh_router, moh_gate=hf_config.moh_gate,
                   moh_two_stage=bool(hf_config.moh_two_stage),
                   moh_attention_impl=getattr(hf_config, "moh_attention_impl", "dense"))
    else:
        if layout is None:
            raise ConversionError("a plain Llama config has no MoH layout: pass layout='dense', "
                                  "'published' or a MoHLayout")
        chosen = _resolve_layout(layout, s.heads)
        moh = dict(moh_num_shared_heads=chosen.num_shared_heads, moh_topk=chosen.topk,
                   moh_router=chosen.router, moh_gate=chosen.gate, moh_two_stage=chosen.two_stage)
    return dict(
        num_layers=s.layers,
        hidden_size=s.hidden,
        num_attention_heads=s.heads,
        num_query_groups=s.groups,
        kv_channels=s.head_dim,
        ffn_hidden_size=s.ffn,
        layernorm_epsilon=hf_config.rms_norm_eps,
        **moh,
    )


def megatron_model_kwargs(hf_config: Any) -> dict[str, Any]:
    """Keyword arguments for `megatron_moh.builder.build_gpt_model` besides the config."""
    return dict(
        vocab_size=hf_config.vocab_size,
        max_sequence_length=hf_config.max_position_embeddings,
        rotary_base=_rope_theta(hf_config),
        share_embeddings_and_output_weights=bool(hf_config.tie_word_embeddings),
    )


def is_dense(hf_config: Any) -> bool:
    """True when every gate is exactly 1: all heads shared and no learned weighting of them."""
    if getattr(hf_config, "model_type", None) != MoHLlamaConfig.model_type:
        return True
    return (
        hf_config.moh_topk == 0
        and hf_config.moh_num_shared_heads == hf_config.num_attention_heads
        and (hf_config.moh_gate == "binary" or hf_config.moh_router == "query_norm")
    )


# --------------------------------------------------------------------------------------------
# Writing checkpoints


def _build_on_meta(model_class: type, config: Any, state_dict: dict[str, Tensor]) -> torch.nn.Module:
    """A model holding ``state_dict``'s tensors without allocating (or initialising) its own."""
    with torch.device("meta"):
        model = model_class(config)
    missing, unexpected = model.load_state_dict(state_dict, strict=False, assign=True)
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    missing = [k for k in missing if k not in tied]
    if missing or unexpected:
        raise ConversionError(f"state dict does not fit the config: missing {missing[:3]}, "
                              f"unexpected {unexpected[:3]}; convert it with megatron_to_hf and the same config")
    if tied:
        model.tie_weights()
    # Non-persistent buffers (RoPE frequencies) stayed on the meta device: rebuild them.
    rotary = model.model.rotary_emb
    inv_freq, rotary.attention_scaling = rotary.compute_default_rope_parameters(config)
    rotary.inv_freq = inv_freq
    rotary.original_inv_freq = inv_freq.clone()
    return model


def _save_tokenizer(out_dir: Path, tokenizer_model_path: str | os.PathLike, config: Any) -> None:
    """Convert a sentencepiece model to a fast tokenizer (same ids) and save it beside the weights;
    the config's special token ids follow the tokenizer's."""
    from transformers import AutoTokenizer

    if not Path(tokenizer_model_path).is_file():
        raise ConversionError(f"tokenizer model {tokenizer_model_path} does not exist: pass the "
                              f"sentencepiece .model file the model was trained with")
    with tempfile.TemporaryDirectory(prefix="moh-tok-") as tmp:
        shutil.copy(tokenizer_model_path, Path(tmp) / "tokenizer.model")
        tokenizer = AutoTokenizer.from_pretrained(tmp)
    if tokenizer.pad_token is None:  # the conversion drops sentencepiece's pad piece; keep it
        import sentencepiece

        processor = sentencepiece.SentencePieceProcessor(model_file=str(tokenizer_model_path))
        if processor.pad_id() >= 0:
            tokenizer.pad_token = processor.id_to_piece(processor.pad_id())
    tokenizer.save_pretrained(out_dir)
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        value = getattr(tokenizer, name, None)
        if value is not None:
            setattr(config, name, value)


def _write(model: torch.nn.Module, out_dir: Path, tokenizer_model_path, max_shard_size) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    if tokenizer_model_path is not None:
        _save_tokenizer(out_dir, tokenizer_model_path, model.config)
        model.generation_config.bos_token_id = model.config.bos_token_id
        model.generation_config.eos_token_id = model.config.eos_token_id
        model.generation_config.pad_token_id = model.config.pad_token_id
    model.save_pretrained(out_dir, max_shard_size=max_shard_size)
    return out_dir


def save_hf_checkpoint(
    out_dir: str | os.PathLike,
    hf_state_dict: dict[str, Tensor],
    hf_config: MoHLlamaConfig,
    tokenizer_model_path: str | os.PathLike | None = None,
    max_shard_size: int | str = "5GB",
) -> Path:
    """Write a ``moh_llama`` checkpoint: config.json (with auto_map), the two modeling files,
    safetensors weights (sharded above ``max_shard_size``), generation_config.json and, given a
    sentencepiece ``tokenizer.model``, a fast tokenizer with the same ids. Loads with
    ``AutoModelForCausalLM.from_pretrained(out_dir, trust_remote_code=True)``."""
    from megatron_moh.hf.modeling_moh import MoHLlamaForCausalLM

    out_dir = Path(out_dir)
    model = _build_on_meta(MoHLlamaForCausalLM, hf_config, hf_state_dict)
    type(hf_config).register_for_auto_class("AutoConfig")
    MoHLlamaForCausalLM.register_for_auto_class("AutoModelForCausalLM")
    _write(model, out_dir, tokenizer_model_path, max_shard_size)
    # save_pretrained copies the files of the classes registered above; make sure both are there
    # even if the classes were loaded from elsewhere (e.g. transformers' remote-code cache).
    for name in HF_CODE_FILES:
        if not (out_dir / name).exists():
            shutil.copy(HF_CODE_DIR / name, out_dir / name)
    return out_dir


def dense_llama_config(hf_config: MoHLlamaConfig) -> Any:
    """The plain LlamaConfig of a dense MoH-Llama config; ValueError if some gate is not exactly 1."""
    from transformers import LlamaConfig

    if not is_dense(hf_config):
        raise ConversionError(
            f"only a dense model exports as plain Llama (moh_topk=0, moh_num_shared_heads="
            f"num_attention_heads, binary gates or the query_norm router), but this one has "
            f"{hf_config.moh_num_shared_heads} shared heads of {hf_config.num_attention_heads}, "
            f"moh_topk={hf_config.moh_topk}, {hf_config.moh_router} router, {hf_config.moh_gate} gates: "
            f"export it without --dense"
        )
    fields = hf_config.to_dict()
    for key in list(fields):
        if key.startswith("moh_") or key in ("model_type", "auto_map", "architectures", "transformers_version"):
            fields.pop(key)
    return LlamaConfig(**fields)


def save_dense_hf_checkpoint(
    out_dir: str | os.PathLike,
    hf_state_dict: dict[str, Tensor],
    hf_config: MoHLlamaConfig,
    tokenizer_model_path: str | os.PathLike | None = None,
    max_shard_size: int | str = "5GB",
) -> Path:
    """Write a plain ``LlamaForCausalLM`` checkpoint (no custom code). Exact only because it
    refuses (ValueError) any model whose gates are not all exactly 1."""
    from transformers import LlamaForCausalLM

    config = dense_llama_config(hf_config)
    state = {k: v for k, v in hf_state_dict.items() if not k.endswith("self_attn.router.weight")}
    routers = [v for k, v in hf_state_dict.items() if k.endswith("self_attn.router.weight")]
    if any(v.numel() for v in routers):
        raise ConversionError("the router weights are not empty although every head is shared: "
                              "convert the state dict with the same config")
    model = _build_on_meta(LlamaForCausalLM, config, state)
    return _write(model, Path(out_dir), tokenizer_model_path, max_shard_size)


# --------------------------------------------------------------------------------------------
# Reading checkpoints


class MegatronImport(NamedTuple):
    """What a Hugging Face checkpoint becomes on the megatron side."""

    state_dict: dict[str, Tensor]
    config_kwargs: dict[str, Any]  # for megatron_moh.builder.llama_moh_config
    model_kwargs: dict[str, Any]  # for megatron_moh.builder.build_gpt_model


def load_hf_config(checkpoint_dir: str | os.PathLike) -> Any:
    """A Llama or MoH-Llama config from ``checkpoint_dir`` without running its remote code."""
    from transformers import LlamaConfig

    path = Path(checkpoint_dir) / "config.json"
    if not path.exists():
        raise ConversionError(f"{path} does not exist: pass a Hugging Face checkpoint directory")
    model_type = json.loads(path.read_text()).get("model_type")
    if model_type == MoHLlamaConfig.model_type:
        return MoHLlamaConfig.from_pretrained(checkpoint_dir)
    if model_type != "llama":
        raise ConversionError(f"model_type={model_type!r} in {path} is not supported: only 'llama' "
                              f"and 'moh_llama' checkpoints import")
    return LlamaConfig.from_pretrained(checkpoint_dir)


def load_hf_state_dict(checkpoint_dir: str | os.PathLike) -> dict[str, Tensor]:
    """All tensors of a (possibly sharded) safetensors checkpoint."""
    from safetensors.torch import load_file

    checkpoint_dir = Path(checkpoint_dir)
    index = checkpoint_dir / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (checkpoint_dir / "model.safetensors").exists():
        files = ["model.safetensors"]
    else:
        raise ConversionError(f"no model.safetensors(.index.json) in {checkpoint_dir}: save the model "
                              f"with safe_serialization (the transformers 5 default)")
    state: dict[str, Tensor] = {}
    for name in files:
        state.update(load_file(checkpoint_dir / name))
    return state


def import_hf_checkpoint(
    checkpoint: str | os.PathLike | tuple[dict[str, Tensor], Any],
    layout: MoHLayout | str | None = None,
    backend: str = "local",
) -> MegatronImport:
    """A Llama (with ``layout``) or MoH-Llama (``layout=None``) checkpoint -> megatron state dict
    and the builder's keyword arguments. ``checkpoint``: a directory, or ``(state_dict, config)``.

    A learned router absent from the checkpoint starts at zero (see the module docstring for what
    that means for the gates); the query-norm router has no weights.
    """
    if isinstance(checkpoint, tuple):
        state, hf_config = checkpoint
        state = dict(state)
    else:
        hf_config = load_hf_config(checkpoint)
        state = load_hf_state_dict(checkpoint)
    config_kwargs = megatron_config_kwargs(hf_config, layout)
    model_kwargs = megatron_model_kwargs(hf_config)
    if config_kwargs["moh_router"] == "learned":
        fields = {k: v for k, v in config_kwargs.items() if k.startswith("moh_")}
        rows = MoHLlamaConfig(num_attention_heads=hf_config.num_attention_heads,
                              hidden_size=hf_config.hidden_size, **fields).moh_router_rows
        dtype = state["model.embed_tokens.weight"].dtype
        for i in range(hf_config.num_hidden_layers):
            key = f"model.layers.{i}.self_attn.router.weight"
            if key not in state:
                state[key] = torch.zeros(rows, hf_config.hidden_size, dtype=dtype)
    return MegatronImport(hf_to_megatron(state, hf_config, backend=backend), config_kwargs, model_kwargs)


__all__ = [
    "ConversionError",
    "MegatronImport",
    "MoHLayout",
    "dense_llama_config",
    "hf_to_megatron",
    "import_hf_checkpoint",
    "is_dense",
    "load_hf_config",
    "load_hf_state_dict",
    "megatron_config_kwargs",
    "megatron_model_kwargs",
    "megatron_to_hf",
    "moh_config_from_llama",
    "moh_hf_config",
    "save_dense_hf_checkpoint",
    "save_hf_checkpoint",
]
