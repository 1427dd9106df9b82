"""MoH config + layer spec -> megatron-core GPTModel (Llama-style: RMSNorm, SwiGLU, RoPE)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from megatron.core.models.gpt import GPTModel

from megatron_moh.config import MoHTransformerConfig
from megatron_moh.specs import block_spec, require_transformer_engine

LLAMA_DEFAULTS = dict(
    normalization="RMSNorm",
    layernorm_epsilon=1e-5,
    gated_linear_unit=True,
    activation_func=F.silu,
    add_bias_linear=False,
    hidden_dropout=0.0,
    attention_dropout=0.0,
    bias_activation_fusion=False,
    masked_softmax_fusion=False,
    persist_layer_norm=False,
    bias_dropout_fusion=False,
    apply_rope_fusion=False,
    gradient_accumulation_fusion=False,
    cross_entropy_loss_fusion=False,
    use_cpu_initialization=True,
    init_method_std=0.02,
)


def llama_moh_config(**overrides) -> MoHTransformerConfig:
    """A MoHTransformerConfig with Llama's architecture choices; keyword arguments override."""
    return MoHTransformerConfig(**{**LLAMA_DEFAULTS, **overrides})


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
) -> GPTModel:
    """One pipeline stage (or virtual stage) of an MoH GPT; ``moh=False`` builds the dense
    baseline with megatron-core's own SelfAttention."""
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
        position_embedding_type="rope",
        rotary_base=rotary_base,
        vp_stage=vp_stage,
        pg_collection=pg_collection,
    )


def count_parameters(model: torch.nn.Module) -> int:
    """Parameters of this rank's model chunk."""
    return sum(p.numel() for p in model.parameters())
