"""Runs compared through megatron.training's own TensorBoard log (``--tensorboard-dir``).

Scalars read, by megatron's names: ``lm loss`` and ``lm loss vs samples`` (every logged iteration;
their pairing maps iterations to consumed samples), ``lm loss validation vs samples``,
``iteration-time`` and ``throughput`` (TFLOP/s/GPU; both need ``--log-timers-to-tensorboard``),
``batch-size``, and this project's ``moh_load_balance_loss``. Text summaries (megatron writes every
argument at start-up): ``seq_length``, ``world_size``. Tokens seen = consumed samples x sequence
length. Wall-clock time counts from the TensorBoard file's first event (megatron opens the writer at
start-up); a resumed run's downtime is in it. A step logged twice (a resumed run, the final
evaluation) keeps its last value.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy

LOSS, LOSS_BY_SAMPLES = "lm loss", "lm loss vs samples"
VALIDATION_BY_SAMPLES = "lm loss validation vs samples"
ITERATION_TIME, THROUGHPUT, BATCH_SIZE = "iteration-time", "throughput", "batch-size"
LOAD_BALANCE = "moh_load_balance_loss"  # megatron_moh.router.LOAD_BALANCE_LOSS, without importing megatron
FINAL_WINDOW = 10  # logged iterations averaged for the "final" training losses


class RunError(ValueError):
    """A run directory that cannot be compared; the message (one line) says why."""


@dataclass
class Scalar:
    """One scalar tag: steps ascending (one value per step, the last logged), values, wall times."""

    steps: numpy.ndarray
    values: numpy.ndarray
    wall: numpy.ndarray


@dataclass
class Run:
    """What a run's TensorBoard log holds."""

    name: str
    path: str
    start: float
    seq_length: int
    world_size: int
    scalars: dict[str, Scalar] = field(default_factory=dict)

    def tokens_at(self, iterations: numpy.ndarray) -> numpy.ndarray:
        """Tokens seen after each of ``iterations``."""
        loss, by_samples = self.scalars[LOSS], self.scalars[LOSS_BY_SAMPLES]
        return numpy.interp(iterations, loss.steps, by_samples.steps) * self.seq_length


def event_dir(path: str | os.PathLike) -> Path:
    """The one directory under ``path`` (itself included) that holds TensorBoard event files."""
    path = Path(path)
    if not path.is_dir():
        raise RunError(f"{path} is not a directory: pass a run's --tensorboard-dir (or a directory above it)")
    found = sorted({p.parent for p in path.rglob("events.out.tfevents.*")})
    if not found:
        raise RunError(f"{path} holds no TensorBoard event files: pass a run's --tensorboard-dir "
                       f"(megatron writes them when training runs with --tensorboard-dir)")
    if len(found) > 1:
        raise RunError(f"{path} holds the logs of {len(found)} runs ({', '.join(str(p) for p in found[:3])}); "
                       f"pass each of them")
    return found[0]


def read_run(path: str | os.PathLike, name: str) -> Run:
    """The scalars of the run logged under ``path``; `RunError` if it is not a megatron training log."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    directory = event_dir(path)
    events = EventAccumulator(str(directory), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    tags = events.Tags()
    if LOSS not in tags["scalars"] or LOSS_BY_SAMPLES not in tags["scalars"]:
        raise RunError(f"{directory} logged no {LOSS!r}: not a megatron training run, or it stopped before its "
                       f"first logged iteration")

    def text(arg: str) -> str:
        tag = f"{arg}/text_summary"
        if tag not in tags["tensors"]:
            raise RunError(f"{directory} has no {arg!r} argument: megatron writes its arguments to TensorBoard at "
                           f"start-up, so this log is not from megatron.training")
        return events.Tensors(tag)[-1].tensor_proto.string_val[0].decode()

    scalars = {tag: _scalar(events.Scalars(tag)) for tag in tags["scalars"]}
    if len(scalars[LOSS].steps) != len(scalars[LOSS_BY_SAMPLES].steps):
        raise RunError(f"{directory}: {LOSS!r} and {LOSS_BY_SAMPLES!r} were logged at different steps, so tokens "
                       f"seen cannot be told")
    return Run(name=name, path=str(path), start=events.FirstEventTimestamp(), seq_length=int(text("seq_length")),
               world_size=int(text("world_size")), scalars=scalars)


def _scalar(events) -> Scalar:
    last = {}
    for event in events:  # in file order: a later value for the same step wins
        last[event.step] = event
    steps = sorted(last)
    return Scalar(numpy.array(steps, dtype=numpy.float64), numpy.array([last[s].value for s in steps]),
                  numpy.array([last[s].wall_time for s in steps]))


def parse_runs(specs: list[str]) -> list[tuple[str, str]]:
    """``RUN_DIR`` or ``NAME=RUN_DIR`` -> (label, directory). An unnamed run is labelled by its
    directory's name, or by its path where two names would collide."""
    runs = []
    for spec in specs:
        name, named, path = spec.partition("=")
        if not named or Path(spec).exists():  # a directory whose name holds '='
            name, path = "", spec
        runs.append((name, path))
    default = [Path(path).resolve().name for _, path in runs]
    labels = [name or (path if default.count(d) > 1 else d) for (name, path), d in zip(runs, default)]
    if len(set(labels)) != len(labels):
        raise RunError(f"two runs are labelled {next(n for n in labels if labels.count(n) > 1)!r}; "
                       f"name them NAME=RUN_DIR")
    return [(label, path) for label, (_, path) in zip(labels, runs)]


@dataclass
class Curves:
    """The x/y series of one run that `megatron_moh.analysis.plots.save_runs` draws."""

    name: str
    train_tokens: numpy.ndarray
    train_seconds: numpy.ndarray
    train_loss: numpy.ndarray
    val_tokens: numpy.ndarray
    val_seconds: numpy.ndarray
    val_loss: numpy.ndarray
    load_balance_tokens: numpy.ndarray
    load_balance: numpy.ndarray
    rate_tokens: numpy.ndarray
    tokens_per_second: numpy.ndarray
    rate_source: str


def curves(run: Run) -> Curves:
    """Losses against tokens seen and wall-clock seconds, load-balance loss and tokens/s against tokens."""
    loss = run.scalars[LOSS]
    empty = numpy.zeros(0)
    val = run.scalars.get(VALIDATION_BY_SAMPLES, Scalar(empty, empty, empty))
    balance = run.scalars.get(LOAD_BALANCE, Scalar(empty, empty, empty))
    rate_tokens, rate, source = _tokens_per_second(run)
    return Curves(
        name=run.name,
        train_tokens=run.tokens_at(loss.steps), train_seconds=loss.wall - run.start, train_loss=loss.values,
        val_tokens=val.steps * run.seq_length, val_seconds=val.wall - run.start, val_loss=val.values,
        load_balance_tokens=run.tokens_at(balance.steps), load_balance=balance.values,
        rate_tokens=rate_tokens, tokens_per_second=rate, rate_source=source,
    )


def _tokens_per_second(run: Run) -> tuple[numpy.ndarray, numpy.ndarray, str]:
    """Tokens/s of the whole job per logged interval: megatron's own iteration time where it was
    logged (training only), else the wall-clock time between logged iterations (evaluation and
    checkpointing included)."""
    timing = run.scalars.get(ITERATION_TIME)
    if timing is not None and len(timing.steps):
        batch = run.scalars[BATCH_SIZE]
        per_iteration = numpy.interp(timing.steps, batch.steps, batch.values) * run.seq_length
        return run.tokens_at(timing.steps), per_iteration / timing.values, "iteration-time"
    loss = run.scalars[LOSS]
    tokens = run.tokens_at(loss.steps)
    seconds = numpy.diff(loss.wall)
    keep = seconds > 0
    return tokens[1:][keep], numpy.diff(tokens)[keep] / seconds[keep], "wall clock"


def summarize(run: Run, peak_tflops: float | None = None) -> dict[str, float | int | str | None]:
    """The final values of a run: tokens seen, training loss (mean of the last `FINAL_WINDOW` logged
    iterations), the last validation loss and its perplexity, the load-balance loss (same window),
    median tokens/s, median TFLOP/s per GPU, MFU (needs the hardware's peak TFLOP/s) and wall-clock."""
    c = curves(run)
    tflops = run.scalars.get(THROUGHPUT)
    median_tflops = float(numpy.median(tflops.values)) if tflops is not None and len(tflops.values) else None
    val_loss = float(c.val_loss[-1]) if len(c.val_loss) else None
    return dict(
        run=run.name,
        iterations=int(run.scalars[LOSS].steps[-1]),
        tokens=int(c.train_tokens[-1]),
        train_loss=float(c.train_loss[-FINAL_WINDOW:].mean()),
        val_loss=val_loss,
        val_ppl=math.exp(val_loss) if val_loss is not None else None,
        load_balance_loss=float(c.load_balance[-FINAL_WINDOW:].mean()) if len(c.load_balance) else None,
        tokens_per_s=float(numpy.median(c.tokens_per_second)) if len(c.tokens_per_second) else None,
        tokens_per_s_from=c.rate_source,
        tflops_per_gpu=median_tflops,
        mfu=median_tflops / peak_tflops if median_tflops is not None and peak_tflops else None,
        wall_s=float(max(s.wall[-1] for s in run.scalars.values() if len(s.wall)) - run.start),
        world_size=run.world_size,
    )


COLUMNS = [("run", "run", "{}"), ("tokens", "tokens", "{:,}"),
           ("train_loss", f"train loss (last {FINAL_WINDOW})", "{:.4f}"), ("val_loss", "val loss", "{:.4f}"),
           ("val_ppl", "val ppl", "{:.1f}"), ("load_balance_loss", "load-balance loss", "{:.4f}"),
           ("tokens_per_s", "tokens/s", "{:,.0f}"), ("tflops_per_gpu", "TFLOP/s/GPU", "{:.3g}"),
           ("mfu", "MFU", "{:.1%}"), ("wall_s", "wall-clock s", "{:,.0f}")]


def format_summary(rows: list[dict]) -> str:
    """The summaries as a Markdown table (readable in a terminal, pasteable into a README); '-' where
    a run did not log the value."""
    header = "| " + " | ".join(title for _, title, _ in COLUMNS) + " |"
    lines = [header, "|" + "---|" * len(COLUMNS)]
    for row in rows:
        cells = ["-" if row[key] is None else fmt.format(row[key]) for key, _, fmt in COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
