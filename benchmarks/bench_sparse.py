"""Head-sparse vs dense MoH attention core: time and peak memory, forward and forward+backward.

Dense baselines compute every head and then multiply by the gates (what the MoH layer does with
``moh_attention_impl='dense'``):
* ``sdpa``: torch ``scaled_dot_product_attention(is_causal=True, enable_gqa=...)`` (a flash
  kernel on CPU and GPU), the local spec's default core (``megatron_moh.core_attention``);
* ``baddbmm``: megatron's local DotProductAttention recipe in plain torch (baddbmm, causal
  masked_fill, softmax, bmm), which materialises the full score matrix.
Sparse paths: ``plain`` is ``megatron_moh.sparse_attention.head_sparse_attention`` (the CPU path);
``flex`` is ``megatron_moh.flex_sparse_attention.flex_head_sparse_attention`` through
``torch.compile(flex_attention)`` (the CUDA path; on CPU the compiled kernel has no backward, so
only its forward is timed there); ``auto`` is what ``--moh-attention-impl auto`` runs for the
shape (one of the others, by configuration_moh.SPARSE_CROSSOVERS), also reported against the
faster of ``plain`` and ``sdpa`` measured in the same rounds. Routing is uniform random top-k per
token (what the load-balance loss aims for); ``--shared`` heads are always on.

Timings are medians of ``--repeats`` runs after two warm-ups (the first compiles flex); the
implementations take turns in every round so that load from other processes hits all alike
(``benchmarks/common.interleaved_medians``).
Wall-clock ratios are the headline; the CPU-time ratio is kept too (steadier for 1-thread runs on
a shared machine). Peak memory: ``torch.cuda.max_memory_allocated`` on GPU; on CPU the peak of
torch.profiler's memory timeline (bytes of tensors alive during the step, inputs included),
measured once per configuration outside the timed runs. ``--threads`` defaults to every CPU this
process may use.

    python benchmarks/bench_sparse.py            # full grid, a few minutes on 2 CPU cores
    python benchmarks/bench_sparse.py --quick    # 1024 and 4096 tokens at 50% active, sdpa only
    python benchmarks/bench_sparse.py --seqs 4096 --topks 4 --head-dim 128 --dtype bf16  # GPU kit
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import socket
import sys
import tempfile
import warnings
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import interleaved_medians  # noqa: E402
from megatron_moh.flex_sparse_attention import flex_available, flex_head_sparse_attention  # noqa: E402
from megatron_moh.hf.configuration_moh import skipped_attention, sparse_pays  # noqa: E402
from megatron_moh.sparse_attention import head_sparse_attention  # noqa: E402

# Active fraction -> routed heads each token keeps, with 4 shared of 16 heads (4 + k of 12).
FULL_SEQS = (512, 1024, 2048, 4096)
QUICK_SEQS = (1024, 4096)


def dense_sdpa(query, key, value, gates):
    """All heads through torch's causal SDPA (GQA without copies), then the gates."""
    s, b, hp, d = query.shape
    q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
    heads = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                           enable_gqa=k.shape[1] != hp).permute(2, 0, 1, 3)
    return (heads * gates.unsqueeze(-1).to(heads.dtype)).reshape(s, b, hp * d)


def dense_baddbmm(query, key, value, gates):
    """All heads the way megatron's local DotProductAttention does it, then the gates."""
    s, b, hp, d = query.shape
    per_group = hp // key.shape[2]
    q = query.reshape(s, b * hp, d).transpose(0, 1)
    k = key.repeat_interleave(per_group, dim=2).reshape(s, b * hp, d).transpose(0, 1)
    v = value.repeat_interleave(per_group, dim=2).reshape(s, b * hp, d).transpose(0, 1)
    scores = torch.baddbmm(q.new_empty(b * hp, s, s), q, k.transpose(1, 2), beta=0.0,
                           alpha=1.0 / math.sqrt(d))
    future = torch.ones(s, s, dtype=torch.bool, device=q.device).triu(1)
    probs = torch.softmax(scores.masked_fill(future, float("-inf")), dim=-1)
    heads = torch.bmm(probs, v).transpose(0, 1).reshape(s, b, hp, d)
    return (heads * gates.unsqueeze(-1).to(heads.dtype)).reshape(s, b, hp * d)


def make_inputs(seq, args, topk, device, dtype, seed=0):
    """Query/key/value leaves and gates: shared heads on, ``topk`` uniform random routed heads."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    hp, g, d, b = args.heads, args.groups, args.head_dim, args.batch
    routed = hp - args.shared
    q = torch.randn(seq, b, hp, d, generator=gen)
    k = torch.randn(seq, b, g, d, generator=gen)
    v = torch.randn(seq, b, g, d, generator=gen)
    choice = torch.rand(seq, b, routed, generator=gen).topk(topk, dim=-1).indices
    mask = torch.zeros(seq, b, routed).scatter_(-1, choice, 1.0)
    gates = torch.cat([torch.ones(seq, b, args.shared), mask], dim=-1)
    leaves = [t.to(device=device, dtype=dtype).requires_grad_(True) for t in (q, k, v)]
    return leaves, gates.to(device)


def step(fn: Callable, inputs, gates, backward: bool) -> Callable[[], None]:
    """One forward (no autograd graph) or one forward+backward of ``fn``."""
    def run():
        if backward:
            for t in inputs:
                t.grad = None
            fn(*inputs, gates).float().sum().backward()
        else:
            with torch.no_grad():
                fn(*inputs, gates)
    return run


def peak_memory_mib(run: Callable[[], None], device) -> float | None:
    """Peak bytes of live tensors during one run, in MiB (see the module docstring)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        run()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) / 2**20
    from torch.profiler import ProfilerActivity, profile

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True,
                     with_stack=True) as prof:
            run()
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "timeline.json")
            try:
                prof.export_memory_timeline(path, device="cpu")
            except Exception:  # noqa: BLE001 - a semi-private API: report n/a rather than fail
                return None
            _, sizes = json.load(open(path))
    return max(sum(row) for row in sizes) / 2**20 if sizes else None


def auto_uses_sparse(seq, topk, args, device) -> bool:
    """Whether ``--moh-attention-impl auto`` runs the head-sparse core for this shape (the layer's
    rule: configuration_moh.sparse_pays)."""
    routed = args.heads - args.shared
    skipped = skipped_attention("train", args.heads, args.groups, args.shared, topk / routed)
    return sparse_pays(device.type, "train", seq, skipped, torch.get_num_threads())


def bench_config(seq, topk, args, device, dtype):
    """Median times (s) and peak memory (MiB) of every implementation, fwd and fwd+bwd."""
    inputs, gates = make_inputs(seq, args, topk, device, dtype)
    plain = lambda q, k, v, g: head_sparse_attention(q, k, v, g, args.shared)  # noqa: E731
    flex = lambda q, k, v, g: flex_head_sparse_attention(q, k, v, g, args.shared, topk)  # noqa: E731
    auto = dense_sdpa  # what the layer runs with auto: its sparse core (flex on CUDA) or dense
    if auto_uses_sparse(seq, topk, args, device):
        auto = flex if flex_available(device) else plain
    sparse = {"plain": plain, "flex": flex, "auto": auto}
    sparse = {name: fn for name, fn in sparse.items() if name in args.impls}
    dense = {"dense_sdpa": dense_sdpa}
    if args.baddbmm and seq <= args.baddbmm_max_seq:
        dense["dense_baddbmm"] = dense_baddbmm
    result = {}
    for mode, backward in (("fwd", False), ("fwd_bwd", True)):
        impls = {**sparse, **dense}
        if backward and device.type == "cpu":  # compiled flex has no CPU backward
            impls.pop("flex", None)
        runs = {name: step(fn, inputs, gates, backward) for name, fn in impls.items()}
        # two warm-ups (flex compiles in the first), then interleaved rounds
        wall, cpu = interleaved_medians(list(runs.values()), args.repeats, warmup=2)
        for name, wall_s, cpu_s in zip(runs, wall, cpu):
            result[f"{name}_{mode}_s"] = wall_s
            result[f"{name}_{mode}_cpu_s"] = cpu_s
        if backward and not args.no_memory:
            for name, run in runs.items():
                result[f"{name}_fwd_bwd_peak_mib"] = peak_memory_mib(run, device)
        for name in sparse:
            for base in dense:
                if f"{name}_{mode}_s" in result:
                    short = base.removeprefix("dense_")
                    result[f"ratio_{name}_{mode}_vs_{short}"] = (
                        result[f"{name}_{mode}_s"] / result[f"{base}_{mode}_s"])
                    result[f"ratio_{name}_{mode}_vs_{short}_cpu_time"] = (
                        result[f"{name}_{mode}_cpu_s"] / result[f"{base}_{mode}_cpu_s"])
        if "auto" in impls and "plain" in impls:  # auto against the faster of its two choices
            for unit in ("s", "cpu_s"):
                best = min(result[f"plain_{mode}_{unit}"], result[f"dense_sdpa_{mode}_{unit}"])
                suffix = "" if unit == "s" else "_cpu_time"
                result[f"ratio_auto_{mode}_vs_best{suffix}"] = result[f"auto_{mode}_{unit}"] / best
    result["auto_runs_sparse"] = auto is not dense_sdpa
    return result


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="1024 and 4096 tokens at 50%% active only")
    p.add_argument("--seqs", type=int, nargs="*", help="sequence lengths (default 512..4096)")
    p.add_argument("--topks", type=int, nargs="*",
                   help="routed heads per token (default 4 8 10: 50%%, 75%%, 87.5%% of 16 active)")
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--groups", type=int, default=16, help="key/value heads (GQA when < heads)")
    p.add_argument("--shared", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: the CPUs this process may run on)")
    p.add_argument("--no-baddbmm", dest="baddbmm", action="store_false",
                   help="skip the megatron-style baddbmm dense baseline (always off with --quick)")
    p.add_argument("--baddbmm-max-seq", type=int, default=2048,
                   help="run the baddbmm baseline only up to this length (it materialises "
                        "heads x seq^2 scores: 1 GiB in fp32 at 4096 tokens)")
    p.add_argument("--impls", nargs="+", choices=("plain", "flex", "auto"), default=("plain", "flex", "auto"),
                   help="sparse implementations to time (default all); auto is what --moh-attention-impl "
                        "auto runs for the shape, and is also compared with the faster of plain and sdpa")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory runs")
    p.add_argument("--out", type=Path, default=None, help="JSON path (default benchmarks/results/)")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.quick:
        args.baddbmm = False
    device = torch.device(args.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    threads = args.threads or len(os.sched_getaffinity(0))
    torch.set_num_threads(threads)
    if device.type == "cpu":  # no compile worker processes competing with the timed runs
        from torch._inductor import config as inductor_config

        inductor_config.compile_threads = 1
    seqs = args.seqs or (QUICK_SEQS if args.quick else FULL_SEQS)
    topks = args.topks or ((4,) if args.quick else (4, 8, 10))
    routed = args.heads - args.shared

    host = torch.cuda.get_device_name(device).replace(" ", "_") if device.type == "cuda" else "cpu"
    meta = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "host": socket.gethostname(), "device": host,
        "cpu": platform.processor() or platform.machine(),
        "torch": torch.__version__, "threads": threads, "dtype": args.dtype,
        "heads": args.heads, "groups": args.groups, "shared": args.shared,
        "head_dim": args.head_dim, "batch": args.batch, "repeats": args.repeats,
        "load_avg_start": os.getloadavg(),
    }
    print(f"# torch {torch.__version__}, device {host}, {threads} threads, {args.dtype}, "
          f"{args.heads} heads x {args.head_dim} ({args.groups} kv), {args.shared} shared, batch "
          f"{args.batch}, median of {args.repeats}, load avg {meta['load_avg_start'][0]:.1f}")
    cols = ["seq", "active", "floor"]
    for impl in args.impls:
        cols += [f"fwd {impl}/sdpa", f"f+b {impl}/sdpa"]
    if "auto" in args.impls:
        cols += ["f+b auto/best", "auto runs"]
    cols += ["f+b plain/bmm", "sdpa f+b s", *[f"{impl} f+b s" for impl in args.impls],
             "sdpa MiB", *[f"{impl} MiB" for impl in args.impls]]
    print(" | ".join(cols))
    rows = []
    fmt = lambda r, key, spec: "-" if r.get(key) is None else format(r[key], spec)
    for seq in seqs:
        for topk in topks:
            if not 0 < topk <= routed:
                raise SystemExit(f"--topks {topk}: need 1..{routed} routed heads")
            active = (args.shared + topk) / args.heads
            r = bench_config(seq, topk, args, device, dtype)
            r.update(seq=seq, topk=topk, active_fraction=active, flop_floor=active)
            rows.append(r)
            cells = [f"{seq}", f"{args.shared}+{topk}/{routed} ({active:.1%})", f"{active:.3f}"]
            for impl in args.impls:
                cells += [fmt(r, f"ratio_{impl}_fwd_vs_sdpa", ".3f"),
                          fmt(r, f"ratio_{impl}_fwd_bwd_vs_sdpa", ".3f")]
            if "auto" in args.impls:
                cells += [fmt(r, "ratio_auto_fwd_bwd_vs_best", ".3f"),
                          "sparse" if r["auto_runs_sparse"] else "dense"]
            cells += [fmt(r, "ratio_plain_fwd_bwd_vs_baddbmm", ".3f"),
                      fmt(r, "dense_sdpa_fwd_bwd_s", ".4f"),
                      *[fmt(r, f"{impl}_fwd_bwd_s", ".4f") for impl in args.impls],
                      fmt(r, "dense_sdpa_fwd_bwd_peak_mib", ".0f"),
                      *[fmt(r, f"{impl}_fwd_bwd_peak_mib", ".0f") for impl in args.impls]]
            print(" | ".join(cells), flush=True)
    meta["load_avg_end"] = os.getloadavg()
    out = args.out or Path(__file__).parent / "results" / f"bench_sparse_{host}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print(f"# wrote {out}; load avg at end {meta['load_avg_end'][0]:.1f}")


if __name__ == "__main__":
    main()
