"""Pretrain a Mixture-of-Head attention GPT with megatron.training.

    python pretrain_moh.py                       # tiny MoH model on the built-in corpus, CPU or GPU
    torchrun --nproc-per-node 4 pretrain_moh.py --tensor-model-parallel-size 2 \\
        --pipeline-model-parallel-size 2 --data-path my_text_document --tokenizer-model tok.model

Every Megatron-LM flag works as in Megatron-LM; --moh-* flags set the mixture of heads.
"""

import sys

from megatron_moh import platform

platform.single_process_defaults()
platform.setup()

from megatron.core.enums import ModelType  # noqa: E402
from megatron.training import pretrain  # noqa: E402
from megatron.training.argument_utils import pretrain_cfg_container_from_args  # noqa: E402
from megatron.training.arguments import parse_and_validate_args  # noqa: E402

from megatron_moh import checkpoint, metrics  # noqa: E402
from megatron_moh.cli import TINY_MODEL_DEFAULTS, add_moh_args, check_args  # noqa: E402
from megatron_moh.data.corpus import with_builtin_data  # noqa: E402
from megatron_moh.train import datasets_provider, forward_step, model_provider  # noqa: E402


def main() -> None:
    checkpoint.install()  # before --use-checkpoint-args can read a checkpoint during parsing
    sys.argv = [sys.argv[0], *with_builtin_data(sys.argv[1:])]
    try:
        args = parse_and_validate_args(extra_args_provider=add_moh_args, args_defaults=TINY_MODEL_DEFAULTS)
    except AssertionError as err:  # megatron's argument checks, e.g. impossible batch sizes
        raise SystemExit(f"pretrain_moh.py: error: {err}") from None
    check_args(args)
    metrics.install()
    pretrain(
        pretrain_cfg_container_from_args(args),
        datasets_provider,
        ModelType.encoder_or_decoder,
        forward_step,
        model_provider=model_provider,
    )


if __name__ == "__main__":
    main()
