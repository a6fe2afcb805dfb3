"""`kvlab fuse run` and `kvlab fuse eval`: answer with fused chunk caches, and measure it.

Both join the `fuse` group through `FUSE_COMMANDS` (see `kvlab.cli.fuse`).
"""

from __future__ import annotations

import click

from kvlab.cli.common import console, json_and_quiet, make_table, model_option, numbers, output_file, write_json
from kvlab.errors import KvlabError

def _evict(spec: str | None):
    if not spec:
        return None
    from kvlab.caches import parse_policy
    from kvlab.caches.eviction import EvictionPolicy
    from kvlab.params import ParamError

    try:
        policy = parse_policy(spec)
    except ParamError as err:
        raise KvlabError(f"--evict: {err}") from None
    if not isinstance(policy, EvictionPolicy):
        raise KvlabError(f"--evict {spec}: not an eviction policy; use streaming:sink=4,window=W or "
                         "snapkv:capacity=C,kernel=5,pool=avg|max")
    return policy


_run = click.option("--run", "run_text", default="", metavar="SPEC", help="Run spec, e.g. 'dtype=bfloat16,attn=eager'.")
_evict_option = click.option("--evict", "evict_spec", default=None, metavar="SPEC",
                             help="Evict after the prefill: streaming:sink=4,window=W or snapkv:capacity=C,kernel=5,pool=avg|max.")
_prefix = click.option("--prefix", default=None, metavar="TEXT",
                       help="Shared prefix before the documents (as given to `fuse precompute --prefix`); "
                            "default: the chat template's opening.")
_chat = click.option("--chat/--no-chat", default=None,
                     help="Wrap documents and question in the chat template (default: when the model has one).")
_chunk_tokens = click.option("--chunk-tokens", type=click.IntRange(min=16), default=512, show_default=True,
                             help="Tokens per chunk, as given to `fuse precompute` (documents are cut at sentence ends).")
_store = click.option("--store", "store_url", default="memory://", show_default=True,
                      help="Chunk store URL: a folder, redis://host:port/db, or memory:// (this process only).")
_rate = click.option("--rate", "-r", type=float, default=0.15, show_default=True,
                     help="Fraction of document tokens to recompute.")


@click.command("run")
@model_option
@_store
@click.option("--task-file", default=None, metavar="FILE", help="Task file (JSON lines); pick the task with --id.")
@click.option("--id", "task_id", default=None, help="The task's id in --task-file.")
@click.option("--chunks-file", default=None, metavar="FILE",
              help="Chunks: a JSON list of strings, or text with chunks separated by blank lines.")
@click.option("--question", default=None, help="The question (with --chunks-file).")
@click.option("--strategy", "-s", default="a3", show_default=True, metavar="NAME[:p=v,...]",
              help="full, reuse, last, cacheblend, a3, epic or surprisal, with parameters (a3:check_layer=2).")
@_rate
@_evict_option
@_chunk_tokens
@_prefix
@_chat
@_run
@click.option("--max-new-tokens", "-n", "max_new_tokens", type=click.IntRange(min=1), default=32, show_default=True)
@json_and_quiet
def run_command(model_spec, store_url, task_file, task_id, chunks_file, question, strategy, rate, evict_spec,
                chunk_tokens, prefix, chat, run_text, max_new_tokens, json_path, quiet) -> None:
    """Answer one question from stored chunk caches and print the time to first token.

    Chunks missing from the store are computed and stored (their time counts in TTFT).
    """
    from kvlab.fusion.evaluate import answer_question
    from kvlab.fusion.prompt import find_task, read_chunks_file
    from kvlab.fusion.strategies import make_strategy
    from kvlab.runspec import RunSpec

    if (task_file is None) == (chunks_file is None):
        raise click.UsageError("give --task-file FILE --id ID, or --chunks-file FILE --question Q")
    chosen = make_strategy(strategy, rate)
    policy = _evict(evict_spec)
    task = None
    if task_file is not None:
        if task_id is None:
            raise click.UsageError("--task-file needs --id")
        task = find_task(task_file, task_id)
    elif not question:
        raise click.UsageError("--chunks-file needs --question")
    docs = read_chunks_file(chunks_file) if chunks_file else None
    fused = answer_question(model_spec, RunSpec.parse(run_text), store_url, chosen, task=task, documents=docs,
                            question=question, evict=policy, chunk_tokens=chunk_tokens, prefix=prefix, chat=chat,
                            max_new_tokens=max_new_tokens, progress=not quiet)
    got, result = fused.answer, fused.answer.prefill
    con = console(json_path)
    con.print(f"[bold]{model_spec}[/bold]  strategy {chosen.label()}"
              + (f" rate {chosen.rate_value:g}" if chosen.rate_value is not None else "")
              + (f"  evict {policy}" if policy else ""))
    con.print(f"prompt {result.n_tokens} tokens ({result.n_docs} in {len(fused.prompt.chunks)} chunks), "
              f"recomputed {result.recomputed} document tokens ({result.recomputed_fraction:.1%}); store "
              f"{result.load.hits} hits, {result.load.misses} computed")
    con.print(f"TTFT {got.ttft_s:.3f} s" + (f", {got.tpot_s * 1000:.1f} ms per output token" if got.tpot_s else ""))
    con.rule("answer")
    con.print(got.text, markup=False)
    con.rule()
    write_json(json_path, fused.summary)


@click.command("eval")
@model_option
@click.option("--task", "task_source", default="mixed", show_default=True,
              metavar="mixed|needle|needles|twohop|kvqa|FILE",
              help="Generated tasks (mixed: every kind in turn), or a task file (kvlab or LongBench JSON lines).")
@click.option("--n", "n_tasks", type=click.IntRange(min=1), default=48, show_default=True, help="Number of tasks.")
@click.option("--strategies", default="reuse,cacheblend,a3,epic,surprisal", show_default=True,
              help="Comma-separated strategies, each with its parameters (a3:check_layer=0,scout=true,cacheblend); "
                   "full prefill is always run as the baseline.")
@click.option("--rates", default="0.05,0.15,0.3", show_default=True, help="Comma-separated recompute rates.")
@_store
@_evict_option
@click.option("--chunks", "n_chunks", type=click.IntRange(min=1), default=8, show_default=True,
              help="Documents per generated task.")
@_chunk_tokens
@click.option("--metric", type=click.Choice(["substring", "exact", "f1"]), default="substring", show_default=True)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the generated tasks.")
@click.option("--report", default=None, metavar="PATH", callback=output_file, help="Write an HTML report (and PNG) of accuracy against TTFT.")
@_prefix
@_chat
@_run
@click.option("--max-new-tokens", "-N", "max_new_tokens", type=click.IntRange(min=1), default=24, show_default=True)
@click.option("--agree-tokens", type=click.IntRange(min=1), default=8, show_default=True,
              help="Besides the same answer, count answers whose first N generated tokens are full prefill's.")
@json_and_quiet
def eval_command(model_spec, task_source, n_tasks, strategies, rates, store_url, evict_spec, n_chunks, chunk_tokens,
                 metric, seed, report, prefix, chat, run_text, max_new_tokens, agree_tokens, json_path, quiet) -> None:
    """Accuracy (with its 95% interval), agreement with full prefill, TTFT and speedup of each strategy and
    rate, over all tasks and per task kind."""
    from kvlab.fusion.evaluate import evaluate_model, expand
    from kvlab.fusion.strategies import split_strategies
    from kvlab.runspec import RunSpec

    runs = expand(split_strategies(strategies), numbers(rates, "--rates"))
    policy = _evict(evict_spec)
    done = evaluate_model(model_spec, RunSpec.parse(run_text), task_source, n_tasks, runs, store_url, evict=policy,
                          n_chunks=n_chunks, chunk_tokens=chunk_tokens, seed=seed, metric=metric,
                          max_new_tokens=max_new_tokens, chat=chat, prefix=prefix, agree_tokens=agree_tokens,
                          report=report, progress=not quiet)
    con = console(json_path)
    con.print(_table(done.title, done.rows, metric, agree_tokens))
    for kind, kind_rows in done.by_kind.items():
        con.print(_table(f"{kind}: {kind_rows[0]['n']} tasks", kind_rows, metric, agree_tokens))
    con.print(f"acc: accuracy with its 95% Wilson interval; =full: same answer as full prefill; "
              f"={agree_tokens}tok: same first {agree_tokens} tokens")
    if done.result.precomputed:
        con.print(f"{done.result.precomputed} chunks computed into {store_url} before timing")
    for path in done.written:
        con.print(f"report written to {path}")
    write_json(json_path, done.summary)


@click.command("tasks")
@model_option
@click.option("--task", "task_source", default="mixed", show_default=True, metavar="mixed|needle|needles|twohop|kvqa",
              help="Which generated tasks.")
@click.option("--n", "n_tasks", type=click.IntRange(min=1), default=48, show_default=True, help="Number of tasks.")
@click.option("--chunks", "n_chunks", type=click.IntRange(min=1), default=8, show_default=True,
              help="Documents per task.")
@_chunk_tokens
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--out", "-o", required=True, metavar="FILE", callback=output_file,
              help="The task file to write (JSON lines).")
def tasks_command(model_spec, task_source, n_tasks, n_chunks, chunk_tokens, seed, out) -> None:
    """Write generated tasks to a task file: what `fuse eval --task` generates with the same options,
    for `fuse precompute`, `fuse run` and `fuse explain`. Documents are sized with the model's tokenizer."""
    from kvlab.fusion.evaluate import make_tasks
    from kvlab.models import load_model
    from kvlab.tasks import write_task_file
    from kvlab.tasks.suite import SOURCES

    if task_source not in SOURCES:
        raise KvlabError(f"--task {task_source!r}: not one of {', '.join(SOURCES)}")
    loaded = load_model(model_spec, "", progress=False)
    tasks = make_tasks(loaded, task_source, n_tasks, n_chunks=n_chunks, chunk_tokens=chunk_tokens, seed=seed)
    write_task_file(out, tasks)
    console().print(f"{len(tasks)} {task_source} tasks written to {out}")


def _table(title: str, rows: list[dict], metric: str, agree_tokens: int):
    """One table of `fuse eval` rows: accuracy and its 95% interval, agreement with full prefill (same
    answer, same first tokens), TTFT and speedup; the recomputed share and time per output token are in
    the JSON and the report."""
    from rich import box

    columns = ["strategy", "acc", "95% CI", "=full", f"={agree_tokens}tok", "TTFT s", "speedup", "n"]
    table = make_table(f"{title} ({metric})", columns, labels=1, no_wrap=True, box=box.SIMPLE_HEAD, pad_edge=False)
    for r in rows:
        label = r["label"] + ("" if r["rate"] is None else f"@{r['rate']:g}")
        interval = "-" if r["accuracy_low"] is None else f"{r['accuracy_low']:.2f}-{r['accuracy_high']:.2f}"
        cells = [label, f"{r['accuracy']:.3f}", interval, f"{r['agreement_with_full']:.2f}",
                 f"{r['same_first_tokens']:.2f}", f"{r['ttft_s']:.3f}", f"{r['speedup']:.2f}x" if r["speedup"] else "-"]
        table.add_row(*cells, str(r["n"]))
    return table


FUSE_COMMANDS = [run_command, eval_command, tasks_command]
