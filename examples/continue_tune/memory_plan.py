"""GPU memory of a pretrain_moh.py run, COMPUTED (nothing runs): megatron-core's own theoretical model
(``megatron.training.theoretical_memory_usage``: weights, gradients and optimizer state, plus
activations per Korthikanti et al. 2022, Table 2, for sequence parallelism with selective recompute),
for the layout of the flags on stdin and for its neighbours, on nodes of 8 GPUs.

    DRY_RUN=1 MODEL=moh_llama3_8b ... bash examples/single_node.sh | python examples/continue_tune/memory_plan.py

Not counted: the CUDA context, NCCL buffers and allocator fragmentation (a few GB on an 80 GB GPU), which is
what ``--headroom`` leaves; measure the real peak with megatron's ``--log-memory-to-tensorboard``.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import math
import sys

GIB = 1024**3


def per_gpu_bytes(flags: list[str], tp: int, pp: int, micro_batch: int, gpus: int,
                  vocab_size: int) -> tuple[float, float]:
    """(weights + gradients + optimizer state, activations) in bytes on the busiest GPU."""
    from megatron.training import theoretical_memory_usage as memory
    from megatron.training.arguments import validate_args

    from megatron_moh.arguments import parse_megatron_args

    args = parse_megatron_args(flags, validate=False)
    args.tensor_model_parallel_size, args.pipeline_model_parallel_size = tp, pp
    args.micro_batch_size, args.rank, args.world_size = micro_batch, 0, gpus
    args.sequence_parallel = tp > 1
    with contextlib.redirect_stdout(io.StringIO()):
        validate_args(args, {})
    multiple = args.make_vocab_size_divisible_by * tp
    args.padded_vocab_size = math.ceil(vocab_size / multiple) * multiple
    microbatches = args.global_batch_size // (micro_batch * args.data_parallel_size)
    with contextlib.redirect_stdout(io.StringIO()):
        weights = memory.compute_weight_and_optimizer_memory(args)
        if args.sequence_parallel and args.recompute_granularity == "selective":
            activations = memory.compute_activation_memory(args, microbatches)
        else:
            activations = memory.compute_activation_memory_without_sp(args, microbatches)
    return weights, activations


def main(argv: list[str] | None = None) -> None:
    """Print the table for the flags on stdin."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument("--gpus-per-node", type=int, default=8)
    parser.add_argument("--gpu-memory-gb", type=float, default=80.0)
    parser.add_argument("--headroom-gb", type=float, default=8.0, help="kept free for what the model omits")
    parser.add_argument("--vocab-size", type=int, default=128256, help="the tokenizer's (Llama-3: 128,256)")
    opts = parser.parse_args(argv)
    from megatron_moh import patches, platform

    platform.setup(force_cpu=True)  # megatron's argument checks query the GPU; nothing here needs one
    patches.install_all()
    flags = sys.stdin.read().split("\n")
    flags = [flag for flag in flags if flag]
    chosen = {name: int(flags[flags.index(flag) + 1]) for name, flag in
              (("tp", "--tensor-model-parallel-size"), ("pp", "--pipeline-model-parallel-size"),
               ("micro_batch", "--micro-batch-size"))}
    gpus = opts.nodes * opts.gpus_per_node
    budget = opts.gpu_memory_gb - opts.headroom_gb
    print(f"computed, not measured: megatron-core's theoretical memory model, {opts.nodes} node(s) x "
          f"{opts.gpus_per_node} GPUs, budget {budget:.0f} of {opts.gpu_memory_gb:.0f} GB per GPU")
    print("| TP | PP | DP | micro-batch | weights+grads+optimizer GB | activations GB | total GB | fits |")
    print("|---|---|---|---|---|---|---|---|")
    layouts = sorted({(chosen["tp"], chosen["pp"], chosen["micro_batch"]), (1, 1, 1), (2, 1, 1), (2, 1, 2),
                      (4, 1, 1), (4, 1, 2), (2, 2, 1)})
    for tp, pp, micro_batch in layouts:
        if gpus % (tp * pp):
            continue
        weights, activations = per_gpu_bytes(flags, tp, pp, micro_batch, gpus, opts.vocab_size)
        total = (weights + activations) / GIB
        mark = " (this run)" if (tp, pp, micro_batch) == tuple(chosen.values()) else ""
        print(f"| {tp} | {pp} | {gpus // (tp * pp)} | {micro_batch} | {weights / GIB:.1f} | {activations / GIB:.1f} | "
              f"{total:.1f} | {'yes' if total <= budget else 'no'}{mark} |")


if __name__ == "__main__":
    main()
