"""Command-line surface of pretrain_moh.py: Megatron-LM's flags plus ``--moh-*``.

Megatron-LM's own parser stays the source of every standard flag; this module adds the MoH group,
sets Llama-style architecture defaults, and gives the tiny CPU model when no size is passed.
"""

from __future__ import annotations

import argparse

from megatron_moh import platform
from megatron_moh.config import MoHConfigError, check_moh_config, resolve_moh_defaults

# The built-in default: a small MoH model that learns visibly in a few minutes on two CPU cores.
TINY_MODEL_DEFAULTS = dict(
    num_layers=4,
    hidden_size=128,
    ffn_hidden_size=352,
    num_attention_heads=8,
    seq_length=128,
    max_position_embeddings=128,
    micro_batch_size=8,
    global_batch_size=16,
    train_iters=300,
    lr=3e-3,
    min_lr=3e-4,
    lr_warmup_iters=30,
    eval_interval=100,
    split="98,2,0",
)

# Llama's architecture (RMSNorm, SwiGLU, RoPE, no biases, untied embeddings, no dropout); kernels
# that need apex/TE or compile on first use are off unless asked for.
LLAMA_ARCHITECTURE = dict(
    normalization="RMSNorm",
    swiglu=True,
    position_embedding_type="rope",
    untie_embeddings_and_output_weights=True,
    add_bias_linear=False,
    attention_dropout=0.0,
    hidden_dropout=0.0,
    bias_swiglu_fusion=False,
    masked_softmax_fusion=False,
    bias_dropout_fusion=False,
    apply_rope_fusion=False,
    gradient_accumulation_fusion=False,
    lr_decay_style="cosine",
    log_interval=10,
    log_throughput=True,
    eval_iters=10,
    num_workers=0,
    tokenizer_type="GPTSentencePieceTokenizer",
)


def add_moh_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """megatron.training's ``extra_args_provider``: the MoH flags and the project's defaults."""
    group = parser.add_argument_group(title="mixture-of-heads")
    group.add_argument("--moh-num-shared-heads", type=int, default=None,
                       help="Query heads every token uses. Default: half of the heads.")
    group.add_argument("--moh-topk", type=int, default=None,
                       help="Routed heads each token activates. Default: a quarter of the heads.")
    group.add_argument("--moh-router", choices=["learned", "query_norm"], default="learned",
                       help="'learned' (paper) or the parameter-free 'query_norm' router.")
    group.add_argument("--moh-gate", choices=["weighted", "binary"], default=None,
                       help="Gate kind. Default: weighted for learned, binary for query_norm.")
    group.add_argument("--moh-two-stage", action=argparse.BooleanOptionalAction, default=None,
                       help="Weigh shared vs routed heads with a learned [a1, a2].")
    group.add_argument("--moh-load-balance-coeff", type=float, default=0.01,
                       help="beta of the load-balance loss (0 turns it off).")
    group.add_argument("--moh-attention-impl", choices=["dense", "sparse"], default="dense",
                       help="'dense' computes all heads; 'sparse' skips unchosen query rows.")
    group.add_argument("--moh-dense-baseline", action="store_true",
                       help="Build the same model with megatron-core's dense attention (baseline).")
    group.add_argument("--moh-data-cache", type=str, default=None,
                       help="Where the built-in corpus, tokenizer and dataset are cached.")
    cpu = platform.cpu_requested()
    parser.set_defaults(
        **LLAMA_ARCHITECTURE,
        transformer_impl="local" if cpu else "transformer_engine",
        distributed_backend=platform.distributed_backend(),
        use_cpu_initialization=True if cpu else None,
    )
    return parser


def check_args(args: argparse.Namespace) -> None:
    """Exit with a one-line message for impossible MoH settings, unusable data or an unusable
    --load checkpoint (this also installs the checkpoint hooks of megatron_moh.checkpoint), before any
    process group starts or any model is built."""
    from megatron.training import get_tokenizer

    from megatron_moh.checkpoint import CheckpointError, check_load
    from megatron_moh.data.validation import DataError, validate_data
    from megatron_moh.specs import TransformerEngineMissing, require_transformer_engine

    try:
        if args.fp8:
            require_transformer_engine(f"--fp8-format {args.fp8}")
        if args.transformer_impl == "transformer_engine":
            require_transformer_engine("--transformer-impl transformer_engine")
        resolve_moh_defaults(args)
        check_moh_config(args)
        if args.data_path is not None:
            validate_data(args.data_path, get_tokenizer(), split=args.split)
        check_load(args)
    except (MoHConfigError, DataError, TransformerEngineMissing, CheckpointError) as err:
        raise SystemExit(f"pretrain_moh.py: error: {err}") from None
