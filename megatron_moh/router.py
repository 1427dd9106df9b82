"""Head routers: per-token gates over the query heads, and the load-balance loss.

Both routers return the gates of this tensor-parallel rank's heads, and the gradients they send
back equal one process's (DESIGN: the gate tensor is made whole on every TP rank, passed through
an identity-forward / all-reduce-backward region, then sliced; with sequence parallelism the
learned router routes its local tokens and its weight is all-reduced across TP like a norm's).
The gate convention is documented in `megatron_moh.config`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from megatron.core.tensor_parallel.mappings import (
    copy_to_tensor_model_parallel_region,
    gather_from_sequence_parallel_region,
    gather_from_tensor_model_parallel_region,
)
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.moe.moe_logging import MoEMetricsTracker
from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler
from megatron.core.utils import get_pg_rank, get_pg_size

from megatron_moh.config import MoHTransformerConfig

LOAD_BALANCE_LOSS = "moh_load_balance_loss"

# MoH's own instance of megatron's MoE metrics tracker: a tracker's report() zeroes every metric it
# holds, so sharing megatron's global one would wipe the MoE MLP's aux losses before megatron
# reports them (or the reverse).
_METRICS = MoEMetricsTracker()


def moh_metrics_tracker() -> MoEMetricsTracker:
    """The tracker the head routers record their load-balance loss in (per layer, per step)."""
    return _METRICS


def gates_from_logits(
    tokens: Tensor,
    routed_logits: Tensor | None,
    shared_logits: Tensor | None,
    stage_logits: Tensor | None,
    num_shared: int,
    topk: int,
    gate: str,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """Gates over all heads ``[..., H]`` from router logits, plus routed probabilities and the
    0/1 top-k mask (None when there are no routed heads). ``tokens`` is any ``[..., x]`` tensor
    whose leading dimensions are the token dimensions."""
    if shared_logits is not None:
        shared = num_shared * torch.softmax(shared_logits, dim=-1)
    else:
        shared = torch.ones(*tokens.shape[:-1], num_shared, dtype=torch.float32, device=tokens.device)
    probs = mask = None
    parts = [shared]
    if routed_logits is not None:
        probs = torch.softmax(routed_logits, dim=-1)
        chosen = probs.topk(topk, dim=-1).indices
        mask = torch.zeros_like(probs).scatter_(-1, chosen, 1.0)
        if gate == "weighted":
            kept = probs * mask
            routed = topk * kept / kept.sum(dim=-1, keepdim=True)
        else:  # binary forward, straight-through gradient of the chosen heads' probabilities
            routed = mask + mask * (probs - probs.detach())  # exactly 0/1 forward
        if stage_logits is not None:
            stage = 2.0 * torch.softmax(stage_logits, dim=-1)
            parts = [shared * stage[..., :1]]
            routed = routed * stage[..., 1:]
        parts.append(routed)
    return torch.cat(parts, dim=-1), probs, mask


class HeadRouter(MegatronModule):
    """Shared machinery: TP slicing, the load-balance loss and head-usage counts."""

    def __init__(self, config: MoHTransformerConfig, layer_number: int, tp_group: torch.distributed.ProcessGroup):
        super().__init__(config=config)
        self.layer_number = layer_number
        self.num_heads = config.num_attention_heads
        self.num_shared = config.moh_num_shared_heads
        self.num_routed = self.num_heads - self.num_shared
        self.topk = config.moh_topk
        self.tp_group = tp_group
        self.tp_size = get_pg_size(tp_group)
        self.heads_per_rank = self.num_heads // self.tp_size
        self.head_offset = get_pg_rank(tp_group) * self.heads_per_rank
        # Routing slots (tokens x k) each routed head received since the last reset; for logging.
        self.register_buffer("head_usage", torch.zeros(max(self.num_routed, 0)), persistent=False)
        self.register_buffer("tokens_routed", torch.zeros(()), persistent=False)

    def route(self, hidden_states: Tensor, query: Tensor) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """Gates over all heads ``[s, b, H]`` (float32, before the TP slicing and the load-balance
        loss), the routed probabilities ``[s, b, E]`` and the 0/1 top-k mask (None without routed
        heads). `forward` applies exactly these gates; the analysis tools read the rest."""
        raise NotImplementedError

    def local_heads(self, gates: Tensor) -> Tensor:
        """This rank's slice of a ``[..., H]`` gate tensor."""
        return gates[..., self.head_offset : self.head_offset + self.heads_per_rank]

    def add_load_balance_loss(self, gates: Tensor, probs: Tensor, mask: Tensor, partial_tokens: bool) -> Tensor:
        """Attach ``coeff / num_layers * L_b`` to ``gates`` through megatron's aux-loss scaler.

        ``partial_tokens``: this rank holds only its sequence-parallel share of the tokens; the
        counts are summed across TP and each rank's loss covers its own tokens, so the router
        weight's TP all-reduce adds the shares up exactly.
        """
        counting = torch.is_grad_enabled() and self.training  # once per step, not on recompute
        with torch.no_grad():
            counts = mask.reshape(-1, self.num_routed).sum(dim=0)
            if partial_tokens and self.tp_size > 1:
                torch.distributed.all_reduce(counts, group=self.tp_group)
            tokens = counts.sum() / self.topk
            if counting:
                self.head_usage += counts
                self.tokens_routed += tokens
        fraction = counts / tokens  # of the tokens that chose each head: sums to k, as in the paper's code
        mean_prob = probs.reshape(-1, self.num_routed).sum(dim=0) / tokens
        loss = self.num_routed * torch.sum(mean_prob * fraction)
        if counting:  # training forwards only: not evaluation, not the recompute's dry run
            moh_metrics_tracker().record(
                LOAD_BALANCE_LOSS,
                loss,
                layer_number=self.layer_number,
                num_layers=self.config.num_layers,
                reduce_group=self.tp_group if partial_tokens else None,
            )
        coeff = self.config.moh_load_balance_coeff
        if coeff > 0 and counting:
            scale = coeff / self.config.num_layers
            if self.config.calculate_per_token_loss:
                # megatron then divides every gradient by the global token count instead of scaling
                # this loss by 1 / micro-batches; the micro-batch's tokens cancel that, as megatron's
                # MoE routers do, so the loss weighs the same in both modes.
                scale = scale * tokens
            gates = MoEAuxLossAutoScaler.apply(gates, loss * scale)
        return gates

    def reset_head_usage(self) -> Tensor:
        """Fraction of routing slots per routed head since the last call, then zero the counts."""
        usage = self.head_usage / (self.tokens_routed * self.topk).clamp_min(1.0)
        self.head_usage.zero_()
        self.tokens_routed.zero_()
        return usage


class LearnedHeadRouter(HeadRouter):
    """The paper's router: linear maps of the token to shared, routed and two-stage logits."""

    def __init__(self, config: MoHTransformerConfig, layer_number: int, tp_group: torch.distributed.ProcessGroup):
        super().__init__(config, layer_number, tp_group)
        self.num_shared_logits = self.num_shared if config.moh_gate == "weighted" else 0
        self.num_stage_logits = 2 if config.moh_two_stage else 0
        rows = self.num_shared_logits + self.num_routed + self.num_stage_logits
        self.weight = torch.nn.Parameter(torch.empty(rows, config.hidden_size, dtype=config.params_dtype))
        if config.perform_initialization:
            config.init_method(self.weight)
        # Each TP rank sees only its tokens under SP: finalize_model_grads sums the grads.
        self.weight.sequence_parallel = config.sequence_parallel

    def route(self, hidden_states: Tensor, query: Tensor) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """See `HeadRouter.route`; under sequence parallelism, of this rank's tokens only."""
        logits = F.linear(hidden_states, self.weight).float()
        shared_logits, routed_logits, stage_logits = logits.split(
            [self.num_shared_logits, self.num_routed, self.num_stage_logits], dim=-1
        )
        return gates_from_logits(
            logits,
            routed_logits if self.num_routed else None,
            shared_logits if self.num_shared_logits else None,
            stage_logits if self.num_stage_logits else None,
            self.num_shared,
            self.topk,
            self.config.moh_gate,
        )

    def forward(self, hidden_states: Tensor, query: Tensor) -> Tensor:
        """Gates of this rank's heads, ``[s, b, heads_per_rank]`` in float32."""
        gates, probs, mask = self.route(hidden_states, query)
        sequence_parallel = self.config.sequence_parallel and self.tp_size > 1
        if self.num_routed:
            gates = self.add_load_balance_loss(gates, probs, mask, partial_tokens=sequence_parallel)
        if sequence_parallel:
            gates = gather_from_sequence_parallel_region(
                gates, tensor_parallel_output_grad=True, group=self.tp_group
            )
        else:
            gates = copy_to_tensor_model_parallel_region(gates, group=self.tp_group)
        return self.local_heads(gates)


class QueryNormHeadRouter(HeadRouter):
    """Parameter-free router of the continue-tuning recipe: routed heads with larger query norms
    (relative to the spread across heads) win."""

    eps = 1e-6

    def route(self, hidden_states: Tensor, query: Tensor) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """See `HeadRouter.route`."""
        norms = query.float().norm(dim=-1)  # [s, b, heads_per_rank]
        norms = gather_from_tensor_model_parallel_region(norms, group=self.tp_group)
        routed_logits = None
        if self.num_routed:
            routed = norms[..., self.num_shared :]
            routed_logits = routed / routed.std(dim=-1, keepdim=True).clamp_min(self.eps)
        return gates_from_logits(norms, routed_logits, None, None, self.num_shared, self.topk, self.config.moh_gate)

    def forward(self, hidden_states: Tensor, query: Tensor) -> Tensor:
        """Gates of this rank's heads, ``[s, b, heads_per_rank]`` in float32."""
        gates, probs, mask = self.route(hidden_states, query)
        if self.num_routed:
            gates = self.add_load_balance_loss(gates, probs, mask, partial_tokens=False)
        gates = copy_to_tensor_model_parallel_region(gates, group=self.tp_group)
        return self.local_heads(gates)
