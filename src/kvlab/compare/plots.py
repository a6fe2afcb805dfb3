"""The report's figures as PNG bytes: error heatmaps of a cache diff and per-step logits curves.

Matplotlib's object API (no pyplot, no global backend) so that plotting never touches a
display or another caller's figures. Errors are drawn as log10 rel-L2; non-finite rows in
magenta; long sequences are max-pooled into bins so a single bad position stays visible.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence

import torch

from kvlab.compare.diff import DiffResult
from kvlab.compare.source import TENSORS

MAX_COLUMNS = 800
_FLOOR = 1e-12


def heatmaps_png(result: DiffResult) -> bytes:
    """2 x 2 panels: layer x position and layer x head of log10 rel-L2, for keys and values."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    tol = result.tolerance.rel_l2
    maps = {t: result.cache.maps[t]["rel_l2"] for t in TENSORS}
    by_position = {t: m.amax(dim=1) for t, m in maps.items()}  # [layers, positions]
    by_head = {t: _head_rel(result, t) for t in TENSORS}  # [layers, heads]
    lo, hi = _range([*by_position.values(), *by_head.values()], tol)
    cmap = _cmap()
    first = result.first_divergence
    n_layers, n_positions = by_position["keys"].shape

    fig = Figure(figsize=(12, 7.5), layout="constrained")
    axes = fig.subplots(2, 2, width_ratios=[4, 1])
    image = None
    for row, tensor in enumerate(TENSORS):
        pooled, width = _pool_positions(by_position[tensor])
        ax = axes[row][0]
        image = ax.imshow(_log(pooled), aspect="auto", origin="lower", cmap=cmap, vmin=lo, vmax=hi,
                          interpolation="nearest", extent=(-0.5, pooled.shape[1] * width - 0.5, -0.5, n_layers - 0.5))
        ax.set_title(f"{tensor}: worst KV head per (layer, position)")
        ax.set_xlabel("position")
        ax.set_ylabel("layer")
        if 0 < result.n_prompt < n_positions:
            ax.axvline(result.n_prompt - 0.5, color="white", lw=0.8, ls="--")
        ax_h = axes[row][1]
        ax_h.imshow(_log(by_head[tensor]), aspect="auto", origin="lower", cmap=cmap, vmin=lo, vmax=hi,
                    interpolation="nearest")
        ax_h.set_title(f"{tensor}: per (layer, KV head)")
        ax_h.set_xlabel("KV head")
        ax_h.set_xticks(range(by_head[tensor].shape[1]))
        for a in (ax, ax_h):
            a.yaxis.set_major_locator(MaxNLocator(integer=True))
        if first is not None and first.tensor == tensor:
            ax.plot([first.position], [first.layer], marker="x", color="red", ms=10, mew=2, ls="")
            ax_h.plot([first.head], [first.layer], marker="x", color="red", ms=10, mew=2, ls="")
    bar = fig.colorbar(image, ax=axes, shrink=0.8, label="log10 rel-L2 (magenta: NaN/Inf)")
    bar.ax.axhline(math.log10(tol), color="red", lw=1.5)
    bar.ax.text(1.6, math.log10(tol), " tol", color="red", va="center", transform=bar.ax.get_yaxis_transform())
    fig.suptitle(f"{result.test_run}  vs  golden {result.golden_run}")
    return _png(fig)


def logits_png(results: Sequence[DiffResult]) -> bytes:
    """KL(golden || test) and top-1 agreement per generation step, one line per test run."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 5.5), layout="constrained")
    ax_kl, ax_top = fig.subplots(2, 1, sharex=True, height_ratios=[2, 1])
    for i, result in enumerate(results):
        logits = result.logits
        steps = list(range(logits.steps))
        color = f"C{i % 10}"
        if logits.kl is not None:
            ax_kl.plot(steps, [max(v, _FLOOR) if math.isfinite(v) else float("nan") for v in logits.kl],
                       marker=".", color=color, label=result.label)
        if logits.top1 is not None:
            ax_top.step(steps, [1.0 if a else 0.0 for a in logits.top1], where="mid", color=color,
                        label=result.label)
        if logits.first_token_mismatch is not None:
            for ax in (ax_kl, ax_top):
                ax.axvline(logits.first_token_mismatch, color=color, ls=":", lw=1.2)
    ax_kl.set_yscale("log")
    ax_kl.set_ylabel("KL(golden || test), nats")
    ax_kl.set_title("next-token distributions per step (dotted: first step where the test's own token differs)")
    if ax_kl.get_legend_handles_labels()[0]:
        ax_kl.legend(fontsize="small", loc="upper left")
    ax_top.set_ylim(-0.1, 1.1)
    ax_top.set_yticks([0, 1], ["differs", "agrees"])
    ax_top.set_ylabel("top-1")
    ax_top.set_xlabel("generation step")
    return _png(fig)


def _head_rel(result: DiffResult, tensor: str) -> torch.Tensor:
    rows = result.cache.head_errors(tensor)
    return torch.tensor([[e.rel_l2 for e in layer] for layer in rows], dtype=torch.float64)


def _pool_positions(grid: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Max-pool positions into at most MAX_COLUMNS bins (NaN wins); returns the grid and bin width."""
    n_layers, n = grid.shape
    width = max(1, math.ceil(n / MAX_COLUMNS))
    if width == 1:
        return grid, 1
    pad = (-n) % width
    padded = torch.cat([grid, grid.new_zeros(n_layers, pad)], dim=1) if pad else grid
    return padded.reshape(n_layers, -1, width).amax(dim=2), width


def _log(grid: torch.Tensor):
    """log10 of the errors as numpy, non-finite as NaN (drawn in the colormap's 'bad' colour)."""
    values = grid.to(torch.float64)
    out = torch.log10(values.clamp_min(_FLOOR))
    return torch.where(torch.isfinite(values), out, torch.full_like(out, float("nan"))).numpy()


def _range(grids: Sequence[torch.Tensor], tol: float) -> tuple[float, float]:
    finite = [g[torch.isfinite(g)] for g in grids]
    top = max((float(f.max()) for f in finite if f.numel()), default=0.0)
    hi = max(math.log10(tol) + 1, math.log10(max(top, _FLOOR)))
    return math.log10(tol) - 5, hi


def _cmap():
    import matplotlib

    return matplotlib.colormaps["viridis"].with_extremes(bad="magenta")


def _png(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90)
    return buffer.getvalue()
