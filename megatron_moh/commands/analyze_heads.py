"""Which heads a trained MoH model routes to, on which data: heat-maps, entropy, overlap, and a JSON.

    megatron-moh-analyze-heads --load runs/moh/checkpoints --data prose=data/docs_text_document \\
        code=snippets.txt --tokens 65536 --out runs/moh/heads

(or ``python tools/analyze_heads.py ...``). The checkpoint may be saved at any TP/PP; it is loaded
whole into one process (CPU, or the GPU when there is one) and run in evaluation mode over
``--tokens`` tokens of each named dataset: ``NAME=PREFIX`` (an indexed dataset) or
``NAME=FILE.txt|.jsonl`` (tokenized with the checkpoint's tokenizer). Writes to ``--out``:
``head_load_NAME.png`` (layers x routed heads: fraction of tokens routed to each head, the paper's
head-load figure), ``mean_gate_NAME.png``, ``head_load_NAME_minus_FIRST.png`` (difference to the first
dataset), ``entropy.png``, ``overlap.png``, ``heads.json`` (every number) and ``table.txt``, the table it prints.
The statistics are defined in `megatron_moh.analysis.heads`. Bad input stops with one line before
the model is loaded.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

PROG = "analyze_heads.py"


def build_parser() -> argparse.ArgumentParser:
    """The command line."""
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    parser.add_argument("--load", required=True, help="checkpoint directory (what the run's --save named)")
    parser.add_argument("--data", nargs="+", required=True, metavar="NAME=SOURCE",
                        help="named datasets: NAME=PREFIX (indexed .bin/.idx) or NAME=FILE.txt|.jsonl")
    parser.add_argument("--tokens", type=int, default=65536, help="tokens per dataset (default 65536)")
    parser.add_argument("--out", required=True, help="directory for the PNGs and heads.json")
    parser.add_argument("--tokenizer-model", default=None,
                        help="tokenizer for text sources (sentencepiece .model or Hugging Face tokenizer directory); "
                             "default: the checkpoint's (must match it)")
    parser.add_argument("--seq-length", type=int, default=None, help="tokens per sequence (default: the run's)")
    parser.add_argument("--micro-batch-size", type=int, default=8, help="sequences per forward pass (default 8)")
    parser.add_argument("--seed", type=int, default=0, help="order in which documents are drawn (default 0)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def _routing_layout(saved: argparse.Namespace, load: str) -> dict:
    """The checkpoint's MoH layout (`MoHLayout`) for the report; refuses a model without routed heads."""
    from dataclasses import asdict

    from megatron_moh.checkpoint import CheckpointError
    from megatron_moh.layout import MoHLayout

    if getattr(saved, "moh_dense_baseline", False) or not hasattr(saved, "moh_topk"):
        raise CheckpointError(f"{load} holds a dense model (--moh-dense-baseline or no MoH arguments): "
                              f"it has no head router to analyse")
    heads = saved.num_attention_heads
    layout = MoHLayout.of(saved).resolved(heads)
    routed = heads - layout.num_shared_heads
    if routed == 0 or not layout.topk:
        raise CheckpointError(f"{load} routes no heads ({layout.num_shared_heads} of {heads} heads shared, "
                              f"top-{layout.topk}): nothing to analyse")
    return dict(num_layers=saved.num_layers, num_attention_heads=heads, num_routed_heads=routed, **asdict(layout))


def _check_options(opts: argparse.Namespace, saved: argparse.Namespace) -> int:
    """The sequence length to use; one-line refusals for impossible numbers."""
    from megatron_moh.data.validation import DataError

    if opts.tokens < 1 or opts.micro_batch_size < 1:
        raise DataError(f"--tokens {opts.tokens} and --micro-batch-size {opts.micro_batch_size} must be at least 1")
    seq_length = opts.seq_length or saved.seq_length
    if not 1 <= seq_length <= saved.max_position_embeddings:
        raise DataError(f"--seq-length {seq_length} must be between 1 and the model's max_position_embeddings "
                        f"({saved.max_position_embeddings})")
    return seq_length


def write_figures(report: dict, out: Path) -> list[Path]:
    """The PNGs of a report (`megatron_moh.analysis.heads.build_report`) into ``out``."""
    from megatron_moh.analysis import plots

    model, datasets = report["model"], report["datasets"]
    routed, topk, first_head = model["num_routed_heads"], model["topk"], model["num_shared_heads"]
    written = []
    gates = [g for data in datasets.values() for row in data["mean_gate"] for g in row if g is not None]
    for name, data in datasets.items():
        path = out / f"head_load_{name}.png"
        plots.save_heatmap(path, data["head_load"], f"{name}: fraction of tokens routed to each head "
                           f"({data['tokens']:,} tokens; uniform {topk / routed:.2f})", "fraction of tokens",
                           first_head=first_head, vmin=0.0, vmax=1.0)
        written.append(path)
        path = out / f"mean_gate_{name}.png"
        plots.save_heatmap(path, data["mean_gate"], f"{name}: mean gate of each head where chosen", "gate",
                           first_head=first_head, vmin=0.0, vmax=max(gates, default=1.0))
        written.append(path)
    for pair, difference in report["head_load_difference"].items():
        name, first = pair.split(" - ")
        limit = max(0.05, *(abs(v) for row in difference for v in row))
        path = out / f"head_load_{name}_minus_{first}.png"
        plots.save_heatmap(path, difference, f"head load: {name} minus {first}", "difference in fraction of tokens",
                           first_head=first_head, vmin=-limit, vmax=limit, cmap="RdBu_r")
        written.append(path)
    plots.save_layer_lines(out / "entropy.png", {n: d["entropy_mean"] for n, d in datasets.items()},
                           "routing entropy per token (mean over tokens)", "entropy (nats)",
                           reference=(math.log(routed), f"uniform routing (ln {routed})"))
    plots.save_layer_lines(out / "overlap.png", {n: d["adjacent_overlap"] for n, d in datasets.items()},
                           "heads shared by adjacent tokens", f"|chosen(t) & chosen(t+1)| / {topk}",
                           reference=(topk / routed, f"independent uniform routing ({topk}/{routed})"))
    return [*written, out / "entropy.png", out / "overlap.png"]


def main(argv: list[str] | None = None) -> None:
    """Check everything, load the model, analyse, write; bad input exits with one line first."""
    opts = build_parser().parse_args(argv)

    from megatron_moh import patches, platform

    platform.single_process_defaults()
    device = platform.setup()
    patches.install_all()

    from megatron_moh import tokenizer as tok
    from megatron_moh.analysis import plots
    from megatron_moh.analysis.heads import analyze, build_report, format_table
    from megatron_moh.analysis.sources import checkpoint_tokenizer, draw_tokens, parse_sources
    from megatron_moh.checkpoint import CheckpointError, find_checkpoint, read_checkpoint_args
    from megatron_moh.conversion.whole_model import load_model, single_process_group
    from megatron_moh.data.validation import DataError
    from megatron_moh.outputs import unwritable_reason

    try:
        if (missing := plots.matplotlib_missing()) is not None:
            raise DataError(missing)
        sources = parse_sources(opts.data)
        iteration, path = find_checkpoint(opts.load)
        saved = read_checkpoint_args(opts.load)
        layout = _routing_layout(saved, opts.load)
        seq_length = _check_options(opts, saved)
        tokenizer = checkpoint_tokenizer(saved, opts.tokenizer_model, needed=any(s.is_text for s in sources))
        samples = [draw_tokens(s, opts.tokens, tokenizer=tokenizer, vocab_size=saved.padded_vocab_size,
                               seed=opts.seed) for s in sources]
        out = Path(opts.out)
        if (reason := unwritable_reason(out)) is not None:
            raise DataError(f"--out {out}: {reason}: choose a directory you can write to")
        with single_process_group():
            model, _ = load_model(opts.load)
            stats = analyze(model.to(device), samples, seq_length, opts.micro_batch_size, device,
                            progress=not opts.no_progress)
        out.mkdir(parents=True, exist_ok=True)
    except (CheckpointError, DataError, tok.TokenizerError, OSError) as err:
        raise SystemExit(f"{PROG}: error: {err}") from None
    checkpoint = dict(path=str(path), iteration=iteration, seq_length=seq_length, seed=opts.seed)
    report = build_report(checkpoint, layout, samples, stats)
    (out / "heads.json").write_text(json.dumps(report, indent=1))
    written = write_figures(report, out)
    table = format_table(report)
    (out / "table.txt").write_text(table + "\n")
    print(table)
    print(f"{PROG}: wrote heads.json, table.txt and {len(written)} figures to {out}")
