"""What verifying a checkpoint's CRC-32s costs at load time (megatron_moh.checkpoint.verify_checkpoint),
against megatron's own load of the same checkpoint. Prints a table, writes JSON.

Writes a checkpoint of random weights shaped like a ~1B-parameter Llama (hidden 2048, 17 layers, FFN
5632, vocabulary 32000, untied) with megatron-core's dist_checkpointing (torch_dist, the format
pretrain_moh.py saves), then times, taking turns: `verify_checkpoint` (its default threads, and one
thread), `dist_checkpointing.load` into preallocated tensors, and both one after the other (what a
--load costs now). With the page cache warm (files read before) and, as root, cold (caches dropped
before each step).

    .venv/bin/python benchmarks/bench_checkpoint_verify.py --dir /scratch/bench-ckpt    # ~4 GB on disk
    .venv/bin/python benchmarks/bench_checkpoint_verify.py --quick                     # 50M parameters
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import setup_one_rank, write_report  # noqa: E402


def llama_shapes(hidden: int, layers: int, ffn: int, vocab: int) -> dict[str, tuple[int, ...]]:
    """Weight shapes of a Llama-style GPT as megatron names them (SwiGLU, untied embeddings)."""
    shapes = {"embedding.word_embeddings.weight": (vocab, hidden), "output_layer.weight": (vocab, hidden),
              "decoder.final_layernorm.weight": (hidden,)}
    for layer in range(layers):
        prefix = f"decoder.layers.{layer}."
        shapes.update({prefix + "self_attention.linear_qkv.weight": (3 * hidden, hidden),
                       prefix + "self_attention.linear_qkv.layer_norm_weight": (hidden,),
                       prefix + "self_attention.linear_proj.weight": (hidden, hidden),
                       prefix + "mlp.linear_fc1.weight": (2 * ffn, hidden),
                       prefix + "mlp.linear_fc1.layer_norm_weight": (hidden,),
                       prefix + "mlp.linear_fc2.weight": (hidden, ffn)})
    return shapes


def sharded(shapes: dict[str, tuple[int, ...]], make) -> dict:
    from megatron.core.dist_checkpointing import ShardedTensor

    return {name: ShardedTensor.from_rank_offsets(name, make(shape)) for name, shape in shapes.items()}


def drop_caches() -> bool:
    """Empty the page cache (root only), so the next read comes from the disk."""
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, default=None, help="where to write the checkpoint (default: a temp dir)")
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=17)
    parser.add_argument("--ffn", type=int, default=5632)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-cold", action="store_true", help="skip the cold-cache rounds")
    parser.add_argument("--quick", action="store_true", help="hidden 512, 8 layers: a smoke run")
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default benchmarks/results/)")
    args = parser.parse_args()
    if args.quick:
        args.hidden, args.layers, args.ffn, args.vocab, args.repeats = 512, 8, 1408, 32000, 2

    setup_one_rank()
    from megatron.core import dist_checkpointing

    from megatron_moh.checkpoint import verify_checkpoint

    shapes = llama_shapes(args.hidden, args.layers, args.ffn, args.vocab)
    parameters = sum(torch.Size(shape).numel() for shape in shapes.values())
    root = Path(tempfile.mkdtemp(prefix="moh-bench-ckpt-", dir=args.dir))
    try:
        start = time.perf_counter()
        dist_checkpointing.save(sharded(shapes, lambda shape: torch.randn(shape)), str(root))
        save_s = time.perf_counter() - start
        size = sum(f.stat().st_size for f in root.iterdir())
        buffers = sharded(shapes, torch.empty)
        steps = {
            "verify": lambda: verify_checkpoint(root),
            "verify, 1 thread": lambda: verify_checkpoint(root, threads=1),
            "dist_checkpointing.load": lambda: dist_checkpointing.load(buffers, str(root)),
            "verify, then load": lambda: (verify_checkpoint(root), dist_checkpointing.load(buffers, str(root))),
        }
        cold = not args.no_cold and drop_caches()
        times: dict[str, dict[str, list[float]]] = {"warm": {k: [] for k in steps}, "cold": {k: [] for k in steps}}
        for cache in ("warm", "cold") if cold else ("warm",):
            for step in steps.values():
                step()  # warm-up: imports, and the page cache for the warm rounds
            for _ in range(args.repeats):
                for name, step in steps.items():
                    if cache == "cold":
                        drop_caches()
                    start = time.perf_counter()
                    step()
                    times[cache][name].append(time.perf_counter() - start)
        load_again = buffers["embedding.word_embeddings.weight"].data.clone()
        verify_checkpoint(root)  # and the loaded data is what was saved
        assert torch.equal(load_again, buffers["embedding.word_embeddings.weight"].data)
    finally:
        shutil.rmtree(root, ignore_errors=True)

    medians = {cache: {name: statistics.median(t) for name, t in by_step.items() if t}
               for cache, by_step in times.items() if any(by_step.values())}
    rows = []
    for cache, by_step in medians.items():
        load = by_step["dist_checkpointing.load"]
        for name, seconds in by_step.items():
            rows.append(dict(cache=cache, step=name, seconds=round(seconds, 3), gb_per_s=round(size / seconds / 1e9, 3),
                             ratio_to_load=round(seconds / load, 3)))
    print(f"{parameters / 1e9:.2f}B parameters, fp32, {size / 1e9:.2f} GB in {root} (saved in {save_s:.1f} s); "
          f"median of {args.repeats}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
    print(f"{'cache':<6} {'step':<26} {'seconds':>8} {'GB/s':>6} {'/ load':>7}")
    for row in rows:
        print(f"{row['cache']:<6} {row['step']:<26} {row['seconds']:>8.2f} {row['gb_per_s']:>6.2f} "
              f"{row['ratio_to_load']:>7.2f}")
    disk = subprocess.run(["df", "--output=source,fstype", str(root.parent)], capture_output=True, text=True).stdout
    path = write_report("bench_checkpoint_verify", dict(
        parameters=parameters, bytes=size, save_seconds=round(save_s, 1), repeats=args.repeats, rows=rows,
        raw_seconds=times, cpus=os.cpu_count(), load_average=os.getloadavg(), filesystem=disk.split("\n")[1:2],
        shape=dict(hidden=args.hidden, layers=args.layers, ffn=args.ffn, vocab=args.vocab)), args.out)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
