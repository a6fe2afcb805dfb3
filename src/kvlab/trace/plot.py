"""A heatmap of a trace check: relative L2 error per (layer, step) row and query head column.

A layout or kernel bug rarely hits every head and step alike; the picture shows at a glance
which layers, steps and heads are off, on a log scale with the tolerance marked.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

from kvlab.trace.check import CheckReport


def error_grid(report: CheckReport) -> tuple[np.ndarray, list[tuple[int, int]], int]:
    """rel_l2 as a `[rows, heads]` array, the (layer, step) of each row, and the head count."""
    rows = sorted({(e.layer, e.step) for e in report.entries})
    heads = 1 + max((e.head for e in report.entries), default=-1)
    index = {row: i for i, row in enumerate(rows)}
    grid = np.full((len(rows), max(heads, 1)), np.nan)
    for e in report.entries:
        grid[index[(e.layer, e.step)], e.head] = e.rel_l2
    return grid, rows, heads


def plot_check(report: CheckReport, path: str | os.PathLike) -> None:
    """Write the heatmap as a PNG (atomically)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import LogNorm

    from kvlab.atomic import atomic_file

    grid, rows, heads = error_grid(report)
    floor = 1e-12
    shown = np.clip(np.nan_to_num(grid, nan=1.0, posinf=1.0), floor, None)
    height = min(2 + 0.25 * len(rows), 40)
    fig, ax = plt.subplots(figsize=(2 + 0.5 * heads, height))
    image = ax.imshow(shown, aspect="auto", cmap="viridis", norm=LogNorm(vmin=floor, vmax=max(1.0, shown.max())))
    bar = fig.colorbar(image, ax=ax, label="relative L2 error vs float64 reference")
    bar.ax.axhline(report.tolerance, color="red", linewidth=2)
    bad = np.argwhere(~(grid <= report.tolerance))
    if len(bad):
        ax.scatter(bad[:, 1], bad[:, 0], marker="x", color="red")
    ax.set_xlabel("query head")
    ax.set_xticks(range(heads))
    ax.set_yticks(range(len(rows)), labels=_labels(rows))
    ax.set_title(f"{os.path.basename(report.path)}: {'ok' if report.ok else 'FAILED'} (tol {report.tolerance:g})")
    fig.tight_layout()
    with atomic_file(path, "wb") as handle:
        fig.savefig(handle, format="png", dpi=100)
    plt.close(fig)


def _labels(rows: Sequence[tuple[int, int]]) -> list[str]:
    return [f"L{layer} s{step}" for layer, step in rows]
