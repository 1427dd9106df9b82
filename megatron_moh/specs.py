"""ModuleSpec trees for MoH (and dense baseline) GPT layers, one function per backend.

``local``: megatron-core's own parallel linears with torch norms and the core attention
``--attention-backend`` picks (torch SDPA by default, see megatron_moh/core_attention.py); runs on
CPU and GPU. ``te``: Transformer Engine linears, norms and attention, needed for FP8. Both keep the
input norm outside the QKV projection so the learned router sees the normalised token, and both
name checkpoint keys alike (the local spec's map), so checkpoints move between backends.

The MLP is megatron's dense MLP, or megatron-core's MoE layer (router, token dispatcher, experts,
shared experts) on the layers ``--moe-layer-freq`` picks; an MoE layer keeps its pre-MLP norm as a
module of its own in both backends (no fused ``linear_fc1`` to hold it), so its key is
``pre_mlp_layernorm.weight`` in either.
"""

from __future__ import annotations

import dataclasses
import functools

from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.models.backends import BackendSpecProvider, LocalSpecProvider
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_submodules
from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec_for_backend
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType, LayerType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import (
    TransformerBlock,
    TransformerBlockSubmodules,
    get_num_layers_to_build,
)
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import (
    TransformerLayer,
    TransformerLayerSubmodules,
    get_transformer_layer_offset,
)

from megatron_moh.core_attention import local_core_attention
from megatron_moh.layout import moe_layer_pattern
from megatron_moh.moh_attention import MoHSelfAttention, MoHSelfAttentionSubmodules
from megatron_moh.norm import TorchNorm
from megatron_moh.router import LearnedHeadRouter, QueryNormHeadRouter

BACKENDS = ("local", "te")
# Checkpoint keys follow the fused (TE-style) names whichever backend built the layer.
_KEYS_MAP = {
    "input_layernorm.": "self_attention.linear_qkv.layer_norm_",
    "pre_mlp_layernorm.": "mlp.linear_fc1.layer_norm_",
}


class TransformerEngineMissing(RuntimeError):
    """The TE backend or FP8 was asked for where Transformer Engine is not importable."""


@functools.cache
def have_transformer_engine() -> bool:
    """Whether Transformer Engine imports; a half-installed TE raises more than ImportError."""
    try:
        import transformer_engine.pytorch  # noqa: F401 - the import is the probe
    except Exception:  # noqa: BLE001 - a half-installed TE raises RuntimeError and others
        return False
    return True


def require_transformer_engine(what: str) -> None:
    """Raise a one-line error naming ``what`` when Transformer Engine is absent."""
    if not have_transformer_engine():
        raise TransformerEngineMissing(
            f"{what} needs NVIDIA Transformer Engine, which is not importable here: install it on a "
            f"CUDA machine with `pip install --no-build-isolation 'transformer-engine[pytorch]'` "
            f"(see README, 'Optional extras') or use --transformer-impl local without FP8"
        )


# The head router of each of config.ROUTERS.
ROUTER_CLASSES = {"learned": LearnedHeadRouter, "query_norm": QueryNormHeadRouter}


def _attention_spec(config: TransformerConfig, moh: bool, linear_qkv, core_attention, linear_proj,
                    qk_norm=TorchNorm) -> ModuleSpec:
    # --qk-layernorm: megatron builds q_layernorm/k_layernorm over one head (kv_channels); with
    # IdentityOp there it would silently build none, so the spec names the norm class.
    qk_norm = qk_norm if config.qk_layernorm else IdentityOp
    common = dict(
        linear_qkv=linear_qkv, core_attention=core_attention, linear_proj=linear_proj,
        q_layernorm=qk_norm, k_layernorm=qk_norm,
    )
    if not moh:
        return ModuleSpec(SelfAttention, params={"attn_mask_type": AttnMaskType.causal},
                          submodules=SelfAttentionSubmodules(**common))
    return ModuleSpec(MoHSelfAttention, params={"attn_mask_type": AttnMaskType.causal},
                      submodules=MoHSelfAttentionSubmodules(**common, router=ROUTER_CLASSES[config.moh_router]))


def _keys_map(moe: bool) -> dict[str, str]:
    """An MoE layer's pre-MLP norm is its own module in both backends: only the input norm maps."""
    return {"input_layernorm.": _KEYS_MAP["input_layernorm."]} if moe else dict(_KEYS_MAP)


def _moe_mlp(config: TransformerConfig, backend: BackendSpecProvider):
    """megatron-core's MoE layer with the backend's experts (sequential experts, or TE's grouped
    GEMM with ``--moe-grouped-gemm``) and shared experts."""
    return get_moe_module_spec_for_backend(
        backend=backend, num_experts=config.num_moe_experts, moe_grouped_gemm=config.moe_grouped_gemm
    )


def local_layer_spec(config: TransformerConfig, moh: bool = True, moe: bool = False) -> ModuleSpec:
    """A Llama-style layer from megatron-core's own modules (CPU and GPU); ``moe``: an MoE MLP."""
    base = get_gpt_layer_local_submodules()
    attention = base.self_attention.submodules
    submodules = dataclasses.replace(
        base,
        input_layernorm=TorchNorm,
        pre_mlp_layernorm=TorchNorm,
        self_attention=_attention_spec(
            config, moh, attention.linear_qkv, local_core_attention(config), attention.linear_proj
        ),
        mlp=_moe_mlp(config, LocalSpecProvider()) if moe
        else functools.partial(base.mlp, ffn_hidden_size=config.ffn_hidden_size),
        sharded_state_dict_keys_map=_keys_map(moe),
    )
    return ModuleSpec(TransformerLayer, submodules=submodules)


def te_layer_spec(config: TransformerConfig, moh: bool = True, moe: bool = False) -> ModuleSpec:
    """A Llama-style layer from Transformer Engine modules, so FP8 applies to its GEMMs; ``moe``:
    an MoE MLP."""
    require_transformer_engine("the Transformer Engine layer spec")
    from megatron.core.extensions.transformer_engine import (
        TEColumnParallelLinear,
        TEDotProductAttention,
        TELayerNormColumnParallelLinear,
        TENorm,
        TERowParallelLinear,
    )
    from megatron.core.extensions.transformer_engine_spec_provider import TESpecProvider

    dense_mlp = functools.partial(
        MLP.as_mlp_submodule,
        submodules=MLPSubmodules(linear_fc1=TELayerNormColumnParallelLinear, linear_fc2=TERowParallelLinear),
        ffn_hidden_size=config.ffn_hidden_size,
    )
    submodules = TransformerLayerSubmodules(
        input_layernorm=TENorm,
        self_attention=_attention_spec(
            config, moh, TEColumnParallelLinear, TEDotProductAttention, TERowParallelLinear, qk_norm=TENorm
        ),
        self_attn_bda=get_bias_dropout_add,
        pre_mlp_layernorm=TENorm if moe else IdentityOp,
        mlp=_moe_mlp(config, TESpecProvider()) if moe else dense_mlp,
        mlp_bda=get_bias_dropout_add,
        sharded_state_dict_keys_map={"input_layernorm.": _KEYS_MAP["input_layernorm."]},
    )
    return ModuleSpec(TransformerLayer, submodules=submodules)


def block_spec(
    config: TransformerConfig,
    backend: str = "local",
    moh: bool = True,
    vp_stage: int | None = None,
    pp_rank: int | None = None,
) -> ModuleSpec:
    """The decoder block of one pipeline stage: its layers (dense or MoE MLP, by
    `layout.moe_layer_pattern`) and the final norm."""
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is unknown: use one of {', '.join(BACKENDS)}")
    if backend == "te":
        layer_spec = te_layer_spec
        from megatron.core.extensions.transformer_engine import TENorm as final_norm
    else:
        layer_spec = local_layer_spec
        final_norm = TorchNorm
    pattern = (moe_layer_pattern(config.moe_layer_freq, config.num_layers) if config.num_moe_experts
               else [False] * config.num_layers)
    layers = {moe: layer_spec(config, moh, moe=moe) for moe in set(pattern)}
    layout = config.pipeline_model_parallel_layout
    if layout is not None:  # megatron's explicit per-stage layout names the layers of each stage
        ids = layout.get_layer_id_list(layer_type=LayerType.decoder, vp_stage=vp_stage, pp_rank=pp_rank)
    else:
        offset = get_transformer_layer_offset(config, vp_stage=vp_stage, pp_rank=pp_rank)
        ids = range(offset, offset + get_num_layers_to_build(config, vp_stage=vp_stage, pp_rank=pp_rank))
    return ModuleSpec(
        TransformerBlock,
        submodules=TransformerBlockSubmodules(layer_specs=[layers[pattern[i]] for i in ids], layer_norm=final_norm),
    )
