"""The picture of a `fuse eval`: accuracy against time to first token, one line per strategy, and
the tables (accuracy with its 95% interval, agreement with full prefill) over all tasks and per
task kind."""

from __future__ import annotations

import base64
import contextlib
import html
import io
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from kvlab.atomic import atomic_file, write_text_atomic


def pyplot():
    """matplotlib.pyplot drawing off screen (the Agg backend): reports are made without a display."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def png_bytes(figure) -> bytes:
    """A figure as PNG bytes; the figure is closed."""
    try:
        buffer = io.BytesIO()
        figure.savefig(buffer, format="png")
        return buffer.getvalue()
    finally:
        pyplot().close(figure)


def draw_plot(rows: Sequence[dict[str, Any]], title: str):
    """x = mean TTFT (s), y = accuracy, each strategy's rates joined in rate order: the figure and its
    rate labels, each moved off the points' other labels (rates of nearby points, or of several
    strategies at one spot, would otherwise print on top of each other)."""
    figure, axes = pyplot().subplots(figsize=(7.5, 4.8), dpi=110)
    with closed_on_error(figure):
        labels = _draw_lines(axes, rows, title)
        figure.tight_layout()
        _separate(figure, labels)
    return figure, labels


@contextlib.contextmanager
def closed_on_error(figure) -> Iterator[None]:
    """Close `figure` if drawing it raises (once drawn, `png_bytes` closes it)."""
    try:
        yield
    except BaseException:
        pyplot().close(figure)
        raise


def _draw_lines(axes, rows: Sequence[dict[str, Any]], title: str) -> list:
    """One line per strategy through its rates, full prefill as a star; the rate labels."""
    labels = []
    by_strategy: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        by_strategy.setdefault(row["label"], []).append(row)
    for spec, group in by_strategy.items():
        group = sorted(group, key=lambda r: (r["rate"] is None, r["rate"] or 0.0))
        xs, ys = [r["ttft_s"] for r in group], [r["accuracy"] for r in group]
        if group[0]["strategy"] == "full":
            axes.scatter(xs, ys, marker="*", s=180, color="black", zorder=3, label="full prefill")
            continue
        line, = axes.plot(xs, ys, marker="o", label=spec)
        for r in group:
            if r["rate"] is not None:
                labels.append(axes.annotate(f"{r['rate']:g}", (r["ttft_s"], r["accuracy"]), textcoords="offset points",
                                            xytext=(4, 4), fontsize=7, color=line.get_color()))
    axes.set_xlabel("mean time to first token (s), store reads included")
    axes.set_ylabel(f"accuracy ({rows[0]['metric']})" if rows else "accuracy")
    axes.set_ylim(-0.05, 1.05)
    axes.set_title(title, fontsize=10)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8, loc="best")
    return labels


# Offsets (points) tried in turn for a label, nearest first: right-above, right-below, left, above, below, ...
_OFFSETS = [(4, 4), (4, -10), (-14, 4), (-14, -10), (-5, 10), (-5, -16)]


def _separate(figure, labels) -> None:
    """Give each label the first offset around its point (rings further out when all are taken)
    where it overlaps no label placed before it."""
    renderer = figure.canvas.get_renderer()
    placed = []
    for label in labels:
        for ring in range(12):
            scale = 1 + ring
            for dx, dy in _OFFSETS:
                label.xyann = (dx * scale, dy * scale)
                box = label.get_window_extent(renderer)
                if not any(box.overlaps(other) for other in placed):
                    break
            else:
                continue
            break
        placed.append(label.get_window_extent(renderer))


def write_report(path: str | Path, rows: Sequence[dict[str, Any]], title: str,
                 by_kind: Mapping[str, Sequence[dict[str, Any]]] | None = None) -> list[Path]:
    """`R.png` writes the plot of `rows` (all tasks); any other name writes `R` as HTML (the plot, the
    table of `rows`, then one of each task kind's rows in `by_kind`) and the PNG beside it."""
    path = Path(path)
    png = png_bytes(draw_plot(rows, title)[0])
    png_path = path if path.suffix.lower() == ".png" else path.with_suffix(".png")
    with atomic_file(png_path, "wb") as handle:
        handle.write(png)
    if path.suffix.lower() == ".png":
        return [png_path]
    html_path = path if path.suffix else path.with_suffix(".html")
    write_text_atomic(html_path, _html(rows, title, png, by_kind or {}))
    return [html_path, png_path]


def _html(rows: Sequence[dict[str, Any]], title: str, png: bytes,
          by_kind: Mapping[str, Sequence[dict[str, Any]]]) -> str:
    image = base64.b64encode(png).decode()
    tables = _table(rows) + "".join(f"<h2>{html.escape(kind)}: {group[0]['n']} tasks</h2>" + _table(group)
                                    for kind, group in by_kind.items() if group)
    return (
        "<!doctype html><html><head><meta charset='utf-8'><title>" + html.escape(title) + "</title>"
        "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}</style></head><body>"
        f"<h1>{html.escape(title)}</h1><img alt='accuracy against TTFT' src='data:image/png;base64,{image}'>"
        "<p>Accuracy with its 95% Wilson interval; <em>same answer</em>: the share of tasks answered as full "
        "prefill answered them (first line, normalised); <em>same tokens</em>: the share whose first generated "
        "tokens are full prefill's.</p>" + tables + "</body></html>\n"
    )


def _table(rows: Sequence[dict[str, Any]]) -> str:
    header = ["strategy", "rate", "accuracy", "95% interval", "same answer", "same tokens", "TTFT s", "speedup",
              "TPOT s", "recomputed", "n"]
    body = []
    for r in rows:
        low, high = r.get("accuracy_low"), r.get("accuracy_high")
        same, tokens = r.get("agreement_with_full"), r.get("same_first_tokens")
        cells = [r["label"], "-" if r["rate"] is None else f"{r['rate']:g}", f"{r['accuracy']:.3f}",
                 "-" if low is None else f"{low:.2f}-{high:.2f}", "-" if same is None else f"{same:.2f}",
                 "-" if tokens is None else f"{tokens:.2f}", f"{r['ttft_s']:.3f}",
                 f"{r['speedup']:.2f}x" if r["speedup"] else "-", f"{r['tpot_s']:.4f}" if r["tpot_s"] else "-",
                 f"{r['recomputed_fraction']:.1%}", str(r["n"])]
        body.append("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + "</tr>")
    return "<table><tr>" + "".join(f"<th>{h}</th>" for h in header) + "</tr>" + "".join(body) + "</table>"
