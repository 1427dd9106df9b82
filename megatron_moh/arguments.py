"""The command line of pretrain_moh.py: Megatron-LM's flags, the ``--moh-*`` group, and defaults.

Megatron-LM's parser stays the source of every standard flag; this module adds the MoH group and
the project's defaults, in three tables: the Llama architecture, kernels that run everywhere,
and run settings (logging, evaluation, tokenizer). It imports of the project only `platform`,
`layout` (the MoH choices), `commands` (one-line usage errors) and, while parsing, `specs`'
Transformer Engine probe, so the entry point, the conversion tools and the tests all share it.
"""

from __future__ import annotations

import argparse
import functools
from collections.abc import Mapping, Sequence
from typing import Any

from megatron_moh import platform
from megatron_moh.commands import OneLineParser
from megatron_moh.layout import ATTENTION_IMPLS, GATES, ROUTERS

PROG = "pretrain_moh.py"

# Llama's architecture (RMSNorm, SwiGLU, RoPE, no biases, untied embeddings, no dropout), in
# Megatron-LM's argument names. `megatron_moh.model.llama_moh_config` reads the same table.
LLAMA_ARCHITECTURE = dict(
    normalization="RMSNorm",
    norm_epsilon=1e-5,
    swiglu=True,
    position_embedding_type="rope",
    untie_embeddings_and_output_weights=True,
    add_bias_linear=False,
    attention_dropout=0.0,
    hidden_dropout=0.0,
    init_method_std=0.02,
)

# Fused kernels need apex/TE or compile on first use (10-25 s); off unless asked for.
PORTABLE_KERNELS = dict(
    bias_swiglu_fusion=False,
    masked_softmax_fusion=False,
    bias_dropout_fusion=False,
    apply_rope_fusion=False,
    gradient_accumulation_fusion=False,
    cross_entropy_loss_fusion=False,
)

# How a run logs, evaluates and reads its data.
RUN_DEFAULTS = dict(
    lr_decay_style="cosine",
    log_interval=10,
    log_throughput=True,
    eval_iters=10,
    num_workers=0,
    tokenizer_type="GPTSentencePieceTokenizer",
)

# The built-in default model: learns visibly in a few minutes on two CPU cores. Applied by
# megatron's validate_args only where the command line leaves a size unset.
TINY_MODEL = dict(
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


def add_moh_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The MoH flags and the project's defaults on megatron's parser."""
    group = parser.add_argument_group(title="mixture-of-heads")
    group.add_argument("--moh-num-shared-heads", type=int, default=None,
                       help="Query heads every token uses. Default: half of the heads.")
    group.add_argument("--moh-topk", type=int, default=None,
                       help="Routed heads each token activates. Default: a quarter of the heads.")
    group.add_argument("--moh-router", choices=ROUTERS, default="learned",
                       help="'learned' (paper) or the parameter-free 'query_norm' router.")
    group.add_argument("--moh-gate", choices=GATES, default=None,
                       help="Gate kind. Default: weighted for learned, binary for query_norm.")
    group.add_argument("--moh-two-stage", action=argparse.BooleanOptionalAction, default=None,
                       help="Weigh shared vs routed heads with a learned [a1, a2].")
    group.add_argument("--moh-load-balance-coeff", type=float, default=0.01,
                       help="beta of the load-balance loss (0 turns it off).")
    group.add_argument("--moh-attention-impl", choices=ATTENTION_IMPLS, default="auto",
                       help="'dense' computes all heads; 'sparse' skips unchosen query rows; 'auto' "
                            "picks per layer call where measured faster (the default).")
    group.add_argument("--moh-dense-baseline", action="store_true",
                       help="Build the same model with megatron-core's dense attention (baseline).")
    group.add_argument("--moh-data-cache", type=str, default=None,
                       help="Where the built-in corpus, tokenizer and dataset are cached.")
    # Megatron-LM's flags for these are store_true; the project's Llama defaults turn them on.
    group.add_argument("--tie-embeddings-and-output-weights", dest="untie_embeddings_and_output_weights",
                       action="store_false", help="Share the input embedding with the output layer (Llama-3.2-1B).")
    group.add_argument("--no-swiglu", dest="swiglu", action="store_false",
                       help="A plain MLP (e.g. with --squared-relu) instead of Llama's SwiGLU.")
    group.add_argument("--add-bias-linear", dest="add_bias_linear", action="store_true",
                       help="Biases in every linear layer (Megatron-LM's default; Llama has none).")
    cpu = platform.cpu_requested()
    parser.set_defaults(
        **LLAMA_ARCHITECTURE,
        **PORTABLE_KERNELS,
        **RUN_DEFAULTS,
        transformer_impl="transformer_engine" if transformer_engine_default() else "local",
        distributed_backend=platform.distributed_backend(),
        use_cpu_initialization=True if cpu else None,
    )
    return parser


def transformer_engine_default() -> bool:
    """Whether ``--transformer-impl`` defaults to ``transformer_engine``: on a GPU where Transformer
    Engine imports. Elsewhere the local spec (torch kernels), which runs everywhere."""
    from megatron_moh.specs import have_transformer_engine

    return not platform.cpu_requested() and have_transformer_engine()


def _escape_stray_percent(parser: argparse.ArgumentParser) -> None:
    """argparse formats help strings with ``%``; megatron-core 0.19.2 has one with a bare ``%``
    (``--moe-paged-stash-buffer-size-factor-cuda``: "...10%).") that makes ``--help`` crash."""
    for action in parser._actions:
        if not action.help or action.help is argparse.SUPPRESS:
            continue
        try:
            parser._get_formatter()._expand_help(action)
        except (ValueError, TypeError, KeyError):
            action.help = action.help.replace("%", "%%")


class _MegatronParser(OneLineParser):
    """megatron's parser (its actions and defaults, as ``parents``) reading ``argv`` instead of
    ``sys.argv``, with usage errors in one line (argparse would print megatron's 900-line usage
    first) and no YAML config (megatron would read it after parsing, bypassing every check)."""

    def __init__(self, parent: argparse.ArgumentParser, argv: Sequence[str]):
        super().__init__(prog=PROG, description=parent.description, parents=[parent], add_help=False,
                         allow_abbrev=parent.allow_abbrev)
        self.argv = list(argv)

    def parse_known_args(self, args: Sequence[str] | None = None,  # type: ignore[override]
                         namespace: argparse.Namespace | None = None) -> tuple[argparse.Namespace, list[str]]:
        parsed, extra = super().parse_known_args(self.argv if args is None else args, namespace)
        if getattr(parsed, "yaml_cfg", None) is not None:
            self.error("argument --yaml-cfg: a YAML config would bypass this command line's checks: pass the "
                       "settings as flags")
        return parsed, extra


def _parser_for(argv: Sequence[str], parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """megatron's ``extra_args_provider``: the MoH flags on megatron's parser, then a parser of
    our own with all of them (megatron parses with the one this returns)."""
    add_moh_args(parser)
    _escape_stray_percent(parser)
    return _MegatronParser(parser, argv)


def parse_megatron_args(argv: Sequence[str], defaults: Mapping[str, Any] | None = None, *,
                        validate: bool = True) -> argparse.Namespace:
    """Megatron-LM's arguments (plus ``--moh-*``) from ``argv``, without touching ``sys.argv``.

    With ``validate``, `validate_megatron_args` runs too (``defaults`` fill what ``argv`` left
    unset). No global state is set.
    """
    from megatron.training.arguments import parse_args

    args = parse_args(extra_args_provider=functools.partial(_parser_for, argv))
    return validate_megatron_args(args, defaults) if validate else args


def validate_megatron_args(args: argparse.Namespace, defaults: Mapping[str, Any] | None = None) -> argparse.Namespace:
    """megatron's ``--use-checkpoint-args`` and ``validate_args``, as ``parse_and_validate_args``
    runs them; ``defaults`` are megatron's ``args_defaults``."""
    from megatron.training.arguments import validate_args

    if args.use_checkpoint_args:
        from megatron.training.checkpointing import load_args_from_checkpoint

        if args.load is None and args.pretrained_checkpoint is None:
            raise SystemExit(f"{PROG}: error: --use-checkpoint-args needs --load or --pretrained-checkpoint")
        load_args_from_checkpoint(args, load_arg="pretrained_checkpoint")
        load_args_from_checkpoint(args)
    validate_args(args, dict(defaults or {}))
    return args
