"""`kvlab fuse explain`: one task's fused cache against full prefill's, and where the evidence went.

Joins the `fuse` group through `FUSE_COMMANDS` (see `kvlab.cli.fuse`).
"""

from __future__ import annotations

import click

from kvlab.cli.common import console, json_and_quiet, model_option, output_file, write_json
from kvlab.cli.fuse_eval import _chat, _chunk_tokens, _prefix, _rate, _run, _store


@click.command("explain")
@model_option
@click.option("--task-file", required=True, metavar="FILE", help="Task file (JSON lines, kvlab or LongBench records).")
@click.option("--id", "task_id", required=True, help="The task's id in --task-file.")
@click.option("--strategy", "-s", default="a3", show_default=True, metavar="NAME[:p=v,...]",
              help="The fused strategy to explain (cacheblend, a3, epic, surprisal, reuse, last).")
@_rate
@_store
@click.option("--tol", type=click.FloatRange(min=0.0, min_open=True), default=None,
              help="rel-L2 per cache row past which the caches diverge (default 1e-3).")
@click.option("--report", default=None, metavar="PATH", callback=output_file, help="Write an HTML page: the prompt with the recomputed "
              "tokens and the evidence marked, the divergence and the attention on the evidence.")
@_chunk_tokens
@_prefix
@_chat
@_run
@click.option("--max-new-tokens", "-N", "max_new_tokens", type=click.IntRange(min=1), default=24, show_default=True)
@json_and_quiet
def explain_command(model_spec, task_file, task_id, strategy, rate, store_url, tol, report, chunk_tokens, prefix,
                    chat, run_text, max_new_tokens, json_path, quiet) -> None:
    """Why a fused answer differs: the fused cache diffed against full prefill's (first divergence by
    layer, position and KV head), the recomputed tokens, where the evidence lies, and the question's
    attention on it per layer in both prefills."""
    from kvlab.fusion.explain import DEFAULT_TOL, explain_task
    from kvlab.fusion.strategies import make_strategy
    from kvlab.runspec import RunSpec

    done = explain_task(model_spec, RunSpec.parse(run_text), task_file, task_id, make_strategy(strategy, rate),
                        store_url, tol=tol or DEFAULT_TOL, chunk_tokens=chunk_tokens, prefix=prefix, chat=chat,
                        max_new_tokens=max_new_tokens, progress=not quiet)
    written = None
    if report:
        from kvlab.fusion.explain_report import write_explain_report

        written = write_explain_report(report, done.explanation)
    _print(console(json_path), done.summary, done.explanation, written)
    write_json(json_path, done.summary)


def _print(con, data: dict, result, written) -> None:
    con.print(f"[bold]{data['task']}[/bold]  {data['strategy']}: {data['recomputed']} of "
              f"{result.prompt.n_docs} document tokens recomputed")
    for name, got in data["answers"].items():
        con.print(f"  {name:5} {'right' if got['substring'] else 'wrong'}: ", end="")
        con.print(repr(got["text"]), markup=False)
    first = data["first_divergence"]
    if first is None:
        con.print(f"caches agree within rel-L2 {data['tolerance']:g} everywhere")
    else:
        where = f"chunk {first['chunk']} token {first['offset']}" if first["part"] == "chunk" else first["part"]
        con.print(f"first divergence: position {first['position']} ({where}), layer {first['layer']}, "
                  f"KV head {first['head']}, {first['tensor']} rel-L2 {first['error']:.3g}" if first["error"] is not None
                  else f"first divergence: position {first['position']} ({where}): non-finite")
    con.print("largest rel-L2 per chunk (K / V): " + ", ".join(
        f"{i}: {e['keys']:.2g}/{e['values']:.2g}" for i, e in enumerate(data["chunk_errors"])))
    for ev in data["evidence"]:
        found = (f"chunk {ev['chunk']}, positions {ev['positions'][0]}-{ev['positions'][-1]}, "
                 f"{ev['selected']}/{len(ev['positions'])} recomputed" if ev["positions"] else "not found in the prompt")
        con.print(f"evidence {ev['text']!r}: {found}", markup=False)
    full, fused = data["attention_on_evidence"]["full"], data["attention_on_evidence"]["fused"]
    con.print("question's attention on the evidence per layer (full / fused): " + ", ".join(
        f"{i}: {a:.3f}/{b:.3f}" for i, (a, b) in enumerate(zip(full, fused))))
    if written is not None:
        con.print(f"report written to {written}")


FUSE_COMMANDS = [explain_command]
