"""Convert between megatron-moh checkpoints and Hugging Face directories.

    # megatron checkpoint (any TP/PP) -> Hugging Face moh_llama (or plain Llama with --dense)
    python tools/convert_checkpoint.py export-hf --load ckpt/ --out hf-moh/
    # Hugging Face Llama -> megatron checkpoint for continue-tuning at TP=2, PP=1
    python tools/convert_checkpoint.py import-hf --hf Llama-3-8B/ --out ckpt-moh/ --layout published \\
        --tensor-model-parallel-size 2

The work is in megatron_moh.conversion; this is its command line (``tools/convert_checkpoint.py``
and the ``megatron-moh-convert`` console script). Bad input is refused with one
line before any conversion starts; an existing output directory is never replaced without
--overwrite.
"""

from __future__ import annotations

import argparse

from megatron_moh.commands import OneLineParser
from megatron_moh.layout import GATES, LAYOUT_PRESETS, ROUTERS, MoHLayout

PROG = "convert_checkpoint.py"
DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def build_parser() -> argparse.ArgumentParser:
    """The two subcommands and their options."""
    parser = OneLineParser(prog=PROG, description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)

    export = commands.add_parser("export-hf", help="megatron checkpoint -> Hugging Face directory")
    export.add_argument("--load", required=True, help="checkpoint directory (what the run's --save named)")
    export.add_argument("--out", required=True, help="Hugging Face directory to write")
    export.add_argument("--dense", action="store_true",
                        help="write a plain LlamaForCausalLM (refused unless every head is shared)")
    export.add_argument("--tokenizer-model", default=None,
                        help="sentencepiece .model (or HF tokenizer directory) to export; default: the run's")
    export.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard (default 5GB)")
    export.add_argument("--overwrite", action="store_true", help="replace --out if it exists")

    imp = commands.add_parser("import-hf", help="Hugging Face Llama / MoH-Llama -> megatron checkpoint")
    imp.add_argument("--hf", required=True, help="Hugging Face checkpoint directory (config.json + safetensors)")
    imp.add_argument("--out", required=True,
                     help="checkpoint directory to write (then: pretrain_moh.py --load OUT --finetune)")
    imp.add_argument("--layout", choices=[*LAYOUT_PRESETS, "custom"], default=None,
                     help="MoH layout for a plain Llama: 'dense' (every head shared: the same function), "
                          "'published' (50%% shared, 25%% routed-active, query-norm router), or 'custom' "
                          "(--moh-* below). Not used for moh_llama checkpoints, which carry their own.")
    imp.add_argument("--moh-num-shared-heads", type=int, default=None, help="custom layout: shared heads")
    imp.add_argument("--moh-topk", type=int, default=None, help="custom layout: routed heads per token")
    imp.add_argument("--moh-router", choices=ROUTERS, default="query_norm",
                     help="custom layout: router (a learned router starts at zero)")
    imp.add_argument("--moh-gate", choices=GATES, default="binary", help="custom layout: gates")
    imp.add_argument("--moh-two-stage", action="store_true", help="custom layout: two-stage shared/routed weights")
    imp.add_argument("--tensor-model-parallel-size", type=int, default=1,
                     help="TP the checkpoint is for (fixes the vocabulary padding)")
    imp.add_argument("--pipeline-model-parallel-size", type=int, default=1, help="PP the checkpoint is for")
    imp.add_argument("--make-vocab-size-divisible-by", type=int, default=128,
                     help="as the training run's flag of the same name (default 128)")
    imp.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                     help="parameter dtype of the checkpoint (default: the Hugging Face weights')")
    imp.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    return parser


def _layout(opts: argparse.Namespace) -> MoHLayout | str | None:
    """The import's layout: a preset's name, the custom one, or None (a moh_llama carries its own)."""
    if opts.layout != "custom":
        if opts.moh_num_shared_heads is not None or opts.moh_topk is not None:
            raise SystemExit(f"{PROG}: error: --moh-num-shared-heads / --moh-topk need --layout custom")
        return opts.layout
    if opts.moh_num_shared_heads is None or opts.moh_topk is None:
        raise SystemExit(f"{PROG}: error: --layout custom needs --moh-num-shared-heads and --moh-topk")
    return MoHLayout(num_shared_heads=opts.moh_num_shared_heads, topk=opts.moh_topk, router=opts.moh_router,
                     gate=opts.moh_gate, two_stage=opts.moh_two_stage)


def main(argv: list[str] | None = None) -> None:
    """Run one subcommand; errors exit with one line."""
    opts = build_parser().parse_args(argv)
    layout = _layout(opts) if opts.command == "import-hf" else None

    from megatron_moh import patches, platform

    platform.single_process_defaults()
    platform.setup()
    patches.install_all()  # safe loading, and a full disk named as such when saving

    import torch

    from megatron_moh.checkpoint import CheckpointError, read_checkpoint_args
    from megatron_moh.conversion import ConversionError
    from megatron_moh.conversion.hf_checkpoint import export_hf, finetune_flags, import_hf
    from megatron_moh.outputs import describe_os_error, no_space, ran_out_of_space
    try:
        if opts.command == "export-hf":
            out = export_hf(opts.load, opts.out, dense=opts.dense, tokenizer_model=opts.tokenizer_model,
                            overwrite=opts.overwrite, max_shard_size=opts.max_shard_size)
        else:
            out = import_hf(
                opts.hf, opts.out, layout=layout, tensor_parallel=opts.tensor_model_parallel_size,
                pipeline_parallel=opts.pipeline_model_parallel_size,
                make_vocab_size_divisible_by=opts.make_vocab_size_divisible_by,
                dtype=getattr(torch, DTYPES[opts.dtype]) if opts.dtype else None, overwrite=opts.overwrite)
    except (CheckpointError, ConversionError) as err:
        raise SystemExit(f"{PROG}: error: {err}") from None
    except Exception as err:  # noqa: BLE001 - safetensors names a full disk in an error of its own
        if not ran_out_of_space(err, opts.out):
            if isinstance(err, OSError):
                raise SystemExit(f"{PROG}: error: {describe_os_error(err)}") from None
            raise
        raise SystemExit(f"{PROG}: error: {no_space(opts.out)}: nothing of --out was written: free space or "
                         f"choose another --out") from None
    print(f"{PROG}: wrote {out}")
    if opts.command == "import-hf":
        import shlex

        flags = finetune_flags(read_checkpoint_args(out))
        print(f"continue training it with:\n  python pretrain_moh.py --load {shlex.quote(str(out))} --finetune "
              f"{shlex.join(flags)} --data-path ... --save ...")
