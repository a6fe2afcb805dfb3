"""A self-contained HTML report of a study: summary, per-step logits plot, heatmaps and tables per test.

Everything is inside the one file (PNG plots as data: URIs, inline CSS, no scripts), so it can
be mailed, attached to a bug, or opened from an artifact store without its folder. A heatmap
cell's value shows on hover through an image map (each cell an `<area>` with a title), and the
tokens of the run sit in a strip under each heatmap, so no script is needed for either.
"""

from __future__ import annotations

import base64
import html
from pathlib import Path

from kvlab.atomic import write_text_atomic
from kvlab.compare.diff import DiffResult
from kvlab.compare.fmt import fmt_num, fmt_pct
from kvlab.compare.plots import heatmaps, logits_png, short_token
from kvlab.compare.study import Study

_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; color: #222; }
h1 { margin-bottom: 0.2em; } h2 { border-bottom: 1px solid #ccc; padding-bottom: 0.2em; margin-top: 1.8em; }
table { border-collapse: collapse; margin: 0.8em 0; font-size: 0.92em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
th { background: #f2f2f2; } td.text { text-align: left; }
.bad { color: #b00020; font-weight: 600; } .ok { color: #1b7f2a; font-weight: 600; }
img { max-width: 100%; border: 1px solid #ddd; }
pre { white-space: pre-wrap; background: #f7f7f7; padding: 0.6em; border: 1px solid #e2e2e2; }
.muted { color: #666; font-size: 0.9em; }
.heatmap { overflow-x: auto; } .heatmap img { max-width: none; }
.tokens { font-family: ui-monospace, monospace; font-size: 0.85em; line-height: 2.1; }
.tok { border: 1px solid #ddd; border-radius: 3px; padding: 0.1em 0.25em; margin: 0 0.1em; white-space: pre; }
.tok sub { color: #888; font-size: 0.75em; } .tok.gen { background: #eef4ff; }
.tok.first { background: #ffd7d7; border-color: #b00020; font-weight: 600; }
"""


def write_report(study: Study, path: str | Path) -> Path:
    """Write the report atomically to `path`."""
    path = Path(path)
    write_text_atomic(path, render_report(study))
    return path


def render_report(study: Study) -> str:
    golden = study.golden
    model = golden.model
    parts = [
        "<!doctype html>",
        '<html lang="en"><head><meta charset="utf-8"><title>kvlab diff</title>',
        f"<style>{_CSS}</style></head><body>",
        "<h1>kvlab diff</h1>",
        f'<p class="muted">model {_e(model.get("spec", "?"))} (fingerprint {_e(model.get("fingerprint", "?"))}), '
        f"golden run <code>{_e(study.golden_run)}</code>, {golden.n_prompt} prompt + "
        f"{len(golden.token_ids) - golden.n_prompt} generated tokens; every test run is fed the golden tokens.</p>",
        "<h2>Summary</h2>",
        _summary_table(study),
    ]
    text = study.golden_text()
    if text is not None:
        parts += ["<details open><summary>golden run: prompt and generated text</summary>",
                  f"<pre>{_e(study.prompt_text())}</pre><pre>{_e(text)}</pre></details>"]
    else:
        parts.append('<p class="muted">the model\'s tokenizer is not on this machine: tokens are shown as ids</p>')
    parts += ["<h2>Logits per step</h2>", _img(logits_png(study.results), "KL divergence and top-1 agreement per step")]
    for i, result in enumerate(study.results, start=1):
        parts += _test_section(study, i, result)
    parts += [
        "<h2>How to read this</h2>",
        "<p class=muted>Each cache row is one (layer, KV head, position) of K or V, a head_dim vector. "
        "rel-L2 = ||test - golden|| / ||golden|| over that row; cosine likewise; max abs is the largest "
        "element difference. The first divergence is the earliest position where any row exceeds the "
        "tolerance (which follows the runs' precision unless --tol is given), then the worst row there. "
        "Layer x position panels show the worst KV head of each cell, max-pooled over position bins on long "
        "sequences; the dashed line separates prompt and generated tokens; a red x marks the first divergence.</p>",
        "</body></html>",
    ]
    return "\n".join(parts) + "\n"


def _summary_table(study: Study) -> str:
    rows = []
    for result in study.results:
        first = result.first_divergence
        worst = result.worst_layers(1)[0]
        k, v = result.cache.layer_errors("keys")[worst], result.cache.layer_errors("values")[worst]
        logits = result.logits
        rows.append([
            ("text", f"<code>{_e(result.label)}</code>"),
            ("", fmt_num(result.tolerance.rel_l2)),
            ("text", _first_text(study, result) if first else '<span class="ok">none</span>'),
            ("", f"{worst} (K {fmt_num(k.rel_l2)}, V {fmt_num(v.rel_l2)})"),
            ("", fmt_num(logits.kl_mean)),
            ("", fmt_pct(logits.top1_agreement)),
            ("", _mismatch_text(study, result)),
        ])
    head = ["test (change)", "tol (rel-L2)", "first divergence", "worst layer", "KL mean", "top-1 agree",
            "first token mismatch"]
    return _table(head, rows)


def _test_section(study: Study, index: int, result: DiffResult) -> list[str]:
    parts = [f"<h2>Test {index}: <code>{_e(result.label)}</code></h2>",
             f'<p class="muted">run <code>{_e(result.test_run)}</code></p>']
    first = result.first_divergence
    parts.append(f"<p>First divergence: {_first_text(study, result) if first else '<span class=ok>none</span>'} "
                 f"(tolerance rel-L2 {fmt_num(result.tolerance.rel_l2)}, {_e(result.tolerance.basis)}).</p>")
    parts.append(f"<p>Diagnosis: {_e(result.diagnosis.text)}</p>")
    parts += _heatmap(study, index, result)
    layers_k, layers_v = result.cache.layer_errors("keys"), result.cache.layer_errors("values")
    rows = [[("", str(i)), *_err_cells(layers_k[i]), *_err_cells(layers_v[i])] for i in result.worst_layers(8)]
    head = ["layer", "K max abs", "K rel-L2", "K cosine", "V max abs", "V rel-L2", "V cosine"]
    parts += ["<h3>Worst layers</h3>", _table(head, rows)]
    heads_k, heads_v = result.cache.head_errors("keys"), result.cache.head_errors("values")
    rows = [[("", str(i)), ("", str(h)), *_err_cells(heads_k[i][h]), *_err_cells(heads_v[i][h])]
            for i, h in result.worst_heads(8)]
    parts += ["<h3>Worst KV heads</h3>", _table(["layer", "KV head", *head[1:]], rows)]
    if result.cache.nonfinite:
        rows = [[("text", n.snapshot), ("text", n.tensor), ("", str(n.layer)), ("", str(n.head)),
                 ("", str(n.position)), ("", str(n.count))] for n in result.cache.nonfinite[:50]]
        parts += [f'<h3 class="bad">NaN / Inf: {result.cache.nonfinite_rows} rows</h3>',
                  _table(["snapshot", "tensor", "layer", "KV head", "position", "non-finite values"], rows)]
    return parts


def _first_text(study: Study, result: DiffResult) -> str:
    first = result.first_divergence
    error = "NaN/Inf" if first.nonfinite else f"rel-L2 {fmt_num(first.error)}"
    return (f'<span class="bad">position {first.position}</span> {_e(study.position_token(first.position))} '
            f"({result.describe_position(first.position)}), "
            f"layer {first.layer}, KV head {first.head}, {first.tensor}, {error}")


def _heatmap(study: Study, index: int, result: DiffResult) -> list[str]:
    """The heatmap PNG with an image map (one titled area per cell), then the token strip under it."""
    tokens = study.tokens()
    figure = heatmaps(result, tokens)
    data = base64.b64encode(figure.png).decode("ascii")
    name = f"heatmap-{index}"
    areas = "".join(f'<area shape="rect" coords="{",".join(map(str, c.box))}" title="{_e(c.text)}" '
                    f'alt="{_e(c.text)}" nohref>' for c in figure.cells)
    parts = [f'<div class="heatmap"><img alt="{_e(f"error heatmaps of {result.test_run}")}" '
             f'src="data:image/png;base64,{data}" width="{figure.width}" height="{figure.height}" '
             f'usemap="#{name}"><map name="{name}">{areas}</map></div>',
             '<p class="muted">Point at a cell for its layer, position, token, KV head and error.</p>']
    parts += _token_strip(study, result, tokens)
    return parts


def _token_strip(study: Study, result: DiffResult, tokens: list[str] | None) -> list[str]:
    """Every position with its token (prompt, then generated), the first divergence marked."""
    first = result.first_divergence.position if result.first_divergence is not None else None
    ids = study.golden.token_ids
    spans = []
    for position, token_id in enumerate(ids):
        text = short_token(tokens[position], 24) if tokens is not None else f"[{token_id}]"
        classes = "tok" + (" gen" if position >= result.n_prompt else "") + (" first" if position == first else "")
        spans.append(f'<span class="{classes}" title="position {position}, token id {token_id}, '
                     f'{result.describe_position(position)}">{_e(text)}<sub>{position}</sub></span>')
    summary = f"tokens by position ({result.n_prompt} prompt, {len(ids) - result.n_prompt} generated)"
    is_open = " open" if len(ids) <= 512 else ""
    return [f'<details class="tokens"{is_open}><summary>{summary}</summary>', " ".join(spans), "</details>"]


def _mismatch_text(study: Study, result: DiffResult) -> str:
    logits = result.logits
    if logits.first_token_mismatch is None:
        return "none" if logits.top1 is not None else "n/a"
    g, t = study.token_text(logits.golden_token), study.token_text(logits.test_token)
    words = f" ({_e(repr(g))} vs {_e(repr(t))})" if g is not None else ""
    return f'<span class="bad">step {logits.first_token_mismatch}</span>{words}'


def _err_cells(errors) -> list[tuple[str, str]]:
    return [("", fmt_num(errors.max_abs)), ("", fmt_num(errors.rel_l2)), ("", fmt_num(errors.cosine, digits=6))]


def _table(head: list[str], rows: list[list[tuple[str, str]]]) -> str:
    out = ["<table><tr>" + "".join(f"<th>{_e(h)}</th>" for h in head) + "</tr>"]
    for row in rows:
        out.append("<tr>" + "".join(f'<td class="{cls}">{cell}</td>' if cls else f"<td>{cell}</td>"
                                    for cls, cell in row) + "</tr>")
    out.append("</table>")
    return "\n".join(out)


def _img(png: bytes, alt: str) -> str:
    data = base64.b64encode(png).decode("ascii")
    return f'<p><img alt="{_e(alt)}" src="data:image/png;base64,{data}"></p>'


def _e(text: object) -> str:
    return html.escape(str(text))
