"""Training-step throughput (tokens/s), MFU and memory of an MoH GPT against the same model with
dense attention, in one process. Prints a table, writes JSON.

Every model uses the local spec's default core attention (torch SDPA, megatron_moh.core_attention);
one dense row keeps megatron's DotProductAttention (``--attention-backend unfused``) to show what
the SDPA core gains. Ratios are against the dense model with the SDPA core. MFU counts the model's
FLOPs as training's log does (megatron's count with the attention core only for the heads each
token used: megatron_moh.metrics.moh_flops) against ``--peak-tflops`` (default: the dense bf16 peak
of a known GPU; none on CPU).

    .venv/bin/python benchmarks/bench_train.py             # hidden 384, 8 layers, seq 256, batch 4
    .venv/bin/python benchmarks/bench_train.py --quick     # fewer repeats
    .venv/bin/python benchmarks/bench_train.py --layers 24 --hidden 2048 --ffn 5632 --heads 16 \\
        --vocab 32000 --seq 4096 --batch 2 --bf16           # the GPU kit's ~1B model
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import interleaved_medians, memory_bytes, memory_kind, setup_one_rank, write_report  # noqa: E402

# Dense bf16 tensor-core peaks (TFLOP/s, without sparsity) from NVIDIA's data sheets, by a
# substring of torch.cuda.get_device_name(); checked in order.
PEAK_BF16_TFLOPS = (("H100 PCIe", 756.0), ("H100", 989.4), ("H200", 989.4), ("A100", 312.0))


def peak_tflops(device: torch.device) -> float | None:
    """The dense bf16 peak of this GPU, or None where unknown (CPU, other GPUs)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16_TFLOPS if key in name), None)


def megatron_args(args) -> argparse.Namespace:
    """megatron's arguments for the benchmark's model (Llama defaults, as its models are built)."""
    from megatron_moh.arguments import parse_megatron_args

    flags = ["--num-layers", args.layers, "--hidden-size", args.hidden, "--ffn-hidden-size", args.ffn,
             "--num-attention-heads", args.heads, "--seq-length", args.seq, "--max-position-embeddings", args.seq,
             "--micro-batch-size", args.batch, "--global-batch-size", args.batch, "--vocab-size", args.vocab,
             "--mock-data", "--tokenizer-type", "NullTokenizer", "--train-iters", 1]
    with contextlib.redirect_stdout(io.StringIO()):  # megatron prints the arguments it validates
        parsed = parse_megatron_args([str(flag) for flag in flags])
    parsed.padded_vocab_size = args.vocab
    return parsed


def train_flops_per_step(model_args: argparse.Namespace, moh: bool, shared: int, topk: int) -> float:
    """Forward+backward FLOPs of one step, counted as training's log counts them."""
    from megatron_moh.metrics import moh_flops

    layout = dict(moh_dense_baseline=not moh, moh_num_shared_heads=shared, moh_topk=topk)
    return moh_flops(argparse.Namespace(**{**vars(model_args), **layout}), model_args.global_batch_size)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=384)
    parser.add_argument("--ffn", type=int, default=1024)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--bf16", action="store_true", help="bf16 parameters and activations")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="the device's dense peak for MFU (default: known GPUs' bf16 peak)")
    parser.add_argument("--rows", nargs="+", default=["dense", "dense_megatron_core", "moh75",
                                                      "moh75_megatron_core", "moh75_query_norm", "moh50",
                                                      "moh75_sparse", "moh50_sparse"],
                        help="models to time, the dense baseline first (default: all)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default benchmarks/results/)")
    args = parser.parse_args()
    if args.quick:
        args.repeats, args.warmup = 2, 1

    device = setup_one_rank(threads=args.threads)
    from megatron.core.transformer.enums import AttnBackend

    from megatron_moh.model import build_gpt_model, count_parameters, llama_moh_config

    h = args.heads
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    # key: (label, moh, router, shared, topk, impl, attention backend)
    table = {
        "dense": ("dense attention", False, "learned", h, 0, "dense", AttnBackend.auto),
        "dense_megatron_core": ("dense, megatron DotProductAttention core", False, "learned", h, 0,
                                "dense", AttnBackend.unfused),
        "moh75": ("MoH learned, 75% active", True, "learned", h // 2, h // 4, "dense", AttnBackend.auto),
        "moh75_megatron_core": ("MoH learned, 75% active, megatron DotProductAttention core", True,
                                "learned", h // 2, h // 4, "dense", AttnBackend.unfused),
        "moh75_query_norm": ("MoH query_norm, 75% active", True, "query_norm", h // 2, h // 4, "dense",
                             AttnBackend.auto),
        "moh50": ("MoH learned, 50% active", True, "learned", h // 4, h // 4, "dense", AttnBackend.auto),
        "moh75_sparse": ("MoH learned, 75% active, head-sparse", True, "learned", h // 2, h // 4,
                         "sparse", AttnBackend.auto),
        "moh50_sparse": ("MoH learned, 50% active, head-sparse", True, "learned", h // 4, h // 4,
                         "sparse", AttnBackend.auto),
    }
    unknown = set(args.rows) - set(table)
    if unknown or args.rows[0] != "dense":
        raise SystemExit(f"--rows {' '.join(args.rows)}: start with dense (the baseline) and pick "
                         f"from {', '.join(table)}")
    settings = [table[key] for key in args.rows]
    tokens = torch.randint(0, args.vocab, (args.batch, args.seq), device=device)
    position_ids = torch.arange(args.seq, device=device).expand(args.batch, -1)
    steps, params = [], []
    for _, moh, router, shared, topk, impl, backend in settings:
        # megatron pins TE's NVTE_*_ATTN variables per process from attention_backend and asserts
        # when a later model asks otherwise; they do not steer the local spec.
        for var in ("NVTE_FLASH_ATTN", "NVTE_FUSED_ATTN", "NVTE_UNFUSED_ATTN"):
            os.environ.pop(var, None)
        cfg = llama_moh_config(num_layers=args.layers, hidden_size=args.hidden, ffn_hidden_size=args.ffn,
                               num_attention_heads=h, moh_router=router, moh_num_shared_heads=shared,
                               moh_topk=topk, moh_attention_impl=impl, attention_backend=backend,
                               params_dtype=dtype, bf16=args.bf16,
                               use_cpu_initialization=device.type == "cpu")
        torch.manual_seed(0)
        model = build_gpt_model(cfg, args.vocab, args.seq, moh=moh).to(device)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        params.append(count_parameters(model))

        def step(model=model, optimizer=optimizer):
            loss = model(tokens, position_ids, None, labels=tokens).float().mean()
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        steps.append(step)

    seconds, cpu_seconds = interleaved_medians(steps, args.repeats, args.warmup)
    memory = [memory_bytes(step) for step in steps]
    per_step = args.batch * args.seq
    peak = args.peak_tflops or peak_tflops(device)
    model_args = megatron_args(args)
    rows = []
    for (label, moh, _, shared, topk, impl, backend), p, t, c, m in zip(settings, params, seconds,
                                                                             cpu_seconds, memory):
        flops = train_flops_per_step(model_args, moh, shared, topk) / t
        rows.append({"setting": label, "moh_attention_impl": impl, "attention_backend": backend.name,
                     "active_fraction": (shared + topk) / h, "parameters": p,
                     "tokens_per_second": per_step / t, "seconds": t, "cpu_seconds": c,
                     "model_tflops": flops / 1e12,
                     "mfu": flops / (peak * 1e12) if peak else None, "memory_bytes": m,
                     "throughput_ratio_vs_dense": seconds[0] / t,
                     "cpu_time_throughput_ratio_vs_dense": cpu_seconds[0] / c,
                     "memory_ratio_vs_dense": m / memory[0]})

    print(f"\nTraining step (fwd+bwd+AdamW): {args.layers} layers, hidden {args.hidden}, {h} heads, "
          f"seq {args.seq}, batch {args.batch}, {dtype}, {device.type} ({torch.get_num_threads()} threads), "
          f"peak {peak or 'unknown'} TFLOP/s")
    print(f"| setting | parameters | tokens/s | throughput / dense | same in CPU time | model TFLOP/s | "
          f"MFU | {memory_kind()} (MiB) | memory / dense |")
    print("|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        mfu = "-" if row["mfu"] is None else f"{row['mfu']:.1%}"
        print(f"| {row['setting']} | {row['parameters'] / 1e6:.1f}M | {row['tokens_per_second']:.0f} | "
              f"{row['throughput_ratio_vs_dense']:.3f} | {row['cpu_time_throughput_ratio_vs_dense']:.3f} | "
              f"{row['model_tflops']:.3g} | {mfu} | {row['memory_bytes'] / 2**20:.1f} | "
              f"{row['memory_ratio_vs_dense']:.3f} |")
    shape = {k: getattr(args, k) for k in ("layers", "hidden", "ffn", "heads", "vocab", "seq", "batch")}
    shape["dtype"] = str(dtype)
    report = {"shape": shape, "peak_tflops": peak, "rows": rows}
    print(f"\nwrote {write_report('bench_train', report, args.out)}")


if __name__ == "__main__":
    main()
