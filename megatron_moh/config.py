"""MoH settings: a megatron-core TransformerConfig with the mixture-of-heads fields.

Gate convention (the paper's reference code, chosen so that a layer whose gates are all 1 is
plain multi-head attention). For H query heads, the first ``h_s`` are shared, the other
``E = H - h_s`` are routed and each token keeps ``k`` of them:

* learned router, weighted gates:
  ``g_shared = h_s * softmax(W_s x)``,
  ``p = softmax(W_r x)``; ``g_routed = k * p / sum(p[topk])`` on the top-k, 0 elsewhere;
  two-stage: ``[a1, a2] = 2 * softmax(W_h x)`` multiplies the shared / routed gates.
* binary gates: shared gates are 1, a chosen routed head's gate is 1 in the forward pass and
  its gradient is that of ``p`` (straight-through), an unchosen head's gate is 0 with no gradient.
* query-norm router (parameter-free): routing logits are the L2 norms of the routed heads'
  queries divided by their standard deviation across routed heads; with ``qk_layernorm`` the
  queries before the q-norm (after it every head's norm is about the same; see moh_attention).
* load balance, as the paper's reference code computes it: ``L_b = E * sum_i P_i f_i`` per layer,
  ``P_i`` the mean routed probability of head ``i`` over the micro-batch's tokens, ``f_i`` the
  fraction of those tokens that chose head ``i`` (the ``f_i`` sum to ``k``); uniform routing gives
  ``k``, its minimum. The model adds ``coeff * mean over layers of L_b``, so the paper's
  beta = 0.01 is ``--moh-load-balance-coeff 0.01``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from megatron.core.transformer.enums import AttnBackend
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_moh.layout import ATTENTION_IMPLS, MoHConfigError, MoHLayout

def resolve_moh_defaults(cfg: Any) -> None:
    """Fill the layout fields a config or an argparse Namespace leaves None (in place), as
    `MoHLayout.resolved` says."""
    MoHLayout.of(cfg).resolved(cfg.num_attention_heads).set_on(cfg)


def check_moh_config(cfg: Any) -> None:
    """Raise MoHConfigError (one line: what is wrong and how to fix it) for impossible settings.

    Works on a config or on an argparse Namespace, so the CLI can fail before any process group
    starts.
    """
    heads = cfg.num_attention_heads
    MoHLayout.of(cfg).resolved(heads).check(heads, cfg.num_query_groups,
                                            getattr(cfg, "tensor_model_parallel_size", 1) or 1)

    def fail(msg: str) -> None:
        raise MoHConfigError(msg)

    if cfg.moh_attention_impl not in ATTENTION_IMPLS:
        fail(f"moh_attention_impl={cfg.moh_attention_impl!r} is unknown: "
             f"use one of {', '.join(ATTENTION_IMPLS)}")
    if cfg.moh_attention_impl == "sparse" and (getattr(cfg, "attention_dropout", 0)
                                                or getattr(cfg, "window_size", None) is not None):
        fail("moh_attention_impl='sparse' has no attention dropout and no sliding window: use 'auto' or "
             "'dense' (which compute every head where either is on), or drop them")
    if getattr(cfg, "fused_single_qkv_rope", False):
        fail("fused_single_qkv_rope applies RoPE to the unsplit QKV output, but the MoH router needs the "
             "split queries: turn it off")
    if cfg.moh_load_balance_coeff < 0:
        fail(f"moh_load_balance_coeff={cfg.moh_load_balance_coeff} is negative: use 0 or more")
    if (getattr(cfg, "context_parallel_size", 1) or 1) > 1:
        fail("MoH attention does not support context parallelism yet: "
             "set context_parallel_size=1")
    # A Namespace's data flag: causal layers' SDPA core, the head-sparse path and TE's causal
    # kernels all ignore an explicit mask; only megatron's DotProductAttention applies it.
    if getattr(cfg, "reset_attention_mask", False) and not (
        getattr(cfg, "transformer_impl", None) == "local"
        and getattr(cfg, "attention_backend", None) in (AttnBackend.unfused, AttnBackend.local)
        and cfg.moh_attention_impl == "dense"
    ):
        fail("--reset-attention-mask (document masks) is applied only by megatron's "
             "DotProductAttention: pass --transformer-impl local --attention-backend unfused "
             "--moh-attention-impl dense, or drop --reset-attention-mask")


@dataclass
class MoHTransformerConfig(TransformerConfig):
    """TransformerConfig plus the mixture-of-heads fields (see the module docstring)."""

    moh_num_shared_heads: int | None = None
    """Query heads every token uses (the first ones). None: half of the heads."""

    moh_topk: int | None = None
    """Routed heads each token activates. None: a quarter of the heads."""

    moh_router: str = "learned"
    """One of `ROUTERS`: 'learned': linear router (paper); 'query_norm': parameter-free router on
    query norms."""

    moh_gate: str | None = None
    """One of `GATES`: 'weighted' gates or 'binary' gates with a straight-through gradient. None:
    weighted for the learned router, binary for the query-norm router."""

    moh_two_stage: bool | None = None
    """Weigh shared against routed heads with [a1, a2] = 2 softmax(W_h x). None: on when the
    router is learned, the gates weighted and both groups non-empty."""

    moh_load_balance_coeff: float = 0.01
    """beta of the load-balance loss; 0 turns it off."""

    moh_attention_impl: str = "auto"
    """One of `ATTENTION_IMPLS`: 'dense' computes every head and gates afterwards; 'sparse' skips the query rows a
    routed head was not chosen for; 'auto' picks one of them per layer call from the sequence
    length and the active heads, where measured faster (hf.configuration_moh.SPARSE_CROSSOVERS)."""

    def __post_init__(self) -> None:
        if self.num_query_groups is None:
            self.num_query_groups = self.num_attention_heads
        resolve_moh_defaults(self)
        check_moh_config(self)
        if self.experimental_attention_variant_loss_scale_func is None:
            # megatron's schedules call this hook with the main loss's scale (1 / micro-batches, times
            # the fp16 loss scale), which the load-balance loss's backward then uses.
            from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

            self.experimental_attention_variant_loss_scale_func = MoEAuxLossAutoScaler.set_loss_scale
        super().__post_init__()

    @property
    def moh_num_routed_heads(self) -> int:
        """Heads the router chooses from."""
        return self.num_attention_heads - self.moh_num_shared_heads
