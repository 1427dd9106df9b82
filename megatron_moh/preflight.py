"""Checks a run's arguments before any process group starts or any model is built.

Everything that would otherwise fail late (after start-up, or after training ran) or silently
(training on the wrong data) is refused here with one line that says what to change.
"""

from __future__ import annotations

import argparse

from megatron_moh.checkpoint import CheckpointError, check_load
from megatron_moh.config import MoHConfigError, check_moh_config, resolve_moh_defaults
from megatron_moh.specs import TransformerEngineMissing, require_transformer_engine

PROG = "pretrain_moh.py"


def check_args(args: argparse.Namespace) -> None:
    """Exit with a one-line message for impossible MoH settings, unusable data or an unusable
    ``--load`` checkpoint."""
    from megatron.training import get_tokenizer

    from megatron_moh.data.validation import DataError, validate_data

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
        raise SystemExit(f"{PROG}: error: {err}") from None
