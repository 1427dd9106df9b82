"""Compare training runs from their TensorBoard logs: one PNG and a table of final values.

    megatron-moh-compare-runs runs/dense runs/moh75 baseline=runs/old/tensorboard --out runs/compare

(or ``python tools/compare_runs.py ...``). Each RUN_DIR is a run's ``--tensorboard-dir`` or a
directory above exactly one, labelled by its name or as ``NAME=RUN_DIR``. Writes ``compare_runs.png``
(training and validation loss against tokens seen and against wall-clock time, the load-balance
loss, tokens/s), ``summary.json`` and ``summary.md`` to ``--out`` and prints the final values as a
Markdown table: tokens seen, losses, perplexity, tokens/s, TFLOP/s per GPU and, given
``--peak-tflops``, MFU. Reads megatron's own scalar names
(`megatron_moh.analysis.runs`).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

PROG = "compare_runs.py"


def build_parser() -> argparse.ArgumentParser:
    """The command line."""
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", metavar="[NAME=]RUN_DIR",
                        help="TensorBoard directories of the runs (or directories above them), optionally named")
    parser.add_argument("--out", required=True, help="directory for compare_runs.png, summary.json and summary.md")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="peak TFLOP/s of one GPU at the run's precision, for MFU (e.g. 989 for H100 bf16 dense)")
    return parser


def main(argv: list[str] | None = None) -> None:
    """Read every run first (bad input exits with one line), then draw and print."""
    opts = build_parser().parse_args(argv)

    from megatron_moh.analysis import plots
    from megatron_moh.analysis.runs import RunError, curves, format_summary, parse_runs, read_run, summarize

    try:
        if (missing := plots.matplotlib_missing()) is not None:
            raise RunError(missing)
        if opts.peak_tflops is not None and opts.peak_tflops <= 0:
            raise RunError(f"--peak-tflops {opts.peak_tflops} must be positive")
        runs = [read_run(path, name) for name, path in parse_runs(opts.runs)]
        out = Path(opts.out)
        out.mkdir(parents=True, exist_ok=True)
    except (RunError, OSError) as err:
        raise SystemExit(f"{PROG}: error: {err}") from None
    rows = [summarize(run, opts.peak_tflops) for run in runs]
    plots.save_runs(out / "compare_runs.png", [curves(run) for run in runs])
    (out / "summary.json").write_text(json.dumps(rows, indent=1))
    table = format_summary(rows)
    (out / "summary.md").write_text(table + "\n")
    print(table)
    print(f"{PROG}: wrote compare_runs.png, summary.json and summary.md to {out}")
