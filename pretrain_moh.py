"""Pretrain a Mixture-of-Head attention GPT with megatron.training.

    python pretrain_moh.py                       # tiny MoH model on the built-in corpus, CPU or GPU
    torchrun --nproc-per-node 4 pretrain_moh.py --tensor-model-parallel-size 2 \\
        --pipeline-model-parallel-size 2 --data-path my_text_document --tokenizer-model tok.model

Every Megatron-LM flag works as in Megatron-LM, or is refused with one line; --moh-* flags set
the mixture of heads. --verbose shows the notices megatron-core and torch print about absent
optional libraries (Transformer Engine, Apex, CUDA), which a run otherwise sums up in one line.
"""

from __future__ import annotations

import contextlib
import io
import sys
from collections.abc import Sequence

from megatron_moh import console, patches, platform


def main(argv: Sequence[str] | None = None) -> None:
    """Parse, check, train: megatron.training's loop with the MoH model, data and metrics."""
    argv, verbose = console.split_verbose(sys.argv[1:] if argv is None else argv)
    if not verbose:
        console.hide_notices()  # before megatron's imports print them
    platform.single_process_defaults()
    platform.setup()
    patches.install_all()  # before --use-checkpoint-args can read a checkpoint during parsing

    from megatron.core.enums import ModelType
    from megatron.training import pretrain
    from megatron.training.argument_utils import pretrain_cfg_container_from_args
    from megatron.training.global_vars import set_global_variables

    from megatron_moh import preflight
    from megatron_moh.arguments import TINY_MODEL, parse_megatron_args, validate_megatron_args
    from megatron_moh.data.corpus import use_builtin_data
    from megatron_moh.patches import checkpointing
    from megatron_moh.train import datasets_provider, forward_step, model_provider

    args = parse_megatron_args(argv, validate=False)
    if not verbose:
        console.skip_absent_one_logger(args)
    preflight.check_values(args)
    use_builtin_data(args)
    # megatron prints its view of the arguments while validating; show it once the checks passed.
    report = io.StringIO()
    try:
        with contextlib.redirect_stdout(report):
            validate_megatron_args(args, TINY_MODEL)
            preflight.check_args(args)
    except AssertionError as err:  # megatron's argument checks, e.g. impossible batch sizes
        raise SystemExit(f"{preflight.PROG}: error: {preflight.explain_assertion(err)}") from None
    with preflight.holding_save_dir(args):  # one run per --save directory
        fallbacks = console.fallback_line(args.transformer_impl, gpu=not platform.cpu_requested())
        if not verbose and args.rank == 0 and fallbacks:
            print(fallbacks)
        sys.stdout.write(report.getvalue())
        if args.save and args.ckpt_format == "torch_dist":
            checkpointing.start_writer_helper()  # now, so that a signal cannot catch it starting in a save
        set_global_variables(args)
        try:
            pretrain(
                pretrain_cfg_container_from_args(args),
                datasets_provider,
                ModelType.encoder_or_decoder,
                forward_step,
                model_provider=model_provider,
            )
        except SystemExit as exit_:
            if exit_.code in preflight.DIVERGED_EXIT_CODES:
                print(preflight.diverged(args, exit_.code), file=sys.stderr)
            raise
        except checkpointing.DiskFull as err:
            raise SystemExit(f"{preflight.PROG}: error: {err.strerror}") from None


if __name__ == "__main__":
    main()
