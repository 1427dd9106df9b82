"""Forward+backward time and memory of the MoH attention layer against megatron-core's dense
SelfAttention at the same shapes, in one process. Prints a table, writes JSON.

    .venv/bin/python benchmarks/bench_attention.py            # hidden 1024, 16 heads, seq 1024, batch 2
    .venv/bin/python benchmarks/bench_attention.py --quick    # smaller shapes, for a smoke run

Memory: peak allocated CUDA memory on a GPU; on CPU, the bytes autograd saves for backward
(activation memory), which is what differs between the layers.
"""

from __future__ import annotations

import argparse
import json
import os
import platform as host
import statistics
import tempfile
import time
from pathlib import Path

import torch

from megatron_moh import platform


def _setup_one_rank() -> None:
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    platform.single_process_defaults()
    store = tempfile.mkdtemp(prefix="moh-bench-")
    platform.init_process_group(0, 1, init_method=f"file://{store}/rendezvous")
    parallel_state.initialize_model_parallel(1, 1)
    model_parallel_cuda_manual_seed(0)


def _saved_bytes(fn) -> int:
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total


def _step(layer, x, rot) -> None:
    out, _ = layer(x, attention_mask=None, rotary_pos_emb=rot)
    out.float().square().mean().backward()


def _seconds(layer, x, rot) -> float:
    cuda = platform.device().type == "cuda"
    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    _step(layer, x, rot)
    if cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - start


def _memory(layer, x, rot) -> int:
    if platform.device().type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        _step(layer, x, rot)
        return torch.cuda.max_memory_allocated()
    return _saved_bytes(lambda: _step(layer, x, rot))


def measure(layers: list, x, rot, repeats: int, warmup: int) -> list[dict]:
    """Median forward+backward seconds and memory per layer; the layers take turns in every
    round so that drift in the machine's speed hits them alike."""
    for layer in layers:
        for _ in range(warmup):
            _step(layer, x, rot)
    times = [[] for _ in layers]
    for _ in range(repeats):
        for i, layer in enumerate(layers):
            times[i].append(_seconds(layer, x, rot))
    return [{"seconds": statistics.median(t), "memory_bytes": _memory(layer, x, rot)}
            for t, layer in zip(times, layers)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--bf16", action="store_true", help="bf16 parameters and activations")
    parser.add_argument("--quick", action="store_true", help="hidden 256, seq 256: a smoke run")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if args.quick:
        args.hidden, args.seq, args.repeats, args.warmup = 256, 256, 3, 1

    platform.setup()
    _setup_one_rank()
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
    from megatron.core.transformer.spec_utils import build_module

    from megatron_moh.builder import llama_moh_config
    from megatron_moh.specs import local_layer_spec

    device = platform.device()
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    h = args.heads
    # (label, router, shared heads, routed active per token)
    settings = [("dense (megatron SelfAttention)", None, h, 0)]
    for router in ("learned", "query_norm"):
        settings.append((f"MoH {router}, 75% active", router, h // 2, h // 4))
        settings.append((f"MoH {router}, 50% active", router, h // 4, h // 4))

    layers = []
    x = torch.randn(args.seq, args.batch, args.hidden, device=device, dtype=dtype, requires_grad=True)
    for label, router, shared, topk in settings:
        cfg = llama_moh_config(
            num_layers=1, hidden_size=args.hidden, num_attention_heads=h, ffn_hidden_size=4 * args.hidden,
            moh_router=router or "learned", moh_num_shared_heads=shared, moh_topk=topk,
            params_dtype=dtype, bf16=args.bf16, use_cpu_initialization=device.type == "cpu",
        )
        torch.manual_seed(0)
        spec = local_layer_spec(cfg, moh=router is not None).submodules.self_attention
        layers.append(build_module(spec, config=cfg, layer_number=1).to(device))
    rot = RotaryEmbedding(kv_channels=args.hidden // h, rotary_percent=1.0)(args.seq).to(device)
    results = measure(layers, x, rot, args.repeats, args.warmup)
    rows = [{"setting": label, "router": router, "shared_heads": shared, "topk": topk,
             "active_fraction": (shared + topk) / h, **result}
            for (label, router, shared, topk), result in zip(settings, results)]

    base = rows[0]
    for row in rows:
        row["time_ratio_vs_dense"] = row["seconds"] / base["seconds"]
        row["memory_ratio_vs_dense"] = row["memory_bytes"] / base["memory_bytes"]

    memory_kind = "peak CUDA memory" if device.type == "cuda" else "saved activations"
    print(f"\nMoH attention layer, forward+backward: hidden {args.hidden}, {h} heads, seq {args.seq}, "
          f"batch {args.batch}, {dtype}, {device.type} ({torch.get_num_threads()} threads)")
    print(f"| setting | active heads | time (ms) | time / dense | {memory_kind} (MiB) | memory / dense |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['setting']} | {row['active_fraction']:.0%} | {row['seconds'] * 1e3:.1f} | "
              f"{row['time_ratio_vs_dense']:.3f} | {row['memory_bytes'] / 2**20:.1f} | "
              f"{row['memory_ratio_vs_dense']:.3f} |")

    report = {
        "benchmark": "bench_attention",
        "shape": {"hidden": args.hidden, "heads": h, "seq": args.seq, "batch": args.batch},
        "dtype": str(dtype), "device": device.type, "threads": torch.get_num_threads(),
        "torch": torch.__version__, "host": host.node(), "date": time.strftime("%Y-%m-%d"),
        "memory_kind": memory_kind, "rows": rows,
    }
    out = args.out or Path(__file__).parent / "results" / f"bench_attention_{device.type}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
