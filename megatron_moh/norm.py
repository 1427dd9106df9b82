"""Torch LayerNorm / RMSNorm for the local (non-Transformer-Engine) spec.

megatron-core's own torch fallback refuses sequence parallelism; these norms allow it by tagging
their parameters ``sequence_parallel`` so that ``finalize_model_grads`` all-reduces their
gradients across tensor-parallel ranks, as it does for Transformer Engine's and apex's norms.
"""

from __future__ import annotations

import torch

from megatron.core.transformer.transformer_config import TransformerConfig


def TorchNorm(config: TransformerConfig, hidden_size: int, eps: float = 1e-5, **unused) -> torch.nn.Module:
    """A ``torch.nn.RMSNorm`` or ``torch.nn.LayerNorm`` as ``config.normalization`` says."""
    if config.normalization == "RMSNorm":
        norm = torch.nn.RMSNorm(hidden_size, eps=eps, dtype=config.params_dtype)
    elif config.normalization == "LayerNorm":
        norm = torch.nn.LayerNorm(hidden_size, eps=eps, dtype=config.params_dtype)
    else:
        raise ValueError(f"normalization={config.normalization!r} is not supported by the local spec: "
                         f"use RMSNorm or LayerNorm")
    for param in norm.parameters():
        param.sequence_parallel = config.sequence_parallel
    return norm
