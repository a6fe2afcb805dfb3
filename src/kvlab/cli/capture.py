"""`kvlab capture`: run a model greedily (or teacher-forced) and save its KV cache as a snapshot."""

from __future__ import annotations

from pathlib import Path

import click

from kvlab.cli.common import (console, engine_python_option, json_and_quiet, model_option, output_dir, read_prompt,
                              snapshot_dir, with_engine, write_json)


@click.command("capture")
@model_option
@click.option("--prompt", "-p", default=None, help="Prompt text.")
@click.option("--prompt-file", default=None, metavar="FILE", help="Read the prompt from FILE ('-' for stdin).")
@click.option("--chat", is_flag=True, help="Wrap the prompt as one user turn in the model's chat template.")
@click.option("--max-new-tokens", "-n", type=click.IntRange(min=1), default=32, show_default=True)
@click.option("--run", "run_text", default="", metavar="SPEC",
              help="Run spec, e.g. 'dtype=bfloat16,attn=eager,cache=dynamic'; with --engine llama.cpp "
                   "'cache=f16|f32|q8_0|q4_0,fa=on|off,rope_base=X'; with --engine vllm "
                   "'kv_cache_dtype=auto|fp8,scales=DIR'.")
@click.option("--engine", default=None, type=click.Choice(["transformers", "llama.cpp", "vllm"]),
              help="Who runs the model (same as engine= in --run): transformers (default), llama.cpp "
                   "(the model's GGUF through llama-cpp-python) or vllm (vLLM in its own Python).")
@engine_python_option
@click.option("--force-tokens", default=None, metavar="GOLDEN",
              help="Teacher-force: feed the token ids of this golden snapshot instead of the model's own.")
@click.option("--top-k", type=click.IntRange(min=1), default=20, show_default=True,
              help="How many top logits per step to keep in meta.json.")
@click.option("--ignore-eos", is_flag=True, help="Keep generating past the end-of-sequence token.")
@click.option("--tp", type=click.IntRange(min=1), default=None,
              help="Tensor-parallel ranks (same as tp=N in --run): N processes on torch.distributed, "
                   "model sharded by transformers' tp_plan; also what torchrun --nproc-per-node N gives.")
@click.option("--shards", default=None, metavar="DIR", callback=output_dir,
              help="With --tp: folder for the per-rank shard snapshots (default OUT.shards).")
@click.option("--out", "-o", required=True, metavar="DIR", callback=snapshot_dir,
              help="Snapshot folder to write (replaced if it is one).")
@json_and_quiet
def capture_command(model_spec, prompt, prompt_file, chat, max_new_tokens, run_text, engine, force_tokens, top_k,
                    ignore_eos, tp, shards, out, json_path, quiet) -> None:
    """Greedy generation that records the final KV cache, the token ids and per-step logits.

    The snapshot (kv.safetensors + meta.json + logits.safetensors) is written atomically to
    --out. With --force-tokens the model is fed the golden run's tokens (teacher forcing), so
    its cache can be compared position by position with the golden one. With --tp N each rank
    writes its shard snapshot to OUT.shards/rank{r} and --out gets the cache rebuilt from them.
    """
    from kvlab.distributed import settle_tp
    from kvlab.runner import capture_prompt
    from kvlab.runspec import RunSpec
    from kvlab.snapshot import Snapshot

    run = RunSpec.parse(with_engine(run_text, engine))
    if run.is_engine and tp is not None:
        raise click.UsageError(f"--tp is for transformers runs, not engine={run.engine}")
    if not run.is_engine:
        run = settle_tp(run, tp)
    golden = Snapshot.load(force_tokens) if force_tokens else None
    text = read_prompt(prompt, prompt_file, required=golden is None)
    report = capture_prompt(model_spec, text, run, out=out, chat=chat, force=golden, max_new_tokens=max_new_tokens,
                            top_k=top_k, stop_at_eos=not ignore_eos, shards=shards, progress=not quiet)
    if report is None:  # a rank other than 0 under torchrun: its shard is written, rank 0 reports
        return
    _print(console(json_path), model_spec, report, out)
    write_json(json_path, report.summary)


def _print(con, model_spec: str, report, out) -> None:
    """The terminal lines of a capture: the run, the cache, the generated text, where it went."""
    from kvlab.engines import VLLM

    snap, summary = report.snapshot, report.summary
    engine = snap.meta.get("engine")
    origin = stored = ""
    if engine is not None:
        source = engine["model_dir"] if engine["name"] == VLLM else Path(engine["gguf"]).name
        origin = f"  ({engine['package']} {engine['version']}, {source})"
        cache = engine["cache"]
        stored = (f" (vLLM kv_cache_dtype {cache['kv_cache_dtype']})" if engine["name"] == VLLM
                  else f" (llama.cpp K {cache['k_type']}, V {cache['v_type']})")
    con.print(f"[bold]{model_spec}[/bold]  run: {snap.run}{origin}")
    con.print(f"prompt: {snap.n_prompt} tokens  generated: {summary['n_generated']} tokens "
              f"in {summary['seconds']:.2f}s ({summary['tokens_per_s'] or 0:.1f} tok/s)"
              + ("  (teacher-forced)" if summary["teacher_forced"] else ""))
    con.print(f"cache{stored}: {_cache_line(snap, summary['cache_bytes'])}")
    if engine is None and report.captured.tp > 1:
        _print_tp(con, report.captured)
    if summary["text"] is not None:
        con.rule("generated text")
        con.print(summary["text"], markup=False)
        con.rule()
    con.print(f"snapshot written to {out}")


def _cache_line(snap, held: int) -> str:
    """Layers, shape, dtype and the bytes held; the dequantized view's size beside them when it differs."""
    k0 = snap.keys(0)
    view = sum(snap.keys(i).nbytes + snap.values(i).nbytes for i in range(snap.n_layers))
    stored = f" held (dequantized view {view / 2**20:.2f} MiB)" if view != held else ""
    return f"{snap.n_layers} layers x {tuple(k0.shape)} {k0.dtype}, {held / 2**20:.2f} MiB{stored}"


def _print_tp(con, result) -> None:
    check = result.check
    heads = "  ".join(f"r{r} {h}" for r, h in enumerate(check.get("heads_by_rank", [])))
    con.print(f"tensor parallel: {result.tp} ranks, layout {result.layout} ({heads}); shards in {result.shards}")
    problems = check.get("n_problems", 0)
    verdict = "[green]consistent[/green]" if not problems else f"[red]{problems} problem(s)[/red]"
    con.print(f"rebuilt from the shards: replica max diff {check.get('replica_max_diff')}, "
              f"padding max abs {check.get('padding_max_abs')}: {verdict}")


COMMANDS = [capture_command]
