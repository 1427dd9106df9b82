"""Small builders shared by the tests."""

from __future__ import annotations

import torch

from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
from megatron.core.transformer.spec_utils import build_module

from megatron_moh.model import llama_moh_config
from megatron_moh.specs import local_layer_spec

TINY = dict(num_layers=2, hidden_size=64, num_attention_heads=8, num_query_groups=4, ffn_hidden_size=128)


def tiny_config(**overrides):
    """A small fp32 MoH config (learned router, 4 shared + 2-of-4 routed heads by default)."""
    return llama_moh_config(**{**TINY, **overrides})


def build_attention(config, moh: bool = True, layer_number: int = 1):
    """One (MoH or dense) self-attention module built from the local spec."""
    spec = local_layer_spec(config, moh=moh).submodules.self_attention
    return build_module(spec, config=config, layer_number=layer_number)


def rotary(config, seq_len: int) -> torch.Tensor:
    """Megatron's rotary embedding table for ``seq_len`` positions."""
    return RotaryEmbedding(kv_channels=config.kv_channels, rotary_percent=1.0, rotary_base=10000)(seq_len)


def assert_one_line_refusal(message: str | None, prog: str) -> str:
    """``message`` is a program's exit message: one line, starting ``PROG: error:``."""
    assert message is not None and message.startswith(f"{prog}: error:") and "\n" not in message, message
    return message
