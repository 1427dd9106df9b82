"""Generation with the exported MoH-Llama classes against a plain LlamaForCausalLM of the same shape:
prefill time and decoding tokens/s, ``moh_attention_impl`` dense, sparse and auto. Prints a table,
writes JSON.

One process. Every group of settings (context, key/value heads, batch, threads) builds one Llama
and one MoH model per active fraction with random weights (the learned router at its initial
scale picks heads about uniformly); the implementations are the same MoH model with its config's
``moh_attention_impl`` switched, and take turns with the Llama in every timing round
(``benchmarks/common.interleaved_medians``). Ratios are against the Llama measured in the same
rounds: prefill time / Llama's, decoding tokens/s / Llama's.

* prefill: one forward pass over the prompt into a fresh ``DynamicCache`` (what ``generate``
  uses), logits of the last position only, as in ``generate``.
* decode: ``--new-tokens`` greedy steps on a cache of ``context`` tokens, then the cache is cropped
  back, so every round decodes at the same length. ``dynamic`` is ``generate``'s default cache
  (it concatenates every step); ``static`` the preallocated cache of compiled generation (eager
  here). Decoding caches hold random keys and values (attention costs the same whatever they hold),
  so decoding at batch 8 and 8k context needs no prefill.

On one thread the table's ratios use process CPU time (steadier on a shared machine: waiting for a
core does not add to it); with several threads wall-clock time (CPU time would count spinning
threads). Both are in the JSON, with the load average before and after each group.

    .venv/bin/python benchmarks/bench_generate.py              # the grid in benchmarks/README.md
    .venv/bin/python benchmarks/bench_generate.py --quick      # 1k and 4k, MHA, batch 1, 1 thread
    .venv/bin/python benchmarks/bench_generate.py --contexts 4096 --kv-heads 16 --batches 1 \\
        --threads 1 --phases decode --caches static             # one cell
    .venv/bin/python benchmarks/bench_generate.py --table benchmarks/results/bench_generate_cpu.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform as host
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import interleaved_medians, write_report  # noqa: E402
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM, StaticCache  # noqa: E402

from megatron_moh.hf import MoHLlamaConfig, MoHLlamaForCausalLM  # noqa: E402
from megatron_moh.hf.configuration_moh import skipped_attention  # noqa: E402

IMPLS = ("dense", "sparse", "auto")
# Active fraction (%) -> (shared heads, routed heads each token keeps), for --heads 16:
# 75% is the default layout (half shared, a quarter routed-active); 50% the 4 + 4 of 12 of
# bench_sparse.py.
LAYOUTS = {75: lambda heads: (heads // 2, heads // 4), 50: lambda heads: (heads // 4, heads // 4)}


def model_config(args, kv_heads: int, layout: tuple[int, int] | None, dtype: torch.dtype) -> LlamaConfig:
    """The benchmark's Llama shape; with a layout, the MoH-Llama config of the same shape."""
    fields = dict(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.ffn,
                  num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=kv_heads,
                  max_position_embeddings=max(args.contexts) + args.new_tokens, attn_implementation="sdpa",
                  dtype=dtype)
    if layout is None:
        return LlamaConfig(**fields)
    shared, topk = layout
    return MoHLlamaConfig(**fields, moh_num_shared_heads=shared, moh_topk=topk)


def prefill_step(model, impl: str | None, ids: torch.Tensor):
    """One prefill of ``ids`` into a fresh dynamic cache."""
    def run():
        if impl is not None:
            model.config.moh_attention_impl = impl
        with torch.no_grad():
            model(ids, cache=DynamicCache(config=model.config), logits_to_keep=1)
    return run


def filled_cache(model, kind: str, batch: int, context: int, new_tokens: int, seed: int):
    """A ``kind`` cache of ``context`` positions of random keys and values."""
    config = model.config
    cache = (DynamicCache(config=config) if kind == "dynamic"
             else StaticCache(config=config, max_cache_len=context + new_tokens))
    gen = torch.Generator().manual_seed(seed)
    shape = (batch, config.num_key_value_heads, context, config.hidden_size // config.num_attention_heads)
    device, dtype = model.device, model.dtype
    for layer in range(config.num_hidden_layers):
        keys, values = (torch.randn(shape, generator=gen).to(device, dtype) for _ in range(2))
        cache.update(keys, values, layer)
    return cache


def decode_step(model, impl: str | None, cache, first: torch.Tensor, new_tokens: int):
    """``new_tokens`` greedy steps from ``first`` ``[B, 1]``, then the cache cropped back."""
    def run():
        if impl is not None:
            model.config.moh_attention_impl = impl
        token = first
        with torch.no_grad():
            for _ in range(new_tokens):
                token = model(token, cache=cache).logits[:, -1:].argmax(-1)
        cache.crop(-new_tokens)
    return run


def ceiling(shape: dict, layout: tuple[int, int], kv_heads: int, context: int, batch: int, phase: str) -> float:
    """The best ratio against the Llama that skipping attention work can reach on this shape: prefill
    time (a floor) or decoding tokens/s (a ceiling), if everything but the skipped work costs what it
    costs the Llama and the router nothing. It uses the share of attention work the sparse path skips
    (``skipped_attention``, which ``auto`` uses too) and counts multiply-adds per token: the weights
    (one per parameter), the attention core (2 x keys x hidden; a prompt's tokens see half of it on
    average). A decoding step is bound by arithmetic or by memory (weights read once per step, keys and
    values once per sequence); the ceiling is the larger of the two."""
    hidden, heads, layers = shape["hidden"], shape["heads"], shape["layers"]
    shared, topk = layout
    skipped = skipped_attention(phase, heads, kv_heads, shared, topk / (heads - shared))
    kv_width = kv_heads * hidden // heads
    weights = layers * (2 * hidden * hidden + 2 * hidden * kv_width + 3 * hidden * shape["ffn"])
    if phase == "prefill":
        attention = layers * 2 * (context / 2) * hidden
        return (weights + attention * (1 - skipped)) / (weights + attention)
    weights += shape["vocab"] * hidden  # the output layer, every step
    attention = layers * 2 * context * hidden
    cache = batch * layers * 2 * context * kv_width  # elements read per step
    return max((weights + attention) / (weights + attention * (1 - skipped)),
               (weights + cache) / (weights + cache * (1 - skipped)))


def add_ceilings(report: dict) -> list[dict]:
    """The report's rows, each MoH row with its ``ceiling``."""
    layouts = {int(active): layout for active, layout in report["layouts"].items()}
    for row in report["rows"]:
        if row["setting"] != "llama":
            active = int(row["setting"][3:].split("_")[0])
            row["ceiling"] = ceiling(report["shape"], layouts[active], row["kv_heads"], row["context"],
                                     row["batch"], row["phase"])
    return report["rows"]


def settings(args) -> list[tuple[str, int | None, str | None]]:
    """(label, active %, impl) in timing order; the Llama first."""
    return [("llama", None, None)] + [(f"moh{active}_{impl}", active, impl)
                                      for active in args.active for impl in args.impls]


def bench_group(args, context: int, kv_heads: int, batch: int, threads: int, device, dtype) -> list[dict]:
    """Every setting's prefill and decoding times for one (context, kv heads, batch, threads)."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    models = {None: LlamaForCausalLM(model_config(args, kv_heads, None, dtype))}
    for active in args.active:
        models[active] = MoHLlamaForCausalLM(model_config(args, kv_heads, LAYOUTS[active](args.heads), dtype))
    for model in models.values():
        model.to(device).eval()
    table = settings(args)
    ids = torch.randint(1, args.vocab, (batch, context), device=device)
    first = ids[:, -1:]
    steps, names = [], []
    if "prefill" in args.phases and batch in args.prefill_batches:
        steps += [prefill_step(models[active], impl, ids) for _, active, impl in table]
        names += [(label, "prefill", None) for label, _, _ in table]
    for kind in args.caches if "decode" in args.phases else ():
        caches = {active: filled_cache(model, kind, batch, context, args.new_tokens, seed=1)
                  for active, model in models.items()}
        steps += [decode_step(models[active], impl, caches[active], first, args.new_tokens)
                  for _, active, impl in table]
        names += [(label, "decode", kind) for label, _, _ in table]
    if not steps:
        return []
    load_start = os.getloadavg()
    wall, cpu = interleaved_medians(steps, repeats=args.repeats, warmup=1)
    load_end = os.getloadavg()
    rows = []
    measure = cpu if threads == 1 else wall
    for (label, phase, kind), w, c, m in zip(names, wall, cpu, measure):
        base = names.index(("llama", phase, kind))
        row = dict(context=context, kv_heads=kv_heads, batch=batch, threads=threads, phase=phase, cache=kind,
                   setting=label, wall_s=w, cpu_s=c, load_start=load_start, load_end=load_end,
                   measure="cpu" if threads == 1 else "wall")
        if phase == "prefill":
            row["ratio"] = m / measure[base]  # time / Llama's time
        else:
            row["tokens_per_s"] = batch * args.new_tokens / w
            row["ratio"] = measure[base] / m  # tokens/s / Llama's tokens/s
        rows.append(row)
    return rows


def print_group(rows: list[dict]) -> None:
    head = rows[0]
    print(f"# context {head['context']}, kv heads {head['kv_heads']}, batch {head['batch']}, "
          f"{head['threads']} thread(s), ratios by {head['measure']} time, load "
          f"{head['load_start'][0]:.1f} -> {head['load_end'][0]:.1f}", flush=True)
    for row in rows:
        what = "prefill s" if row["phase"] == "prefill" else f"decode ({row['cache']}) tok/s"
        value = row["wall_s"] if row["phase"] == "prefill" else row["tokens_per_s"]
        print(f"  {row['setting']:<14} {what:<22} {value:10.3f}  vs llama {row['ratio']:.3f}", flush=True)


def markdown_table(rows: list[dict]) -> str:
    """One line per (threads, context, kv heads, batch, phase, cache), one column per MoH setting:
    the ratio against the Llama (prefill: time, lower is better; decode: tokens/s, higher is better),
    and per active fraction the arithmetic's best (``ceiling``)."""
    settings = list(dict.fromkeys(row["setting"] for row in rows if row["setting"] != "llama"))
    actives = list(dict.fromkeys(setting.split("_")[0] for setting in settings))
    lines = ["| threads | context | KV heads | batch | measure | " + " | ".join(settings) + " | "
             + " | ".join(f"{active} best possible" for active in actives) + " | load |",
             "|---:|---:|---:|---:|---|" + "---:|" * (len(settings) + len(actives)) + "---|"]
    cells: dict[tuple, dict[str, dict]] = {}
    for row in rows:
        key = (row["threads"], row["context"], row["kv_heads"], row["batch"], row["phase"], row["cache"])
        cells.setdefault(key, {})[row["setting"]] = row
    for (threads, context, kv_heads, batch, phase, cache), by_setting in cells.items():
        measure = "prefill time" if phase == "prefill" else f"decode tok/s, {cache} cache"
        load = by_setting["llama"]["load_start"][0], by_setting["llama"]["load_end"][0]
        ratios = " | ".join(f"{by_setting[s]['ratio']:.2f}" if s in by_setting else "-" for s in settings)
        best = " | ".join(next((f"{row['ceiling']:.2f}" for name, row in by_setting.items()
                                if name.startswith(active + "_") and "ceiling" in row), "-") for active in actives)
        lines.append(f"| {threads} | {context} | {kv_heads} | {batch} | {measure} | {ratios} | {best} | "
                     f"{load[0]:.0f}-{load[1]:.0f} |")
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true",
                   help="1k and 4k context, MHA, batch 1, 1 thread, dynamic and static caches")
    p.add_argument("--contexts", type=int, nargs="+", default=[1024, 4096, 8192])
    p.add_argument("--active", type=int, nargs="+", choices=sorted(LAYOUTS), default=[75, 50],
                   help="active heads (%%): 75 = half shared + a quarter routed, 50 = a quarter + a quarter")
    p.add_argument("--kv-heads", type=int, nargs="+", default=[16, 8], help="16: MHA; 8: GQA as Llama-3")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--prefill-batches", type=int, nargs="+", default=[1],
                   help="batches whose prefill is timed too (prefill at batch 8 and 8k is minutes per run)")
    p.add_argument("--threads", type=int, nargs="+", default=None,
                   help="torch CPU threads (default: 1 and every CPU this process may use)")
    p.add_argument("--phases", nargs="+", choices=("prefill", "decode"), default=["prefill", "decode"])
    p.add_argument("--caches", nargs="+", choices=("dynamic", "static"), default=["dynamic", "static"])
    p.add_argument("--impls", nargs="+", choices=IMPLS, default=list(IMPLS))
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--ffn", type=int, default=2816)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", type=Path, default=None, help="JSON path (default benchmarks/results/)")
    p.add_argument("--table", type=Path, nargs="+", metavar="JSON",
                   help="print the markdown table of earlier runs' JSON files and exit")
    args = p.parse_args(argv)
    if args.quick:
        args.contexts, args.kv_heads, args.batches, args.threads = [1024, 4096], [16], [1], [1]
    if args.threads is None:
        args.threads = sorted({1, len(os.sched_getaffinity(0))})
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.table:
        print(markdown_table([row for path in args.table for row in add_ceilings(json.loads(path.read_text()))]))
        return
    device = torch.device(args.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    warnings.filterwarnings("ignore", message=".*past_key_values.*")
    print(f"# torch {torch.__version__}, {device}, {args.dtype}, {args.layers} layers, hidden {args.hidden}, "
          f"ffn {args.ffn}, {args.heads} heads, vocab {args.vocab}, {args.new_tokens} new tokens, "
          f"median of {args.repeats}", flush=True)
    rows, start = [], time.monotonic()
    for threads, kv_heads, batch, context in itertools.product(args.threads, args.kv_heads, args.batches,
                                                               args.contexts):
        group = bench_group(args, context, kv_heads, batch, threads, device, dtype)
        if group:
            print_group(group)
            rows += group
    name = "bench_generate" + ("_quick" if args.quick else "")
    report = {
        "cpu": host.processor() or host.machine(), "dtype": args.dtype, "seconds": round(time.monotonic() - start),
        "shape": dict(layers=args.layers, hidden=args.hidden, ffn=args.ffn, heads=args.heads, vocab=args.vocab,
                      new_tokens=args.new_tokens, repeats=args.repeats),
        "layouts": {active: LAYOUTS[active](args.heads) for active in args.active}, "rows": rows,
    }
    add_ceilings(report)
    out = write_report(name, report, args.out)
    print(markdown_table(rows))
    print(f"# wrote {out} in {time.monotonic() - start:.0f} s", flush=True)


if __name__ == "__main__":
    main()
