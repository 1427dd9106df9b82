"""MoH GPT models: megatron arguments or a config + layer spec -> megatron-core GPTModel.

`model_from_args` is the one path from a run's arguments to a model: training's model provider,
the one-process loader of the conversion tools and the analysis tools all build through it.

Why ``GPTModel`` although megatron-core 0.19 logs "GPTModel IS DEPRECATED" in favour of
``HybridModel``: HybridModel would take the MoH attention (its ``attention_layer`` spec, ``*`` in
the layer pattern) and pipeline stages (``|``), but it builds a Llama block as two layers, an
attention-only and an MLP-only one, so every checkpoint key moves (``decoder.layers.2i`` and
``2i+1``), and its stock specs import Transformer Engine modules. Migrating means: a layer pattern
``*-`` repeated, local and TE stack specs with the MoH attention, a key map for existing
checkpoints and the Hugging Face maps, and the TP/PP/VPP equality tests re-run. GPTModel still
gets critical fixes, so the project stays until that migration is worth it; the notice is
filtered here so it does not print on every start.
"""

from __future__ import annotations

import argparse
import logging
from typing import Any

import torch
import torch.nn.functional as F

from megatron.core.models.gpt import GPTModel

from megatron_moh.arguments import LLAMA_ARCHITECTURE, PORTABLE_KERNELS
from megatron_moh.config import MoHTransformerConfig
from megatron_moh.specs import block_spec, require_transformer_engine



class _KnownDeprecation(logging.Filter):
    """Drops megatron's GPTModel deprecation notice (see the module docstring)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "GPTModel IS DEPRECATED" not in record.getMessage()


logging.getLogger("megatron.core.models.gpt.gpt_model").addFilter(_KnownDeprecation())


def _config_kwargs(table: dict) -> dict:
    """TransformerConfig fields from a table in Megatron-LM's argument names, translated as
    megatron's ``core_transformer_config_from_args`` does."""
    fields = {"normalization", "add_bias_linear", "attention_dropout", "hidden_dropout", "init_method_std",
              "masked_softmax_fusion", "bias_dropout_fusion", "apply_rope_fusion", "gradient_accumulation_fusion",
              "cross_entropy_loss_fusion"}
    kwargs = {name: value for name, value in table.items() if name in fields}
    if "norm_epsilon" in table:
        kwargs["layernorm_epsilon"] = table["norm_epsilon"]
    if table.get("swiglu"):
        kwargs.update(gated_linear_unit=True, activation_func=F.silu,
                      bias_activation_fusion=table.get("bias_swiglu_fusion", False))
    return kwargs


LLAMA_CONFIG = {**_config_kwargs({**LLAMA_ARCHITECTURE, **PORTABLE_KERNELS}), "persist_layer_norm": False,
                "use_cpu_initialization": True}


def llama_moh_config(**overrides) -> MoHTransformerConfig:
    """A MoHTransformerConfig with Llama's architecture (`LLAMA_ARCHITECTURE`); keyword arguments
    override. For tests and benchmarks that build models without a command line."""
    return MoHTransformerConfig(**{**LLAMA_CONFIG, **overrides})


def build_gpt_model(
    config: MoHTransformerConfig,
    vocab_size: int,
    max_sequence_length: int,
    backend: str = "local",
    moh: bool = True,
    pre_process: bool = True,
    post_process: bool = True,
    vp_stage: int | None = None,
    share_embeddings_and_output_weights: bool = False,
    rotary_base: int = 10000,
    pg_collection=None,
    **positions: Any,
) -> GPTModel:
    """One pipeline stage (or virtual stage) of an MoH GPT; ``moh=False`` builds the dense
    baseline with megatron-core's own SelfAttention. ``positions``: GPTModel's position-embedding
    and output arguments (``position_embedding_type``, ``rotary_percent``, ``rope_scaling``, ...);
    the default is Llama's RoPE."""
    if config.fp8 and backend != "te":
        raise ValueError("FP8 needs the Transformer Engine layer spec: pass --transformer-impl "
                         "transformer_engine (backend='te') or drop --fp8-format")
    if config.fp8:
        require_transformer_engine("FP8 training")
    return GPTModel(
        config=config,
        transformer_layer_spec=block_spec(config, backend, moh, vp_stage=vp_stage),
        vocab_size=vocab_size,
        max_sequence_length=max_sequence_length,
        pre_process=pre_process,
        post_process=post_process,
        share_embeddings_and_output_weights=share_embeddings_and_output_weights,
        rotary_base=rotary_base,
        vp_stage=vp_stage,
        pg_collection=pg_collection,
        **{"position_embedding_type": "rope", **positions},
    )


def config_from_args(args: argparse.Namespace) -> MoHTransformerConfig:
    """The model config a run's (validated) megatron arguments describe."""
    from megatron.training.argument_utils import core_transformer_config_from_args

    return core_transformer_config_from_args(args, MoHTransformerConfig)


def model_from_args(args: argparse.Namespace, *, pre_process: bool = True, post_process: bool = True,
                    vp_stage: int | None = None, pg_collection=None) -> GPTModel:
    """One (virtual) pipeline stage of the GPT a run's megatron arguments describe."""
    return build_gpt_model(
        config_from_args(args),
        vocab_size=args.padded_vocab_size,
        max_sequence_length=args.max_position_embeddings,
        backend="te" if args.transformer_impl == "transformer_engine" else "local",
        moh=not getattr(args, "moh_dense_baseline", False),
        pre_process=pre_process,
        post_process=post_process,
        vp_stage=vp_stage,
        share_embeddings_and_output_weights=not args.untie_embeddings_and_output_weights,
        rotary_base=args.rotary_base,
        pg_collection=pg_collection,
        position_embedding_type=args.position_embedding_type,
        rotary_percent=args.rotary_percent,
        rope_scaling=args.use_rope_scaling,
        rope_scaling_factor=args.rope_scaling_factor,
        seq_len_interpolation_factor=args.rotary_seq_len_interpolation_factor,
        fp16_lm_cross_entropy=args.fp16_lm_cross_entropy,
    )


def count_parameters(model: torch.nn.Module) -> int:
    """Parameters of this rank's model chunk."""
    return sum(p.numel() for p in model.parameters())
