"""`kvlab fuse store stats|ls|verify|gc` and `kvlab fuse precompute`: fill a chunk store, look after it."""

from __future__ import annotations

import click

from kvlab.cli.common import console, json_and_quiet, json_option, model_option, write_json
from kvlab.errors import KvlabError


@click.group("store")
def store_group() -> None:
    """Look after a chunk store: a folder path, file://PATH?capacity=SIZE, or redis://host:port/db."""


def _open(url: str):
    """An existing store: these commands look after one, they never make one."""
    from kvlab.fusion.store import open_store

    return open_store(url, create=False)


def _size(n: int | None) -> str:
    if n is None:
        return "unbounded"
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"


@store_group.command("stats")
@click.argument("url")
@json_option
def stats_command(url, json_path) -> None:
    """Entries and bytes in the store, per model and dtype."""
    with _open(url) as store:
        stats = store.stats()
    con = console(json_path)
    con.print(f"[bold]{stats['url']}[/bold]: {stats['entries']} chunks, {_size(stats['bytes'])}"
              + (f" of {_size(stats['capacity'])}" if "capacity" in stats else "")
              + (f", {stats['leftovers']} leftovers of interrupted writes" if stats.get("leftovers") else ""))
    if stats["models"]:
        from rich.table import Table

        table = Table("model", "dtype", "chunks", "size")
        for row in stats["models"]:
            table.add_row(row["model"], row["dtype"], str(row["entries"]), _size(row["bytes"]))
        con.print(table)
    write_json(json_path, stats)


@store_group.command("ls")
@click.argument("url")
@click.option("--limit", type=click.IntRange(min=0), default=50, show_default=True,
              help="Show at most this many entries in the table (0: all); --json lists all.")
@json_option
def ls_command(url, limit, json_path) -> None:
    """List the stored chunks: name, model, dtype, tokens, position base, size, dates."""
    with _open(url) as store:
        infos = list(store.entries())
    from rich.table import Table

    table = Table("chunk", "model", "dtype", "tokens", "base", "size", "created", "last used")
    shown = infos if limit == 0 else infos[:limit]
    for info in shown:
        table.add_row(info.digest[:16], info.model, info.dtype, str(info.n_tokens), str(info.position_base),
                      _size(info.nbytes), info.created, info.last_used or "")
    con = console(json_path)
    con.print(table)
    if len(shown) < len(infos):
        con.print(f"... {len(infos) - len(shown)} more (--limit 0 shows all)")
    write_json(json_path, {"url": url, "entries": [i.to_dict() for i in infos]})


@store_group.command("verify")
@click.argument("url")
@click.option("--repair", is_flag=True, help="Delete damaged entries (a precompute then computes them again).")
@json_and_quiet
def verify_command(url, repair, json_path, quiet) -> None:
    """Read every entry back and check its checksum and identity; exit 2 when damage remains."""
    from kvlab.progress import progress_bar

    with _open(url) as store:
        with progress_bar(store.stats()["entries"], "verify", enabled=not quiet) as advance:
            report = store.verify(repair=repair, on_entry=advance)
    con = console(json_path)
    con.print(f"[bold]{report.url}[/bold]: {report.checked} chunks checked, {len(report.problems)} damaged"
              + (f", {report.removed} removed" if repair else "")
              + (f", {report.legacy} with the older SHA-256 checksum"
                 + (f" ({report.migrated} rewritten with xxh3)" if repair else
                    " (read as they are; --repair rewrites them)") if report.legacy else "")
              + (f", {report.stray} leftovers of interrupted writes (`kvlab fuse store gc` removes them)"
                 if report.stray else ""))
    for problem in report.problems:
        con.print(f"  {problem['digest'][:16]}: {problem['error']}", markup=False)
    write_json(json_path, report.to_dict())
    if not report.ok:
        raise KvlabError(f"{len(report.problems) - report.removed} damaged chunks in {report.url}: "
                         f"run `kvlab fuse store verify --repair {url}`, then precompute again")


@store_group.command("gc")
@click.argument("url")
@click.option("--capacity", default=None, metavar="SIZE",
              help="Set the store's capacity (e.g. 20GB, 512MiB) and evict least recently used chunks to fit it.")
@click.option("--min-age", type=click.FloatRange(min=0), default=3600.0, show_default=True, metavar="SECONDS",
              help="Remove temporary files only when older than this (younger ones may be writes in progress).")
@json_option
def gc_command(url, capacity, min_age, json_path) -> None:
    """Remove leftovers of interrupted writes and stale claims; evict down to the capacity."""
    from kvlab.fusion.store import parse_size

    limit = parse_size(capacity) if capacity is not None else None
    with _open(url) as store:
        result = store.gc(capacity=limit, min_age_s=min_age)
    console(json_path).print(f"[bold]{result['url']}[/bold]: removed {result['removed_stray']} leftovers, "
                             f"released {result.get('released_claims', 0)} stale claims, evicted {result['evicted']} "
                             f"chunks ({_size(result['evicted_bytes'])})")
    write_json(json_path, result)


@click.command("precompute")
@model_option
@click.option("--tasks", required=True, metavar="FILE.jsonl",
              help="Task file: kvlab `chunks` records or LongBench `context` records.")
@click.option("--store", "store_url", required=True, metavar="URL",
              help="Chunk store: folder path, file://PATH?capacity=SIZE or redis://host:port/db.")
@click.option("--run", "run_text", default="", metavar="SPEC", help="Run spec (the dtype is part of each chunk's key).")
@click.option("--chunk-tokens", type=click.IntRange(min=1), default=512, show_default=True,
              help="Chunk size in tokens (cut at a sentence end in the last quarter when there is one).")
@click.option("--prefix", default=None, metavar="TEXT",
              help="Shared prefix (e.g. a system prompt) every chunk follows; default: the chat template's opening.")
@click.option("--chat/--no-chat", default=None,
              help="Prompts use the chat template (default: when the model has one); as for `fuse run`.")
@click.option("--surprisal", is_flag=True, help="Also store each token's surprisal -log p(token | before).")
@click.option("--workers", type=click.IntRange(min=1), default=1, show_default=True,
              help="Processes computing chunks into the shared store.")
@json_and_quiet
def precompute_command(model_spec, tasks, store_url, run_text, chunk_tokens, prefix, chat, surprisal, workers,
                       json_path, quiet) -> None:
    """Compute the KV cache of every distinct chunk of a task file once, into a store.

    Each chunk is computed on its own after the prefix (stored too) and stored under a key made
    of the model fingerprint, dtype, token ids, position base and prefix. Chunks already stored
    and intact are skipped, damaged ones recomputed: running it again resumes or does nothing.
    """
    import contextlib

    from kvlab.fusion.precompute import precompute
    from kvlab.progress import progress_bar
    from kvlab.runspec import RunSpec

    run = RunSpec.parse(run_text)
    with contextlib.ExitStack() as stack:
        bar = {}

        def on_start(total: int) -> None:
            bar["advance"] = stack.enter_context(progress_bar(total, "precompute", enabled=not quiet))

        report = precompute(model_spec, tasks, store_url, run=run, chunk_tokens=chunk_tokens, prefix=prefix,
                            chat=chat, surprisal=surprisal, workers=workers, on_start=on_start,
                            on_chunk=lambda outcome: bar["advance"]())
    console(json_path).print(
        f"[bold]{report.store}[/bold]: {report.chunks} chunks from {report.tasks} tasks "
        f"({report.model}, {report.dtype}): {report.computed} computed, {report.existing} already stored"
        + (f", {report.repaired} damaged and recomputed" if report.repaired else "")
        + f" in {report.seconds:.1f}s"
    )
    write_json(json_path, report.to_dict())


FUSE_COMMANDS = [store_group, precompute_command]
