"""The PNG figures of the analysis tools. matplotlib (the ``analysis`` extra) is imported here
only, and drawn through `matplotlib.figure.Figure` without pyplot: no GUI backend, no global
figure state. Every figure has a fixed size in pixels (`pixels`), whatever the model or run."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import numpy

from megatron_moh.analysis.runs import Curves

DPI = 100
HEATMAP_INCHES = (6.4, 4.8)
LINES_INCHES = (6.4, 4.0)
RUNS_INCHES = (12.0, 8.0)
_ANNOTATE_MAX_CELLS = 400  # beyond this the numbers do not fit their cells


def matplotlib_missing() -> str | None:
    """Why no figure can be drawn (matplotlib is not installed), or None: a tool asks before any work."""
    import importlib.util

    if importlib.util.find_spec("matplotlib") is None:
        return "matplotlib is not installed: pip install 'megatron-moh[analysis]' (or pip install matplotlib)"
    return None


def pixels(inches: tuple[float, float]) -> tuple[int, int]:
    """Width and height in pixels of a figure of ``inches``."""
    return round(inches[0] * DPI), round(inches[1] * DPI)


def _figure(inches: tuple[float, float]):
    from matplotlib.figure import Figure

    return Figure(figsize=inches, dpi=DPI, layout="constrained")


def _save(figure, path: str | os.PathLike) -> None:
    figure.savefig(path, dpi=DPI, metadata={"Software": None})


def save_heatmap(path: str | os.PathLike, values: Sequence[Sequence[float | None]], title: str, label: str, *,
                 first_head: int, vmin: float, vmax: float, cmap: str = "viridis") -> None:
    """A layers x routed heads heat-map with a colour bar; cells hold their values when they fit.
    ``None`` (e.g. the gate of a head no token chose) is drawn blank. ``first_head``: the index
    of the first routed head among all heads, for the axis labels."""
    data = numpy.array([[numpy.nan if v is None else v for v in row] for row in values], dtype=float)
    figure = _figure(HEATMAP_INCHES)
    axes = figure.add_subplot()
    image = axes.imshow(data, cmap=cmap, vmin=vmin, vmax=vmax, aspect="auto", interpolation="nearest")
    figure.colorbar(image, ax=axes, label=label)
    layers, heads = data.shape
    axes.set_xticks(range(heads), [str(first_head + h) for h in range(heads)])
    axes.set_yticks(range(layers), [str(layer) for layer in range(layers)])
    axes.set_xlabel("routed head (index among all heads)")
    axes.set_ylabel("layer")
    axes.set_title(title, fontsize=10)
    if data.size <= _ANNOTATE_MAX_CELLS:
        for (layer, head), value in numpy.ndenumerate(data):
            if not math.isnan(value):
                red, green, blue, _ = image.cmap(image.norm(value))
                dark = 0.299 * red + 0.587 * green + 0.114 * blue < 0.5  # perceived brightness
                axes.text(head, layer, f"{value:.2f}", ha="center", va="center", fontsize=7,
                          color="white" if dark else "black")
    _save(figure, path)


def save_layer_lines(path: str | os.PathLike, series: dict[str, Sequence[float]], title: str, ylabel: str, *,
                     reference: tuple[float, str] | None = None) -> None:
    """One line per dataset of a per-layer quantity, with an optional horizontal reference line."""
    figure = _figure(LINES_INCHES)
    axes = figure.add_subplot()
    for name, values in series.items():
        axes.plot(range(len(values)), values, marker="o", label=name)
    if reference is not None:
        axes.axhline(reference[0], color="grey", linestyle="--", label=reference[1])
    layers = max(len(v) for v in series.values())
    axes.set_xticks(range(layers))
    axes.set_xlabel("layer")
    axes.set_ylabel(ylabel)
    axes.set_title(title, fontsize=10)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    _save(figure, path)


def _smooth(values: numpy.ndarray, window: int) -> numpy.ndarray:
    """Trailing mean over ``window`` points (fewer at the start), so a noisy loss shows its trend."""
    cumulative = numpy.cumsum(numpy.insert(values, 0, 0.0))
    counts = numpy.minimum(numpy.arange(1, len(values) + 1), window)
    return (cumulative[1:] - cumulative[numpy.arange(len(values)) + 1 - counts]) / counts


def save_runs(path: str | os.PathLike, runs: Sequence[Curves]) -> None:
    """Four panels: training (smoothed; raw faint) and validation loss against tokens seen and
    against wall-clock time, the load-balance loss, and tokens/s."""
    from matplotlib import colormaps

    figure = _figure(RUNS_INCHES)
    (by_tokens, by_time), (balance, rate) = figure.subplots(2, 2)
    seconds = max((c.train_seconds[-1] for c in runs if len(c.train_seconds)), default=0.0)
    unit, scale = ("h", 3600.0) if seconds > 3 * 3600 else ("min", 60.0) if seconds > 600 else ("s", 1.0)
    colours = colormaps["tab10"]
    for i, c in enumerate(runs):
        colour = colours(i % 10)
        window = max(1, len(c.train_loss) // 50)
        for axes, x, val_x in ((by_tokens, c.train_tokens, c.val_tokens),
                               (by_time, c.train_seconds / scale, c.val_seconds / scale)):
            axes.plot(x, c.train_loss, color=colour, alpha=0.2, linewidth=0.8)
            axes.plot(x, _smooth(c.train_loss, window), color=colour, label=f"{c.name} train")
            if len(c.val_loss):
                axes.plot(val_x, c.val_loss, color=colour, linestyle="--", marker="o", markersize=4,
                          label=f"{c.name} validation")
        if len(c.load_balance):
            balance.plot(c.load_balance_tokens, _smooth(c.load_balance, window), color=colour, label=c.name)
        if len(c.tokens_per_second):
            rate.plot(c.rate_tokens, c.tokens_per_second, color=colour, marker=".", label=c.name)
    by_tokens.set(xlabel="tokens seen", ylabel="lm loss", title="loss against tokens")
    by_time.set(xlabel=f"wall-clock ({unit})", ylabel="lm loss", title="loss against wall-clock time")
    balance.set(xlabel="tokens seen", ylabel="moh_load_balance_loss", title="load-balance loss (1 = uniform)")
    sources = sorted({c.rate_source for c in runs})
    rate.set(xlabel="tokens seen", ylabel="tokens/s (whole job)", title=f"throughput (from {', '.join(sources)})")
    if not any(len(c.load_balance) for c in runs):
        balance.text(0.5, 0.5, "no run logged a load-balance loss", ha="center", transform=balance.transAxes)
    for axes in (by_tokens, by_time, balance, rate):
        axes.grid(alpha=0.3)
        if axes.get_legend_handles_labels()[0]:
            axes.legend(fontsize=8)
    _save(figure, path)
