"""Checks a run's arguments before any process group starts or any model is built.

Everything that would otherwise fail late (after start-up, or after training ran), fail with one
of megatron's bare assertions, or go wrong silently (training on the wrong data) is refused here
with one line that says what to change. `check_values` runs on the parsed flags before megatron's
own validation; `check_args` on the validated arguments, before the tokenizer, TensorBoard or any
process group exists.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from megatron.core.rerun_state_machine import EXIT_CODE_FAILED_ON_RESULT_VALIDATION, EXIT_CODE_RESUME_TO_DISAMBIGUATE

from megatron_moh.arguments import PROG, TINY_MODEL
from megatron_moh.checkpoint import CheckpointError, check_load, first_line
from megatron_moh.config import MoHConfigError, check_moh_config, resolve_moh_defaults
from megatron_moh.layout import moe_layer_pattern
from megatron_moh.conversion import ConversionError, hf_generation
from megatron_moh.moh_attention import ATTENTION_OFFLOAD_MODULES
from megatron_moh.outputs import unwritable_reason
from megatron_moh.save_dir import held, newest_checkpoint, room_problem
from megatron_moh.specs import TransformerEngineMissing, have_transformer_engine, require_transformer_engine

# Counts and sizes that must be at least 1 when given (None: megatron or the project fills them).
POSITIVE = (
    "num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups", "kv_channels",
    "seq_length", "max_position_embeddings", "micro_batch_size", "global_batch_size", "train_iters",
    "train_samples", "save_interval", "log_interval", "eval_interval", "tensor_model_parallel_size",
    "pipeline_model_parallel_size", "context_parallel_size", "expert_model_parallel_size", "vocab_size",
    "make_vocab_size_divisible_by", "num_experts", "moe_router_topk",
)
# Rates, counts and scales that may be 0 but never negative.
NON_NEGATIVE = (
    "lr", "min_lr", "lr_warmup_iters", "lr_warmup_samples", "lr_decay_iters", "weight_decay", "clip_grad",
    "eval_iters", "init_method_std", "moh_load_balance_coeff", "moe_aux_loss_coeff", "exit_interval",
)
PROBABILITIES = ("hidden_dropout", "attention_dropout", "lr_warmup_fraction")

# Megatron-LM settings that shape the model or its loss and that this stack does not honour:
# (argument, whether it is asked for, why and what to do). Refused rather than silently ignored;
# tests/unit/test_flags.py holds the whole audit, honoured flags included.
REFUSED: tuple[tuple[str, Callable[[Any], bool], str], ...] = (
    ("multi_latent_attention", bool, "multi-latent attention (MLA) has no mixture-of-heads variant: MoH is built on "
                                     "megatron's SelfAttention; drop --multi-latent-attention"),
    ("heterogeneous_layers_config_path", bool, "heterogeneous layer configs build megatron's own layers, not MoH: "
                                               "drop --heterogeneous-layers-config-path"),
    ("spec", bool, "--spec replaces the layer spec, and MoH is a spec of its own: drop --spec (--moh-dense-baseline "
                   "trains megatron's own attention)"),
    ("experimental_attention_variant", bool, "--experimental-attention-variant replaces the attention, which MoH "
                                             "is: drop it"),
    ("hybrid_layer_pattern", bool, "--hybrid-layer-pattern describes a HybridModel; this stack builds a GPT: drop it"),
    ("mtp_num_layers", bool, "multi-token prediction layers are not built by the MoH model: drop --mtp-num-layers"),
    ("attention_output_gate", bool, "--attention-output-gate is megatron's own per-head gate, which MoH's router "
                                    "replaces: drop it"),
    ("qk_l2_norm", bool, "--qk-l2-norm makes every query norm 1, which the query-norm router routes on, and is not "
                         "built by the MoH layer: drop it (--qk-layernorm is supported)"),
    ("no_rope_freq", bool, "--no-rope-freq (RoPE on some layers only) is not built by the MoH layer: drop it"),
    ("layernorm_zero_centered_gamma", bool, "the local spec's torch norms have no zero-centred gamma: drop "
                                            "--apply-layernorm-1p / --layernorm-zero-centered-gamma"),
    ("softmax_type", lambda value: value != "vanilla", "only the vanilla attention softmax is built by the MoH "
                                                       "layer's cores: drop --softmax-type"),
    ("normalization", lambda value: value not in ("RMSNorm", "LayerNorm"), "--normalization: the layer specs build "
                                                                          "RMSNorm or LayerNorm"),
    ("position_embedding_type", lambda value: value not in ("rope", "learned_absolute", "none"),
     "--position-embedding-type: rope, learned_absolute or none (YaRN and M-RoPE are not wired into the MoH layer)"),
    ("attention_backend", lambda value: getattr(value, "name", value) == "local",
     "--attention-backend local needs megatron's --spec local, which the MoH spec replaces: use unfused (megatron's "
     "DotProductAttention) or auto (torch SDPA)"),
    ("transformer_impl", lambda value: value not in ("local", "transformer_engine"),
     "--transformer-impl: local or transformer_engine"),
    ("qk_clip", bool, "--qk-clip reads megatron's attention internals, which the MoH layer does not keep: drop it"),
    ("apply_residual_connection_post_layernorm", bool, "megatron-core 0.19 accepts "
     "--apply-residual-connection-post-layernorm but its layers ignore it: drop it"),
    ("moe_use_upcycling", bool, "--moe-use-upcycling (dense checkpoint -> MoE) is not wired into the MoH model "
                                "yet: drop it"),
    # What megatron's Attention.forward does and MoHSelfAttention.forward does not (see its docstring).
    ("offload_modules", lambda value: bool(set(value or ()) & set(ATTENTION_OFFLOAD_MODULES)),
     f"--offload-modules {', '.join(ATTENTION_OFFLOAD_MODULES)} offload inputs inside megatron's attention "
     f"forward, which the MoH layer replaces: drop them (the norms' and MoE modules' offloading is megatron's own)"),
    ("cuda_graph_impl", lambda value: value not in (None, "none"), "--cuda-graph-impl: the MoH layer's routing and "
                                                                   "head-sparse core are not captured in CUDA graphs: "
                                                                   "drop it"),
    ("enable_cuda_graph", bool, "--enable-cuda-graph: the MoH layer is not captured in CUDA graphs: drop it"),
    ("external_cuda_graph", bool, "--external-cuda-graph: the MoH layer is not captured in CUDA graphs: drop it"),
    ("flash_decode", bool, "--flash-decode is megatron's inference path, which the MoH layer does not have: drop it "
                           "(export the checkpoint to Hugging Face format and generate there)"),
    ("perform_rl_step", bool, "--perform-rl-step generates with megatron's inference engine (KV cache), which the "
                              "MoH layer does not have: drop it"),
    ("sft", bool, "--sft trains on packed sequences (THD), which pretrain_moh.py does not build and the MoH layer "
                  "does not support: drop it"),
    ("hybrid_context_parallel", bool, "--hybrid-context-parallel packs sequences across context-parallel ranks, "
                                      "which the MoH layer does not support: drop it"),
)


def _flag(field: str) -> str:
    return "--" + field.replace("_", "-")


def _moe_problems(args: argparse.Namespace) -> list[str]:
    """MoE settings that megatron-core would reject late (at the first forward, or with a bare
    assertion) or that cannot run on this stack."""
    experts, ep, tp = args.num_experts, args.expert_model_parallel_size, args.tensor_model_parallel_size
    if not experts:
        return [f"--expert-model-parallel-size {ep} needs --num-experts (the experts it spreads over the "
                f"ranks)"] if ep and ep > 1 else []
    problems = []
    if ep and experts % ep:
        problems.append(f"--num-experts {experts} is not divisible by --expert-model-parallel-size {ep}: each "
                        f"expert-parallel rank holds the same number of experts")
    if args.moe_router_topk and args.moe_router_topk > experts:
        problems.append(f"--moe-router-topk {args.moe_router_topk} is more than the {experts} experts: lower it")
    try:
        moe_layer_pattern(args.moe_layer_freq, args.num_layers or TINY_MODEL["num_layers"])
    except ValueError as err:
        problems.append(str(err))
    if tp > 1 and not args.sequence_parallel:
        problems.append("MoE with --tensor-model-parallel-size > 1 needs --sequence-parallel (megatron-core's MoE "
                        "layer refuses to train without it)")
    if args.moe_grouped_gemm and args.transformer_impl != "transformer_engine":
        problems.append("--moe-grouped-gemm needs Transformer Engine's grouped GEMM (--transformer-impl "
                        "transformer_engine); the local spec runs the experts one after another: drop it")
    if args.moe_latent_size and not have_transformer_engine():
        problems.append("--moe-latent-size builds Transformer Engine linears, which are not importable here: drop it")
    if args.distributed_backend == "gloo":
        dispatcher = args.moe_token_dispatcher_type
        expert_tp = args.expert_tensor_parallel_size or tp
        if dispatcher == "flex":
            problems.append("--moe-token-dispatcher-type flex needs DeepEP/HybridEP on GPUs: on CPU (gloo) use "
                            "allgather (the default) or alltoall")
        elif dispatcher == "alltoall" and expert_tp > 1:
            problems.append(f"--moe-token-dispatcher-type alltoall with expert tensor parallelism {expert_tp} "
                            f"gathers uneven token counts, which gloo cannot: on CPU use allgather (the default) "
                            f"or --expert-tensor-parallel-size 1")
    return problems


def check_values(args: argparse.Namespace) -> None:
    """Refuse impossible numbers before megatron's validation asserts on some of them without a
    message and lets others through to fail after start-up."""
    problems = []
    for field in POSITIVE:
        value = getattr(args, field, None)
        if value is not None and value < 1:
            problems.append(f"{_flag(field)} {value} must be at least 1")
    for field in NON_NEGATIVE:
        value = getattr(args, field, None)
        values = value if isinstance(value, list) else [value]  # --moe-aux-loss-coeff takes one per loss type
        if any(v is not None and not (v >= 0 and math.isfinite(v)) for v in values):
            problems.append(f"{_flag(field)} {value} must be a finite number, 0 or more")
    for field in PROBABILITIES:
        value = getattr(args, field, None)
        if value is not None and not 0 <= value < 1:
            problems.append(f"{_flag(field)} {value} must be in [0, 1)")
    if args.save and args.save_interval is None:
        problems.append("--save needs --save-interval N (a checkpoint every N iterations; one is also written "
                        "on --exit-interval, --exit-duration-in-mins or a signal with --exit-signal-handler)")
    if args.lr is not None and args.min_lr is not None and args.min_lr > args.lr:
        problems.append(f"--min-lr {args.min_lr} is above --lr {args.lr}: the schedule decays from --lr to --min-lr")
    for field, asked, why in REFUSED:
        if asked(getattr(args, field, None)):
            problems.append(why)
    problems += _moe_problems(args)
    if problems:
        raise SystemExit(f"{PROG}: error: {problems[0]}")


def explain_assertion(err: AssertionError) -> str:
    """One line for one of megatron's argument assertions; a bare one is quoted from its source."""
    message = str(err).strip().splitlines()
    if message:
        return message[0]
    frame = traceback.extract_tb(err.__traceback__)[-1]
    return (f"megatron refused the arguments at {Path(frame.filename).name}:{frame.lineno} "
            f"(`{frame.line}`): change the flag it names")


def _check_writable(flag: str, path: str | None) -> None:
    reason = unwritable_reason(path) if path else None
    if reason:
        raise SystemExit(f"{PROG}: error: {flag} {path}: {reason}: choose a directory you can write to")


def check_outputs(args: argparse.Namespace) -> None:
    """Refuse outputs that would fail at the first save or log, after training ran: among them a
    --save without room for a checkpoint as large as the one this run resumes from."""
    _check_writable("--save", args.save)
    _check_writable("--tensorboard-dir", args.tensorboard_dir)
    _check_writable("--data-cache-path", args.data_cache_path)
    if args.save and args.ckpt_format == "torch":
        raise SystemExit(f"{PROG}: error: --ckpt-format torch writes megatron's legacy format, which this project "
                         f"does not load back (it reads torch_dist checkpoints only, safely): use "
                         f"--ckpt-format torch_dist (the default)")
    if args.save and (problem := room_problem(args.save, "the next checkpoint", newest_checkpoint(args.load))):
        raise SystemExit(f"{PROG}: error: {problem}")


@contextlib.contextmanager
def holding_save_dir(args: argparse.Namespace) -> Iterator[None]:
    """Hold --save for this run while the block runs (`megatron_moh.save_dir`); one line when
    another run holds it."""
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(held(args.save, args.rank))
        except CheckpointError as err:
            raise SystemExit(f"{PROG}: error: {err}") from None
        yield


def build_checked_tokenizer(args: argparse.Namespace) -> Any:
    """megatron's tokenizer for ``args`` (this also sets ``args.padded_vocab_size``), after a
    one-line check that a sentencepiece model or Hugging Face tokenizer directory is one, of the
    kind ``--tokenizer-type`` names."""
    from megatron.core.tokenizers.utils.build_tokenizer import build_tokenizer

    from megatron_moh.tokenizer import HUGGINGFACE_TYPE, SENTENCEPIECE_TYPES, TokenizerError, check_tokenizer_model

    if args.tokenizer_type in (HUGGINGFACE_TYPE, *SENTENCEPIECE_TYPES):
        try:
            check_tokenizer_model(args.tokenizer_model, args.tokenizer_type)
        except TokenizerError as err:
            raise SystemExit(f"{PROG}: error: --tokenizer-model: {err}") from None
    return build_tokenizer(args)


def _check_model_config(args: argparse.Namespace) -> None:
    """megatron-core's own checks of the model config (many MoE combinations among them), which
    would otherwise raise only when the model is built, after start-up."""
    from megatron_moh.model import config_from_args

    try:
        config_from_args(args)
    except (ValueError, AssertionError) as err:
        raise MoHConfigError(explain_assertion(err) if isinstance(err, AssertionError) else first_line(err)) from None


def check_args(args: argparse.Namespace) -> None:
    """Exit with a one-line message for impossible MoH settings, unwritable outputs, unusable data
    or an unusable ``--load`` checkpoint (and say, once, when a GPU trains on the local spec because
    Transformer Engine is missing); then carry an imported model's generation settings from
    the checkpoint it starts from to ``--save`` (`hf_generation`)."""
    from megatron_moh.data.validation import DataError, validate_data

    check_outputs(args)
    try:
        if args.fp8:
            require_transformer_engine(f"--fp8-format {args.fp8}")
        if args.transformer_impl == "transformer_engine":
            require_transformer_engine("--transformer-impl transformer_engine")
        resolve_moh_defaults(args)
        check_moh_config(args)
        _check_model_config(args)
        tokenizer = build_checked_tokenizer(args)
        if args.data_path is not None:
            validate_data(args.data_path, tokenizer, split=args.split)
        check_load(args)
        if int(os.environ.get("RANK", "0")) == 0:
            hf_generation.carry([args.load, args.pretrained_checkpoint], args.save)
    except (MoHConfigError, DataError, TransformerEngineMissing, CheckpointError, ConversionError) as err:
        raise SystemExit(f"{PROG}: error: {err}") from None


# megatron's exit codes when its result validation found a NaN/Inf that a rerun reproduced.
DIVERGED_EXIT_CODES = (EXIT_CODE_RESUME_TO_DISAMBIGUATE, EXIT_CODE_FAILED_ON_RESULT_VALIDATION)


def diverged(args: argparse.Namespace, code: int) -> str:
    """The one line to end a run that megatron's result validation stopped."""
    saved = (f"a checkpoint of the iteration before it is in --save {args.save}, so resuming reruns it"
             if args.save and code == EXIT_CODE_RESUME_TO_DISAMBIGUATE
             else "nothing was saved" + ("" if args.save else " (no --save)"))
    return (f"{PROG}: error: training diverged at iteration {args.curr_iteration + 1}: megatron's result validation "
            f"found NaN or Inf (the log above says where); {saved}; lower --lr or use --clip-grad")
