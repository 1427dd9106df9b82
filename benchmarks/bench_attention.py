"""Forward+backward time and memory of the MoH attention layer against megatron-core's dense
SelfAttention at the same shapes, in one process. Prints a table, writes JSON.

Every layer uses the local spec's default core attention (torch SDPA, megatron_moh.core_attention)
unless its row says otherwise; one dense row keeps megatron's DotProductAttention
(``--attention-backend unfused``) to show what the SDPA core gains. Ratios are against the dense
layer with the SDPA core.

    .venv/bin/python benchmarks/bench_attention.py            # hidden 1024, 16 heads, seq 1024, batch 2
    .venv/bin/python benchmarks/bench_attention.py --quick    # smaller shapes, for a smoke run
    .venv/bin/python benchmarks/bench_attention.py --hidden 2048 --seq 4096 --batch 1 --bf16  # GPU kit
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
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--bf16", action="store_true", help="bf16 parameters and activations")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--quick", action="store_true", help="hidden 256, seq 256: a smoke run")
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default benchmarks/results/)")
    args = parser.parse_args()
    if args.quick:
        args.hidden, args.seq, args.repeats, args.warmup = 256, 256, 3, 1

    device = setup_one_rank(threads=args.threads)
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
    from megatron.core.transformer.enums import AttnBackend
    from megatron.core.transformer.spec_utils import build_module

    from megatron_moh.model import llama_moh_config
    from megatron_moh.specs import local_layer_spec

    dtype = torch.bfloat16 if args.bf16 else torch.float32
    h = args.heads
    # (label, router, shared heads, routed heads active per token, MoH impl, attention backend)
    settings = [("dense (megatron SelfAttention, SDPA core)", None, h, 0, "dense", AttnBackend.auto),
                ("dense, megatron DotProductAttention core", None, h, 0, "dense", AttnBackend.unfused)]
    for router in ("learned", "query_norm"):
        settings.append((f"MoH {router}, 75% active", router, h // 2, h // 4, "dense", AttnBackend.auto))
        settings.append((f"MoH {router}, 50% active", router, h // 4, h // 4, "dense", AttnBackend.auto))
    for active, shared in (("75%", h // 2), ("50%", h // 4)):
        settings.append((f"MoH learned, {active} active, head-sparse", "learned", shared, h // 4,
                         "sparse", AttnBackend.auto))

    x = torch.randn(args.seq, args.batch, args.hidden, device=device, dtype=dtype, requires_grad=True)
    rot = RotaryEmbedding(kv_channels=args.hidden // h, rotary_percent=1.0)(args.seq).to(device)
    steps = []
    for _, router, shared, topk, impl, backend in settings:
        cfg = llama_moh_config(
            num_layers=1, hidden_size=args.hidden, num_attention_heads=h, ffn_hidden_size=4 * args.hidden,
            moh_router=router or "learned", moh_num_shared_heads=shared, moh_topk=topk,
            moh_attention_impl=impl, attention_backend=backend,
            params_dtype=dtype, bf16=args.bf16, use_cpu_initialization=device.type == "cpu",
        )
        torch.manual_seed(0)
        spec = local_layer_spec(cfg, moh=router is not None).submodules.self_attention
        layer = build_module(spec, config=cfg, layer_number=1).to(device)

        def step(layer=layer):
            out, _ = layer(x, attention_mask=None, rotary_pos_emb=rot)
            out.float().square().mean().backward()

        steps.append(step)

    seconds, cpu_seconds = interleaved_medians(steps, args.repeats, args.warmup)
    memory = [memory_bytes(step) for step in steps]
    rows = [{"setting": label, "router": router, "shared_heads": shared, "topk": topk,
             "moh_attention_impl": impl, "attention_backend": backend.name,
             "active_fraction": (shared + topk) / h, "seconds": t, "cpu_seconds": c, "memory_bytes": m,
             "time_ratio_vs_dense": t / seconds[0], "cpu_time_ratio_vs_dense": c / cpu_seconds[0],
             "memory_ratio_vs_dense": m / memory[0]}
            for (label, router, shared, topk, impl, backend), t, c, m in zip(settings, seconds, cpu_seconds,
                                                                            memory)]

    print(f"\nMoH attention layer, forward+backward: hidden {args.hidden}, {h} heads, seq {args.seq}, "
          f"batch {args.batch}, {dtype}, {device.type} ({torch.get_num_threads()} threads)")
    print(f"| setting | active heads | time (ms) | time / dense | CPU time / dense | "
          f"{memory_kind()} (MiB) | memory / dense |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['setting']} | {row['active_fraction']:.0%} | {row['seconds'] * 1e3:.1f} | "
              f"{row['time_ratio_vs_dense']:.3f} | {row['cpu_time_ratio_vs_dense']:.3f} | "
              f"{row['memory_bytes'] / 2**20:.1f} | {row['memory_ratio_vs_dense']:.3f} |")
    shape = {"hidden": args.hidden, "heads": h, "seq": args.seq, "batch": args.batch, "dtype": str(dtype)}
    print(f"\nwrote {write_report('bench_attention', {'shape': shape, 'rows': rows}, args.out)}")


if __name__ == "__main__":
    main()
