"""The HTML page of `kvlab fuse explain`: the prompt with the recomputed tokens and the evidence
marked, where the fused cache leaves full prefill's, and the question's attention on the evidence."""

from __future__ import annotations

import base64
import html
from pathlib import Path

from kvlab.atomic import write_text_atomic
from kvlab.fusion.explain import Explanation
from kvlab.fusion.report import closed_on_error, png_bytes, pyplot

_STYLE = (
    "body{font-family:sans-serif;margin:2em;max-width:70em}table{border-collapse:collapse;margin:1em 0}"
    "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}td.l{text-align:left}"
    ".prompt{font-family:monospace;white-space:pre-wrap;line-height:1.7;border:1px solid #ddd;padding:1em}"
    ".sel{background:#ffe27a}.ev{text-decoration:underline 2px #c00;color:#900}.div{outline:2px solid #06c}"
    ".frame{color:#888}.cut{display:block;color:#06c;font-family:sans-serif;font-size:85%;margin:.6em 0 .2em}"
)


def write_explain_report(path: str | Path, explanation: Explanation) -> Path:
    write_text_atomic(path, render(explanation))
    return Path(path)


def render(e: Explanation) -> str:
    data = e.to_dict()
    first = data["first_divergence"]
    parts = [f"<h1>fuse explain: {html.escape(e.task.id)}</h1>",
             f"<p><b>Question</b>: {html.escape(e.task.question)}<br><b>Accepted</b>: "
             f"{html.escape(' | '.join(e.task.answers))}<br><b>Strategy</b>: {html.escape(data['strategy'])}, "
             f"{data['recomputed']} of {e.prompt.n_docs} document tokens recomputed</p>",
             "<table><tr><th>prefill</th><th>answer</th><th>exact</th><th>substring</th></tr>"]
    for name, got in data["answers"].items():
        parts.append(f"<tr><td class=l>{name}</td><td class=l>{html.escape(got['text'])}</td>"
                     f"<td>{got['exact']:.0f}</td><td>{got['substring']:.0f}</td></tr>")
    parts.append("</table>")
    if first is None:
        parts.append(f"<p>The fused cache stays within rel-L2 {e.tol:g} of full prefill's everywhere.</p>")
    else:
        where = (f"chunk {first['chunk']}, token {first['offset']}" if first["part"] == "chunk"
                 else f"{first['part']}, token {first['offset']}")
        parts.append(f"<p><b>First divergence</b> (rel-L2 &gt; {e.tol:g}): position {first['position']} ({where}), "
                     f"layer {first['layer']}, KV head {first['head']}, {first['tensor']}, rel-L2 "
                     f"{format(first['error'], '.3g') if first['error'] is not None else 'non-finite'}</p>")
    parts.append("<table><tr><th>chunk</th><th>positions</th><th>max rel-L2 K</th><th>max rel-L2 V</th>"
                 "<th>recomputed</th><th>evidence</th></tr>")
    selected = set(e.selected_positions())
    for i, (span, errors) in enumerate(zip(data["chunks"], data["chunk_errors"])):
        count = sum(span["start"] <= p < span["end"] for p in selected)
        held = sum(ev.chunk == i for ev in e.evidence)
        parts.append(f"<tr><td>{i}</td><td>{span['start']}-{span['end'] - 1}</td><td>{errors['keys']:.3g}</td>"
                     f"<td>{errors['values']:.3g}</td><td>{count}</td><td>{held or ''}</td></tr>")
    parts.append("</table>")
    parts.append("<h2>The question's attention on the evidence, per layer</h2>")
    parts.append(f"<img alt='attention on the evidence' src='data:image/png;base64,{_attention_png(e)}'>")
    parts.append("<h2>Evidence</h2><ul>")
    for ev in data["evidence"]:
        found = (f"chunk {ev['chunk']}, positions {ev['positions'][0]}-{ev['positions'][-1]}, "
                 f"{ev['selected']} of {len(ev['positions'])} tokens recomputed" if ev["positions"] else "not found")
        parts.append(f"<li>{html.escape(ev['text'])}: {found}</li>")
    parts.append("</ul><h2>Prompt</h2><p><span class=sel>recomputed</span> <span class=ev>evidence</span> "
                 "<span class=div>first divergence</span> <span class=frame>prefix and question</span></p>")
    parts.append(f"<div class=prompt>{_prompt_html(e, selected, first['position'] if first else None)}</div>")
    return ("<!doctype html><html><head><meta charset='utf-8'><title>fuse explain " + html.escape(e.task.id)
            + f"</title><style>{_STYLE}</style></head><body>" + "".join(parts) + "</body></html>\n")


def _prompt_html(e: Explanation, selected: set[int], divergence: int | None) -> str:
    evidence = {p for ev in e.evidence for p in ev.positions}
    starts = {e.prompt.n_prefix + start: i for i, (start, _) in enumerate(e.prompt.spans)}
    end_docs = e.prompt.n_prefix + e.prompt.n_docs
    out = []
    for position, text in enumerate(e.token_texts):
        if position in starts:
            out.append(f"<span class=cut>chunk {starts[position]}</span>")
        if position == end_docs:
            out.append("<span class=cut>question</span>")
        classes = [name for name, on in (("sel", position in selected), ("ev", position in evidence),
                                         ("div", position == divergence),
                                         ("frame", position < e.prompt.n_prefix or position >= end_docs)) if on]
        token = html.escape(text)
        out.append(f"<span class='{' '.join(classes)}' title='{position}'>{token}</span>" if classes else token)
    return "".join(out)


def _attention_png(e: Explanation) -> str:
    figure, axes = pyplot().subplots(figsize=(7, 3.2), dpi=100)
    with closed_on_error(figure):
        layers = range(len(e.attention_full))
        axes.plot(layers, e.attention_full, marker="o", color="black", label="full prefill")
        axes.plot(layers, e.attention_fused, marker="o", label=e.strategy.label())
        axes.set_xlabel("layer")
        axes.set_ylabel("attention mass on the evidence")
        axes.grid(alpha=0.3)
        axes.legend(fontsize=8)
        figure.tight_layout()
    return base64.b64encode(png_bytes(figure)).decode()
