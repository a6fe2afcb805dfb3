"""The report's figures as PNG bytes: error heatmaps of a cache diff and per-step logits curves.

Matplotlib's object API (no pyplot, no global backend) so that plotting never touches a
display or another caller's figures. Errors are drawn as log10 rel-L2; non-finite rows in
magenta; long sequences are max-pooled into bins so a single bad position stays visible.
"""

from __future__ import annotations

import io
import math
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from kvlab.compare.diff import DiffResult
from kvlab.compare.source import TENSORS

MAX_COLUMNS = 800
_FLOOR = 1e-12
MAX_TOKEN_TICKS = 64  # up to this many positions, the x axis names each position's token
MAX_HOVER_CELLS = 12000  # (layer, position) cells of one panel given a hover text (a bin counts once)
DPI = 90


@dataclass
class Cell:
    """One heatmap cell as a rectangle of the PNG (pixels, top-left origin) and what it shows."""

    box: tuple[int, int, int, int]
    text: str


@dataclass
class Heatmaps:
    """The heatmap PNG, its size in pixels and its cells, so a page can say what a pointer is on."""

    png: bytes
    cells: list[Cell]
    width: int
    height: int
    position_labels: list[str]  # the position axis' tick labels (with tokens where they fit)


def heatmaps(result: DiffResult, tokens: Sequence[str] | None = None) -> Heatmaps:
    """The heatmap figure, plus where each cell of it lies in the PNG and its hover text.

    `tokens` (the text of the token at each position) label the position axis where they fit
    and name the token in each cell's text.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    tol = result.tolerance.rel_l2
    maps = {t: result.cache.maps[t]["rel_l2"] for t in TENSORS}
    by_position = {t: m.amax(dim=1) for t, m in maps.items()}  # [layers, positions]; NaN wins
    by_head = {t: _head_rel(result, t) for t in TENSORS}  # [layers, heads]
    lo, hi = _range([*by_position.values(), *by_head.values()], tol)
    cmap = _cmap()
    first = result.first_divergence
    n_layers, n_positions = by_position["keys"].shape
    tokens = list(tokens) if tokens is not None and len(tokens) >= n_positions else None

    fig = Figure(figsize=(12, 7.5), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, 2, width_ratios=[4, 1])
    image = None
    panels = []
    for row, tensor in enumerate(TENSORS):
        pooled, width = _pool_positions(by_position[tensor])
        ax = axes[row][0]
        image = ax.imshow(_log(pooled), aspect="auto", origin="lower", cmap=cmap, vmin=lo, vmax=hi,
                          interpolation="nearest", extent=(-0.5, pooled.shape[1] * width - 0.5, -0.5, n_layers - 0.5))
        ax.set_title(f"{tensor}: worst KV head per (layer, position)")
        ax.set_xlabel("position" + (" and token" if tokens is not None and n_positions <= MAX_TOKEN_TICKS else ""))
        ax.set_ylabel("layer")
        if tokens is not None and n_positions <= MAX_TOKEN_TICKS:
            ax.set_xticks(range(n_positions), [f"{p} {short_token(tokens[p])}" for p in range(n_positions)],
                          rotation=90, fontsize=6.5)
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
        panels.append((tensor, ax, ax_h, width, pooled.shape[1]))
    bar = fig.colorbar(image, ax=axes, shrink=0.8, label="log10 rel-L2 (magenta: NaN/Inf)")
    bar.ax.axhline(math.log10(tol), color="red", lw=1.5)
    bar.ax.text(1.6, math.log10(tol), " tol", color="red", va="center", transform=bar.ax.get_yaxis_transform())
    fig.suptitle(wrapped_title(f"test {result.test_run}", f"vs golden {result.golden_run}"), fontsize=11)
    fig.canvas.draw()  # fixes the layout, so cells can be located in the PNG
    height = int(round(fig.bbox.height))
    cells = []
    for tensor, ax, ax_h, width, columns in panels:
        if n_layers * columns <= MAX_HOVER_CELLS:
            cells += _position_cells(result, tensor, ax, width, columns, tokens, height)
        cells += _head_cells(result, tensor, ax_h, height)
    labels = [t.get_text() for t in axes[0][0].get_xticklabels()]
    return Heatmaps(_png(fig), cells, int(round(fig.bbox.width)), height, labels)


def short_token(text: str, limit: int = 10) -> str:
    """A token as it can be read on an axis or in a line: whitespace made visible, long ones cut."""
    shown = "".join(_VISIBLE.get(ch) or (ch if ch.isprintable() else f"\\x{ord(ch):02x}") for ch in text)
    if not shown:
        shown = "\u2205"
    return shown if len(shown) <= limit else shown[: limit - 1] + "\u2026"


_VISIBLE = {" ": "\u2423", "\n": "\u21b5", "\t": "\u21e5", "\r": "\u240d"}


def wrapped_title(*parts: str, width: int = 110) -> str:
    """Title lines of at most `width` characters, cut at commas: a long run spec is never cut off."""
    lines = []
    for part in parts:
        line = ""
        for piece in part.split(","):
            candidate = f"{line},{piece}" if line else piece
            if line and len(candidate) > width:
                lines.append(line + ",")
                line = "    " + piece
            else:
                line = candidate
        lines.append(line)
    return "\n".join(textwrap.fill(line, width, subsequent_indent="    ") for line in lines)


def _worst_head(grid: torch.Tensor) -> torch.Tensor:
    """Index of the worst KV head of each (layer, position) cell; NaN counts as worst."""
    return torch.nan_to_num(grid.to(torch.float64), nan=math.inf).argmax(dim=1)


def _box(ax, x0: float, x1: float, y0: float, y1: float, height: int) -> tuple[int, int, int, int]:
    (a, b), (c, d) = ax.transData.transform([(x0, y0), (x1, y1)])
    left, right = sorted((a, c))
    low, high = sorted((b, d))
    return (int(round(left)), int(round(height - high)), int(round(right)), int(round(height - low)))


def _error_text(value: float) -> str:
    return "NaN/Inf" if not math.isfinite(value) else f"rel-L2 {value:.3g}"


def _position_cells(result: DiffResult, tensor: str, ax, width: int, columns: int, tokens, height: int) -> list[Cell]:
    grid = result.cache.maps[tensor]["rel_l2"]
    n_layers, _, n_positions = grid.shape
    heads = _worst_head(grid)
    cells = []
    for column in range(columns):
        start, stop = column * width, min(n_positions, (column + 1) * width)
        for layer in range(n_layers):
            block = grid[layer, :, start:stop].to(torch.float64)
            flat = torch.nan_to_num(block, nan=math.inf).reshape(-1)
            where = int(flat.argmax())
            head, position = divmod(where, stop - start)
            position += start
            if width == 1:
                head = int(heads[layer, position])
            value = float(block[head, position - start])
            token = f" {short_token(tokens[position], 24)!r}" if tokens is not None else ""
            span = f"positions {start}-{stop - 1}, worst at " if width > 1 else ""
            text = (f"{tensor}: layer {layer}, {span}position {position}{token} "
                    f"({result.describe_position(position)}), KV head {head}, {_error_text(value)}")
            cells.append(Cell(_box(ax, start - 0.5, stop - 0.5, layer - 0.5, layer + 0.5, height), text))
    return cells


def _head_cells(result: DiffResult, tensor: str, ax, height: int) -> list[Cell]:
    cells = []
    for layer, row in enumerate(result.cache.head_errors(tensor)):
        for head, errors in enumerate(row):
            text = f"{tensor}: layer {layer}, KV head {head}, all positions, {_error_text(errors.rel_l2)}"
            cells.append(Cell(_box(ax, head - 0.5, head + 0.5, layer - 0.5, layer + 0.5, height), text))
    return cells


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
    return torch.tensor([[e.rel_l2 for e in layer] for layer in result.cache.head_errors(tensor)],
                        dtype=torch.float64)


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
    fig.savefig(buffer, format="png", dpi=DPI)
    return buffer.getvalue()
