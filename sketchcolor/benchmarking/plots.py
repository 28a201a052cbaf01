"""PNG plots of benchmark results: time vs N and peak memory vs N, log scales, a line per provider.

Drawn with matplotlib's Agg canvas directly (no pyplot), so no display or global backend
state is involved.
"""
from __future__ import annotations

import math
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from .report import MIB
from .suite import BenchResult

_PASS_STYLES = {"fwd+bwd": "-", "fwd": "--"}
_MAX_COLUMNS = 2  # panels per row


def plot_times(results: list[BenchResult], path: Path | str) -> Figure:
    """One panel per op variant: median ms vs N, solid fwd+bwd and dashed fwd, a color per provider."""

    return _plot(results, path, "time (ms)", [(pass_, style, lambda r, p=pass_: r.median_ms(p)) for pass_, style in _PASS_STYLES.items()])


def plot_memory(results: list[BenchResult], path: Path | str) -> Figure:
    """One panel per op variant: peak memory of fwd+bwd (MiB) vs N, a line per provider."""

    def peak_mib(result):
        return result.memory.peak_bytes / MIB if result.memory and result.memory.peak_bytes is not None else None

    return _plot(results, path, "peak memory of fwd+bwd (MiB)", [("fwd+bwd", "-", peak_mib)])


def _plot(results, path, ylabel: str, lines) -> Figure:
    variants = list(dict.fromkeys(r.case.variant for r in results))
    providers = list(dict.fromkeys(r.case.provider for r in results))
    columns = min(len(variants), _MAX_COLUMNS) or 1
    grid_rows = max(math.ceil(len(variants) / columns), 1)
    figure = Figure(figsize=(5.5 * columns, 4.5 * grid_rows), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(grid_rows, columns, squeeze=False).ravel()
    for unused in axes[len(variants):]:
        unused.set_visible(False)
    # A line none of the results has a value for was not asked for (a pass not run, memory not
    # measured); it is left out, not reported missing.
    labelled = len(lines) > 1
    lines = [line for line in lines if any((line[2](r) or 0) > 0 for r in results)]
    for ax, variant in zip(axes, variants):
        missing = []
        for color_index, provider in enumerate(providers):
            for label, style, value in lines:
                name = f"{provider} {label}" if labelled else provider
                cases = [r for r in results if r.case.variant == variant and r.case.provider == provider]
                # A log axis shows positive values only; a case without a value (failed, or a CPU
                # peak below the method's resolution) has no point, and is named below the lines
                # instead, so that a missing line is not read as an absent provider.
                points = sorted((r.case.n, value(r)) for r in cases if (value(r) or 0) > 0)
                missing += [f"{name} N={r.case.n}" for r in cases if not (value(r) or 0) > 0]
                if points:
                    ax.plot(*zip(*points), style, marker="o", color=f"C{color_index}", label=name)
        if missing:
            ax.text(0.01, 0.01, "no value (see the table): " + ", ".join(missing), transform=ax.transAxes, fontsize="x-small", wrap=True)
        dtype = results[0].case.dtype_name
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set(xlabel="N = M (tokens)", ylabel=ylabel, title=f"{variant} ({dtype})")
        ax.grid(True, which="both", alpha=0.3)
        if ax.has_data():
            ax.legend(fontsize="small")
    figure.savefig(path, dpi=100)
    return figure
