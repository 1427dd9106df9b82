"""Configuration of a Llama model with Mixture-of-Head attention (MoH, arXiv 2410.11842).

Self-contained (imports only transformers): this file is copied next to exported weights and
loaded with ``trust_remote_code=True``.

Of the ``H`` query heads the first ``moh_num_shared_heads`` are used by every token; each token
keeps ``moh_topk`` of the other ``H - moh_num_shared_heads`` (routed) heads. Each head's attention
output is scaled by its gate before ``o_proj``; keys and values are never gated. Gate convention
(a layer whose gates are all 1 is plain multi-head attention):

* learned router, weighted gates: ``g_shared = h_s * softmax(W_s x)``, ``p = softmax(W_r x)``,
  ``g_routed = k * p / sum(p[topk])`` on the top-k and 0 elsewhere; with two stages
  ``[a1, a2] = 2 * softmax(W_h x)`` multiply the shared / routed gates. The router weight rows are
  ``[W_s (weighted gates only), W_r, W_h (two-stage only)]``, applied to the normalised hidden
  state that enters the attention.
* binary gates: shared gates are 1, a chosen routed head's gate is 1 (straight-through gradient
  of ``p``), an unchosen head's gate is 0.
* query-norm router (no parameters): routing logits are the L2 norms of the routed heads' queries
  divided by their standard deviation across routed heads; with ``moh_qk_norm`` the queries before
  the q-norm (after it every head's query has about the same norm).

Two Llama-family options that LlamaConfig lacks (``moh_``-prefixed like every field added here,
so that no future LlamaConfig field collides):

* ``moh_qkv_bias``: biases on q_proj, k_proj and v_proj but not o_proj, as Qwen2 and megatron's
  ``--add-qkv-bias``. (Llama's own ``attention_bias`` biases o_proj too.)
* ``moh_qk_norm``: a per-head RMSNorm (over ``head_dim``, weights ``self_attn.q_norm`` and
  ``self_attn.k_norm``) on queries and keys before RoPE, as Qwen3 and megatron's ``--qk-layernorm``.

``moh_attention_impl`` (``'auto'``, ``'dense'`` or ``'sparse'``) chooses how the heads a token did not
choose are skipped; it changes speed, not outputs (see modeling_moh).
"""

from transformers import LlamaConfig

MOH_ROUTERS = ("learned", "query_norm")
MOH_GATES = ("weighted", "binary")
MOH_ATTENTION_IMPLS = ("auto", "dense", "sparse")

# Where the head-sparse paths beat computing every head, per (device type, phase): sparse from
# ``min_tokens`` tokens (the sequence in training and prefill, the keys read in a decoding step) when
# at least ``min_skipped`` of the attention work can be skipped (see ``skipped_attention``). Measured
# on CPU (torch 2.14, fp32): training by benchmarks/bench_sparse.py (core attention, forward+backward,
# 1 and 2 threads), prefill and decoding by benchmarks/bench_generate.py (whole models against a plain
# Llama); the tables are in benchmarks/README.md. No GPU measurement yet, so CUDA stays dense until the
# GPU check kit's runs of those two benchmarks give its rows.
SPARSE_CROSSOVERS: dict[tuple[str, str], tuple[tuple[float, int], ...]] = {
    ("cpu", "train"): ((0.5, 1024), (0.25, 2048)),
    ("cpu", "prefill"): ((0.5, 2048), (0.25, 4096)),
    ("cpu", "decode"): ((0.1, 1024),),
}
# Inference's sparse paths make many small calls (a decoding step: one per run of groups and sequence),
# each a parallel region that waits for every CPU thread: with 2 threads on cores other processes also
# used they lost to dense (0.15-0.8x its tokens/s), so on CPU they pay with one thread only.
ONE_THREAD_PHASES = ("prefill", "decode")


def skipped_attention(phase: str, heads: int, kv_heads: int, shared: int, lane_density: float) -> float:
    """Expected share of a layer's attention work that the head-sparse path of ``phase`` skips, for
    uniformly routed tokens: ``heads`` query heads of which the first ``shared`` are shared, in
    ``kv_heads`` key/value groups; each routed head serves ``lane_density`` (top-k over routed heads)
    of the tokens.

    Training and prefill skip query rows: a routed head busier than half of the tokens saves nothing
    measurable (packed rows cost more per row than the causal kernel). Decoding skips reading a key/value
    group's cache when none of its heads is chosen: a group of ``g`` routed heads is unused with
    probability ``(1 - lane_density) ** g``, a group holding a shared head never.
    """
    routed = heads - shared
    if phase != "decode":
        return 0.0 if lane_density > 0.5 else routed / heads * (1 - lane_density)
    group = heads // kv_heads
    routed_groups = kv_heads - -(-shared // group)
    return routed_groups / kv_heads * (1 - lane_density) ** group


def sparse_pays(device_type: str, phase: str, tokens: int, skipped: float, threads: int = 1) -> bool:
    """Whether ``moh_attention_impl='auto'`` runs the head-sparse path (``SPARSE_CROSSOVERS``,
    ``ONE_THREAD_PHASES``); ``threads``: torch's CPU threads."""
    if device_type == "cpu" and threads > 1 and phase in ONE_THREAD_PHASES:
        return False
    rows = SPARSE_CROSSOVERS.get((device_type, phase), ())
    return any(skipped >= min_skipped and tokens >= min_tokens for min_skipped, min_tokens in rows)


class MoHLlamaConfig(LlamaConfig):
    """LlamaConfig plus the mixture-of-heads fields; None fields take the paper's defaults.

    The choices, defaults and refusals copy megatron_moh.layout.MoHLayout's, which this file cannot
    import; tests/unit/test_config.py holds the two in step."""

    model_type = "moh_llama"

    moh_num_shared_heads: int | None = None
    moh_topk: int | None = None
    moh_router: str = "learned"
    moh_gate: str | None = None
    moh_two_stage: bool | None = None
    moh_attention_impl: str = "auto"
    moh_qkv_bias: bool = False
    moh_qk_norm: bool = False

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        heads = self.num_attention_heads
        if self.moh_num_shared_heads is None:
            self.moh_num_shared_heads = heads // 2
        if self.moh_topk is None:
            self.moh_topk = min(max(heads // 4, 1), heads - self.moh_num_shared_heads)
        if self.moh_gate is None:
            self.moh_gate = "binary" if self.moh_router == "query_norm" else "weighted"
        if self.moh_two_stage is None:
            self.moh_two_stage = (
                self.moh_router == "learned"
                and self.moh_gate == "weighted"
                and 0 < self.moh_num_shared_heads < heads
            )
        self._check_moh()

    def _check_moh(self) -> None:
        """Refuse layouts the attention cannot run, with a one-line fix."""
        heads, shared, topk = self.num_attention_heads, self.moh_num_shared_heads, self.moh_topk
        if not (isinstance(shared, int) and isinstance(topk, int)):
            raise ValueError(f"moh_num_shared_heads={shared!r} and moh_topk={topk!r} must be integers")
        routed = heads - shared
        problems = []
        if self.moh_router not in MOH_ROUTERS:
            problems.append(f"moh_router={self.moh_router!r} is unknown: use one of {', '.join(MOH_ROUTERS)}")
        if self.moh_gate not in MOH_GATES:
            problems.append(f"moh_gate={self.moh_gate!r} is unknown: use one of {', '.join(MOH_GATES)}")
        if self.moh_attention_impl not in MOH_ATTENTION_IMPLS:
            problems.append(f"moh_attention_impl={self.moh_attention_impl!r} is unknown: "
                            f"use one of {', '.join(MOH_ATTENTION_IMPLS)}")
        if not 0 <= shared <= heads:
            problems.append(f"moh_num_shared_heads={shared} must be between 0 and num_attention_heads={heads}")
        elif not 0 <= topk <= routed or (routed > 0 and topk == 0):
            problems.append(f"moh_topk={topk} must be between 1 and the {routed} routed heads "
                            f"(0 only when every head is shared)")
        if self.moh_two_stage and not (self.moh_router == "learned" and self.moh_gate == "weighted"
                                       and 0 < shared < heads):
            problems.append("moh_two_stage needs the learned router, weighted gates and both shared and "
                            "routed heads: set moh_two_stage=False")
        if self.moh_qkv_bias and self.attention_bias:
            problems.append("moh_qkv_bias adds q/k/v biases but attention_bias already biases q, k, v and o: "
                            "set one of them")
        if self.moh_router == "query_norm" and 0 < routed < 2:
            problems.append("the query_norm router needs at least 2 routed heads: use fewer shared heads")
        if problems:
            raise ValueError(problems[0])

    @property
    def moh_num_routed_heads(self) -> int:
        """Heads the router chooses from."""
        return self.num_attention_heads - self.moh_num_shared_heads

    @property
    def moh_router_rows(self) -> int:
        """Output rows of the learned router's weight (0 for the query-norm router)."""
        if self.moh_router != "learned":
            return 0
        shared = self.moh_num_shared_heads if self.moh_gate == "weighted" else 0
        return shared + self.moh_num_routed_heads + (2 if self.moh_two_stage else 0)


__all__ = ["MoHLlamaConfig", "skipped_attention", "sparse_pays"]
