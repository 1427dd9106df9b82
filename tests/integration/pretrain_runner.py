"""Run pretrain_moh.main() inside launcher workers and read the per-iteration losses it logs."""

from __future__ import annotations

import contextlib
import io
import os
import re

# Small enough for 4 CPU ranks in seconds; mock data and NullTokenizer keep it deterministic.
SMALL_MODEL = [
    "--num-layers", "4", "--hidden-size", "64", "--ffn-hidden-size", "128",
    "--num-attention-heads", "8", "--num-query-groups", "4",
    "--seq-length", "64", "--max-position-embeddings", "64",
    "--micro-batch-size", "4", "--global-batch-size", "8",
    "--mock-data", "--tokenizer-type", "NullTokenizer", "--vocab-size", "500",
    "--lr", "3e-3", "--min-lr", "3e-4", "--lr-warmup-iters", "2", "--seed", "1234",
    "--log-interval", "1", "--eval-iters", "0", "--eval-interval", "1000",
    "--moh-load-balance-coeff", "0.1",
]

LOSS = re.compile(r"iteration\s+(\d+)/\s*\d+ .*?lm loss: ([0-9.E+-]+)")


def pretrain_worker(rank: int, world: int, argv: list[str]) -> str:
    """Launcher target: one rank of `pretrain_moh.py argv`; returns what it printed."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    import pretrain_moh

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        pretrain_moh.main(argv)
    return out.getvalue()


def losses(outputs: list[str]) -> dict[int, float]:
    """Iteration -> lm loss, from whichever rank logged them (megatron logs on the last rank)."""
    found: dict[int, float] = {}
    for text in outputs:
        for it, value in LOSS.findall(text):
            found[int(it)] = float(value)
    return found


def exit_message_worker(rank: int, world: int, argv: list[str]) -> str:
    """Launcher target: run `pretrain_moh.py argv` expecting it to refuse; return its message."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    import pretrain_moh

    try:
        with contextlib.redirect_stdout(io.StringIO()):
            pretrain_moh.main(argv)
    except SystemExit as exit_:
        return str(exit_.code)
    return "pretrain_moh.py did not refuse"
