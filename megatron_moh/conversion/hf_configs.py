"""Megatron MoH configs <-> Hugging Face Llama / MoH-Llama configs, and the MoH layouts an
imported Llama can take.

What converts, both ways (the Llama family as megatron builds it):

* ``--qk-layernorm`` <-> ``moh_qk_norm`` (MoH-Llama) / Qwen3's ``q_norm``, ``k_norm``;
* ``--add-qkv-bias`` <-> ``moh_qkv_bias`` (MoH-Llama) / Qwen2's q, k, v biases. A Llama with
  ``attention_bias`` (o_proj biased too) or ``mlp_bias`` is refused: megatron biases o_proj only
  with ``--add-bias-linear``, which biases the MLP as well;
* ``--use-rope-scaling --rope-scaling-factor F`` <-> ``rope_parameters`` of ``rope_type: llama3``
  with ``factor: F`` and megatron's fixed Llama-3.1 constants (`MEGATRON_LLAMA3_ROPE`); other
  values of those constants, and other RoPE types, are refused;
* ``--tie-embeddings-and-output-weights`` <-> ``tie_word_embeddings``.

Imports read ``llama``, ``qwen2`` and ``qwen3`` (without sliding-window layers) and ``moh_llama``.

Initialisation documented here and relied on by callers:

* query-norm router: nothing to initialise. ``MoHLayout.preset("published", heads)`` is the layout of
  the published MoH-LLaMA3 checkpoints (plain Llama weights, query-norm router, binary gates, first
  50% of heads shared, 25% of heads routed-active); ``MoHLayout.preset("dense", heads)`` keeps every
  head.
* learned router: the router weight starts at ZERO. Every softmax is then uniform, so shared
  gates are ``h_s * (1 / h_s)``, two-stage weights ``2 * (1 / 2) = 1`` and weighted routed gates
  ``k * (1/E) / (k/E)``: 1 up to float rounding (exactly 1 when the head counts are powers of
  two; off by an ulp otherwise), and the top-k among equal probabilities is whatever
  ``torch.topk`` returns for ties. Only an all-shared layout with binary gates is exactly the
  dense model; any routed layout changes the function until the router is trained.
"""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F

from megatron_moh.conversion import ConversionError
from megatron_moh.conversion.weights import shape_of
from megatron_moh.hf.configuration_moh import MoHLlamaConfig
from megatron_moh.layout import MoHConfigError, MoHLayout

# Llama-3.1 RoPE scaling as megatron-core's RotaryEmbedding._apply_scaling hard-codes it (its
# default arguments; only the factor is a flag). tests/unit/test_hf_convert.py pins both sides.
MEGATRON_LLAMA3_ROPE = dict(low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192)
# Plain dense families that import, and the attention options their model_type implies.
LLAMA_FAMILY = {"llama": {}, "qwen2": dict(add_qkv_bias=True), "qwen3": dict(qk_layernorm=True)}


def _resolve_layout(layout: MoHLayout | str, heads: int) -> MoHLayout:
    """A MoHLayout or the name of a preset, resolved for ``heads`` query heads."""
    try:
        return (layout if isinstance(layout, MoHLayout) else MoHLayout.preset(layout, heads)).resolved(heads)
    except MoHConfigError as err:
        raise ConversionError(str(err)) from None


def _check_llama_like(config: Any) -> None:
    """Refuse megatron settings that a Llama (RMSNorm, SwiGLU, RoPE, no biases) cannot express."""
    problems = {
        "normalization must be 'RMSNorm'": config.normalization != "RMSNorm",
        "gated_linear_unit must be True (SwiGLU)": not config.gated_linear_unit,
        "activation_func must be F.silu": config.activation_func is not F.silu,
        "add_bias_linear must be False (use --add-qkv-bias for Qwen2-style q/k/v biases)": config.add_bias_linear,
        "layernorm_zero_centered_gamma must be False": getattr(config, "layernorm_zero_centered_gamma", False),
        "rotary_interleaved must be False": getattr(config, "rotary_interleaved", False),
    }
    for what, bad in problems.items():
        if bad:
            raise ConversionError(f"this megatron config is not Llama-shaped: {what} for a Hugging Face export")


def rope_parameters(rotary_base: float, rope_scaling_factor: float | None = None) -> dict[str, Any]:
    """Hugging Face ``rope_parameters`` of megatron's RoPE (``rope_scaling_factor``: the factor of
    ``--use-rope-scaling``, None without it)."""
    if rope_scaling_factor is None:
        return {"rope_type": "default", "rope_theta": float(rotary_base)}
    return {"rope_type": "llama3", "rope_theta": float(rotary_base), "factor": float(rope_scaling_factor),
            **MEGATRON_LLAMA3_ROPE}


def moh_hf_config(
    megatron_config: Any,
    vocab_size: int,
    max_position_embeddings: int,
    rotary_base: float = 10000,
    tie_embeddings: bool = False,
    rope_scaling_factor: float | None = None,
    **extra: Any,
) -> MoHLlamaConfig:
    """MoHLlamaConfig equivalent to a megatron MoHTransformerConfig (plus the GPTModel build
    arguments that the TransformerConfig does not hold; ``rope_scaling_factor`` only with
    ``--use-rope-scaling``). ``extra`` goes to the config as is (e.g. ``bos_token_id``,
    ``eos_token_id``, ``pad_token_id``)."""
    _check_llama_like(megatron_config)
    s = shape_of(megatron_config)
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
        rope_parameters=rope_parameters(rotary_base, rope_scaling_factor),
        tie_word_embeddings=tie_embeddings,
        attention_bias=False,
        mlp_bias=False,
        moh_qkv_bias=bool(megatron_config.add_qkv_bias),
        moh_qk_norm=bool(megatron_config.qk_layernorm),
        **MoHLayout.of(megatron_config).resolved(s.heads).as_fields(),
        moh_attention_impl=megatron_config.moh_attention_impl,
        dtype=str(dtype).removeprefix("torch.") if dtype is not None else None,
        **extra,
    )


def _megatron_rope(hf_config: Any) -> tuple[float, float | None]:
    """(rotary base, ``--rope-scaling-factor`` or None) of a Hugging Face config's RoPE."""
    rope = dict(getattr(hf_config, "rope_parameters", None) or {})
    theta = float(rope.get("rope_theta", getattr(hf_config, "rope_theta", 10000.0)))
    kind = rope.get("rope_type", "default")
    if kind == "default":
        return theta, None
    if kind != "llama3":
        raise ConversionError(f"rope_type={kind!r} is not supported by the megatron builder: only default RoPE "
                              f"and Llama-3.1 scaling (llama3) convert")
    fixed = {key: rope.get(key) for key in MEGATRON_LLAMA3_ROPE}
    if fixed != MEGATRON_LLAMA3_ROPE:
        raise ConversionError(f"rope_type='llama3' with {fixed} is not expressible: megatron's --use-rope-scaling "
                              f"fixes {MEGATRON_LLAMA3_ROPE} (only the factor is a flag)")
    return theta, float(rope["factor"])


def _attention_options(hf_config: Any) -> dict[str, bool]:
    """megatron's ``add_qkv_bias`` / ``qk_layernorm`` for a Llama-family or MoH-Llama config,
    refusing attention and MLP settings megatron cannot express."""
    model_type = getattr(hf_config, "model_type", "llama")
    if model_type == MoHLlamaConfig.model_type:
        options = dict(add_qkv_bias=bool(hf_config.moh_qkv_bias), qk_layernorm=bool(hf_config.moh_qk_norm))
    elif model_type in LLAMA_FAMILY:
        options = {"add_qkv_bias": False, "qk_layernorm": False, **LLAMA_FAMILY[model_type]}
    else:
        raise ConversionError(f"model_type={model_type!r} is not supported: only "
                              f"{', '.join(map(repr, (*LLAMA_FAMILY, MoHLlamaConfig.model_type)))} convert")
    if getattr(hf_config, "attention_bias", False):
        raise ConversionError(f"{model_type} with attention_bias=True biases o_proj as well as q, k, v: megatron "
                              f"has Qwen2-style q/k/v biases only (--add-qkv-bias), and an o_proj bias only with "
                              f"--add-bias-linear, which biases the MLP too")
    if getattr(hf_config, "mlp_bias", False):
        raise ConversionError("mlp_bias=True is not supported: only MLPs without biases convert")
    if "sliding_attention" in (getattr(hf_config, "layer_types", None) or ()):
        raise ConversionError(f"{model_type} with sliding-window layers is not supported: only full attention "
                              f"converts (use_sliding_window=False)")
    return options


def moh_config_from_llama(llama_config: Any, layout: MoHLayout | str) -> MoHLlamaConfig:
    """A MoHLlamaConfig for a plain Llama config plus a layout: how a published MoH-LLaMA3
    checkpoint (plain Llama weights and config) becomes a ``moh_llama`` one."""
    options = _attention_options(llama_config)
    fields = {key: value for key, value in llama_config.to_dict().items() if key in MoHLlamaConfig().to_dict()}
    for key in ("model_type", "auto_map", "architectures", "transformers_version"):
        fields.pop(key, None)
    return MoHLlamaConfig(**fields, moh_qkv_bias=options["add_qkv_bias"], moh_qk_norm=options["qk_layernorm"],
                          **_resolve_layout(layout, llama_config.num_attention_heads).as_fields())


def megatron_config_kwargs(hf_config: Any, layout: MoHLayout | str | None = None) -> dict[str, Any]:
    """Keyword arguments for `megatron_moh.model.llama_moh_config` from a Llama or MoH-Llama config.

    A plain Llama config has no MoH fields: pass ``layout`` ('dense', 'published' or a MoHLayout).
    For a MoH-Llama config ``layout`` must be None (its own layout is used).
    """
    if getattr(hf_config, "hidden_act", "silu") != "silu":
        raise ConversionError(f"hidden_act={hf_config.hidden_act!r} is not supported: only SwiGLU (silu) converts")
    options = _attention_options(hf_config)
    _megatron_rope(hf_config)
    s = shape_of(hf_config)
    if getattr(hf_config, "model_type", None) == MoHLlamaConfig.model_type:
        if layout is not None:
            raise ConversionError("this config already has a MoH layout: pass layout=None")
        moh = dict(MoHLayout.of(hf_config).resolved(s.heads).as_fields(),
                   moh_attention_impl=getattr(hf_config, "moh_attention_impl", "auto"))
    else:
        if layout is None:
            raise ConversionError("a plain Llama config has no MoH layout: pass layout='dense', "
                                  "'published' or a MoHLayout")
        moh = _resolve_layout(layout, s.heads).as_fields()
    return dict(
        num_layers=s.layers,
        hidden_size=s.hidden,
        num_attention_heads=s.heads,
        num_query_groups=s.groups,
        kv_channels=s.head_dim,
        ffn_hidden_size=s.ffn,
        layernorm_epsilon=hf_config.rms_norm_eps,
        **options,
        **moh,
    )


def megatron_model_kwargs(hf_config: Any) -> dict[str, Any]:
    """Keyword arguments for `megatron_moh.model.build_gpt_model` besides the config (with
    ``rope_scaling`` and ``rope_scaling_factor`` only for Llama-3.1 RoPE scaling)."""
    theta, factor = _megatron_rope(hf_config)
    scaling = {} if factor is None else dict(rope_scaling=True, rope_scaling_factor=factor)
    return dict(
        vocab_size=hf_config.vocab_size,
        max_sequence_length=hf_config.max_position_embeddings,
        rotary_base=theta,
        share_embeddings_and_output_weights=bool(hf_config.tie_word_embeddings),
        **scaling,
    )


def is_dense(hf_config: Any) -> bool:
    """True when every gate is exactly 1 (`MoHLayout.gates_are_one`), or for a plain Llama."""
    if getattr(hf_config, "model_type", None) != MoHLlamaConfig.model_type:
        return True
    return MoHLayout.of(hf_config).gates_are_one(hf_config.num_attention_heads)


def dense_llama_config(hf_config: MoHLlamaConfig) -> Any:
    """The plain LlamaConfig of a dense MoH-Llama config; ValueError if some gate is not exactly 1."""
    from transformers import LlamaConfig

    extras = [f"{what} ({name})" for name, what in (("moh_qkv_bias", "q/k/v biases"), ("moh_qk_norm", "q/k norms"))
              if getattr(hf_config, name, False)]
    if extras:
        raise ConversionError(f"a plain Llama has no {' and no '.join(extras)}: export it without --dense (as "
                              f"moh_llama)")
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
