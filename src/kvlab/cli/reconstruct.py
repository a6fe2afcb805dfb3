"""`kvlab reconstruct`: rebuild a full KV cache from per-rank tensor-parallel shards, checking them."""

from __future__ import annotations

import click

from kvlab.cli.common import console, json_and_quiet, numbers, snapshot_dir, write_json

MAX_PROBLEMS_SHOWN = 20


@click.command("reconstruct")
@click.argument("shard_dir", metavar="DIR")
@click.option("--layout", "layout_name", default=None, metavar="NAME",
              help="Layout strategy (contiguous, replicate, mha, padded-mha, auto, ...). "
                   "Not needed for kvlab shard snapshots, which record theirs.")
@click.option("--heads", type=click.IntRange(min=1), default=None, help="Query heads of the model.")
@click.option("--kv-heads", type=click.IntRange(min=1), default=None, help="KV heads of the model.")
@click.option("--tp", type=click.IntRange(min=1), default=None, help="Tensor-parallel degree (number of ranks).")
@click.option("--dp", type=click.IntRange(min=1), default=1, show_default=True,
              help="Attention data-parallel groups: each serves a contiguous slice of the batch.")
@click.option("--seq-split", is_flag=True,
              help="Flash-decoding: ranks sharing a KV head split the sequence round-robin.")
@click.option("--seq-len", type=click.IntRange(min=1), default=None,
              help="Global sequence length (crops preallocated shards; the true length under --seq-split).")
@click.option("--rank-order", default=None, metavar="R0,R1,...",
              help="The rank holding each layout shard, when ranks were reordered.")
@click.option("--pattern", default=None, metavar="PRESET|KEYS,VALUES",
              help="Tensor names: 'kvlab', 'nxdi' (kv_mgr.past_key_values.{2*layer} / {2*layer+1}) or "
                   "'KEYS,VALUES' patterns with one {layer} placeholder. Default: detected.")
@click.option("--transposed-keys", is_flag=True, help="Keys are stored [batch, heads, head_dim, seq].")
@click.option("--replica-atol", type=float, default=0.0, show_default=True,
              help="Largest replica disagreement that is not reported.")
@click.option("--out", "-o", default=None, metavar="SNAPSHOT", callback=snapshot_dir, help="Write the full cache as a snapshot folder.")
@json_and_quiet
def reconstruct_command(shard_dir, layout_name, heads, kv_heads, tp, dp, seq_split, seq_len, rank_order, pattern,
                        transposed_keys, replica_atol, out, json_path, quiet) -> int:
    """Rebuild the full K/V of every layer from a directory of per-rank shards.

    DIR holds one entry per rank (kvlab shard snapshots, or .safetensors / .pt files named
    with their rank, e.g. rank0.safetensors). Every replica of a KV head is compared with the
    copy most others match (that one is kept) and every padding slot with zero; each
    disagreement is reported with its layer, tensor, head, rank and position. Exit status 1
    when the checks find a problem (the snapshot and JSON are still written), 0 when the
    shards are consistent.
    """
    from kvlab.layouts import make_layout
    from kvlab.layouts.files import imported_meta, reconstruct_dir
    from kvlab.progress import progress_bar

    layout = None
    if layout_name is not None:
        missing = [flag for flag, value in (("--heads", heads), ("--kv-heads", kv_heads), ("--tp", tp)) if value is None]
        if missing:
            raise click.UsageError(f"--layout {layout_name} needs {', '.join(missing)}")
        order = None if rank_order is None else numbers(rank_order, "--rank-order", int, "ranks")
        layout = make_layout(layout_name, tp, heads, kv_heads, dp=dp, seq_split=seq_split, rank_order=order)
    with progress_bar(None, "reconstruct", enabled=not quiet) as advance:
        result, shards = reconstruct_dir(shard_dir, layout, pattern=pattern, seq_len=seq_len,
                                         transpose_keys=transposed_keys, replica_atol=replica_atol, on_layer=advance)
    if out is not None:
        result.to_snapshot(imported_meta(shards), logits=shards.logits()).save(out)
    _print_summary(console(json_path), result, shards, out)
    write_json(json_path, {**result.to_dict(), "out": out})
    return 0 if result.ok else 1


def _print_summary(con, result, shards, out) -> None:
    from rich.table import Table

    layout = result.layout
    con.print(f"[bold]layout {layout.name}[/bold]  tp={layout.tp}  {layout.n_kv_heads} KV heads"
              + (f"  dp={layout.dp}" if layout.dp > 1 else "") + ("  sequence split" if layout.seq_split else ""))
    table = Table("rank", "file", "KV head per slot", box=None)
    for rank in range(layout.tp):
        heads = " ".join("pad" if h is None else str(h) for h in layout.heads(rank))
        table.add_row(str(rank), shards.files[rank].name, heads)
    con.print(table)
    k0 = result.layers[0][0] if result.layers else None
    if k0 is not None:
        con.print(f"rebuilt: {len(result.layers)} layers x {tuple(k0.shape)} {k0.dtype}")
    checks = Table("check", "largest", "verdict", box=None)
    replicated = any(len(layout.holders(h, g)) > 1 or len(layout.holders(h, g)[0][1]) > 1
                     for g in range(layout.dp) for h in range(layout.n_kv_heads))
    has_padding = any(h is None for slots in layout.slots for h in slots) or layout.seq_split
    kinds = {p.kind for p in result.problems}
    checks.add_row("replicas agree", f"{result.replica_max_diff:.3g}",
                   _verdict(replicated, "replica" in kinds, "no replicated head"))
    checks.add_row("padding is zero", f"{result.padding_max_abs:.3g}",
                   _verdict(has_padding, "padding" in kinds, "no padding"))
    con.print(checks)
    problems = result.problems
    if problems:
        con.print(f"[red]{len(problems)} problem(s)[/red]:")
        for problem in problems[:MAX_PROBLEMS_SHOWN]:
            con.print(f"  {problem.message()}", markup=False)
        if len(problems) > MAX_PROBLEMS_SHOWN:
            con.print(f"  ... and {len(problems) - MAX_PROBLEMS_SHOWN} more (see --json)")
    else:
        con.print("[green]shards are consistent[/green]")
    if out is not None:
        con.print(f"snapshot written to {out}")


def _verdict(applies: bool, failed: bool, absent: str) -> str:
    if not applies:
        return f"[dim]{absent}[/dim]"
    return "[red]FAIL[/red]" if failed else "[green]ok[/green]"


COMMANDS = [reconstruct_command]
