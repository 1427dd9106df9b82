"""Training-step throughput (tokens/s) and memory of a ~20M-parameter MoH GPT against the same
model with dense attention, in one process. Prints a table, writes JSON.

    .venv/bin/python benchmarks/bench_train.py             # hidden 384, 8 layers, seq 256, batch 4
    .venv/bin/python benchmarks/bench_train.py --quick     # fewer repeats
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import interleaved_medians, memory_bytes, memory_kind, setup_one_rank, write_report  # noqa: E402


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
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.repeats, args.warmup = 2, 1

    device = setup_one_rank()
    from megatron_moh.model import build_gpt_model, count_parameters, llama_moh_config

    h = args.heads
    settings = [("dense attention", False, "learned", h, 0),
                ("MoH learned, 75% active", True, "learned", h // 2, h // 4),
                ("MoH query_norm, 75% active", True, "query_norm", h // 2, h // 4),
                ("MoH learned, 50% active", True, "learned", h // 4, h // 4)]
    tokens = torch.randint(0, args.vocab, (args.batch, args.seq), device=device)
    position_ids = torch.arange(args.seq, device=device).expand(args.batch, -1)
    steps, params = [], []
    for _, moh, router, shared, topk in settings:
        cfg = llama_moh_config(num_layers=args.layers, hidden_size=args.hidden, ffn_hidden_size=args.ffn,
                               num_attention_heads=h, moh_router=router, moh_num_shared_heads=shared,
                               moh_topk=topk, use_cpu_initialization=device.type == "cpu")
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

    seconds = interleaved_medians(steps, args.repeats, args.warmup)
    memory = [memory_bytes(step) for step in steps]
    per_step = args.batch * args.seq
    rows = [{"setting": label, "parameters": p, "tokens_per_second": per_step / t, "seconds": t,
             "memory_bytes": m, "throughput_ratio_vs_dense": seconds[0] / t, "memory_ratio_vs_dense": m / memory[0]}
            for (label, *_), p, t, m in zip(settings, params, seconds, memory)]

    print(f"\nTraining step (fwd+bwd+AdamW): {args.layers} layers, hidden {args.hidden}, {h} heads, "
          f"seq {args.seq}, batch {args.batch}, fp32, {device.type} ({torch.get_num_threads()} threads)")
    print(f"| setting | parameters | tokens/s | throughput / dense | {memory_kind()} (MiB) | memory / dense |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['setting']} | {row['parameters'] / 1e6:.1f}M | {row['tokens_per_second']:.0f} | "
              f"{row['throughput_ratio_vs_dense']:.3f} | {row['memory_bytes'] / 2**20:.1f} | "
              f"{row['memory_ratio_vs_dense']:.3f} |")
    shape = {k: getattr(args, k) for k in ("layers", "hidden", "ffn", "heads", "vocab", "seq", "batch")}
    print(f"\nwrote {write_report('bench_train', {'shape': shape, 'rows': rows})}")


if __name__ == "__main__":
    main()
