"""`kvlab capture`: run a model greedily (or teacher-forced) and save its KV cache as a snapshot."""

from __future__ import annotations

import time
from pathlib import Path

import click

from kvlab.cli.common import console, json_option, output_dir, quiet_option, read_prompt, snapshot_dir, write_json
from kvlab.cli.engine_python import engine_python_option


@click.command("capture")
@click.option("--model", "-m", "model_spec", default="smollm2", show_default=True, help="Model spec (see `kvlab models`).")
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
@json_option
@quiet_option
def capture_command(model_spec, prompt, prompt_file, chat, max_new_tokens, run_text, engine, force_tokens, top_k,
                    ignore_eos, tp, shards, out, json_path, quiet) -> None:
    """Greedy generation that records the final KV cache, the token ids and per-step logits.

    The snapshot (kv.safetensors + meta.json + logits.safetensors) is written atomically to
    --out. With --force-tokens the model is fed the golden run's tokens (teacher forcing), so
    its cache can be compared position by position with the golden one. With --tp N each rank
    writes its shard snapshot to OUT.shards/rank{r} and --out gets the cache rebuilt from them.
    """
    from dataclasses import replace

    from kvlab.distributed import capture_any, reports_steps, settle_tp
    from kvlab.models import load_model
    from kvlab.progress import progress_bar
    from kvlab.runspec import RunSpec
    from kvlab.snapshot import Snapshot

    run = RunSpec.parse(with_engine(run_text, engine))
    if run.is_engine:
        if tp is not None:
            raise click.UsageError(f"--tp is for transformers runs, not engine={run.engine}")
        _capture_engine(model_spec, prompt, prompt_file, chat, max_new_tokens, run, force_tokens, top_k, ignore_eos,
                        out, json_path, quiet)
        return
    run = settle_tp(run, tp)
    golden = Snapshot.load(force_tokens) if force_tokens else None
    text = read_prompt(prompt, prompt_file, required=golden is None)
    loaded = load_model(model_spec, replace(run, tp=None), progress=not quiet)
    tokens = loaded.encode(text, chat=chat) if text is not None else None
    steps = len(golden.token_ids) - golden.n_prompt if golden is not None else max_new_tokens
    started = time.perf_counter()
    with progress_bar(steps, "capture", enabled=not quiet and reports_steps(run)) as advance:
        result = capture_any(loaded, tokens, run, force=golden, max_new_tokens=max_new_tokens, top_k=top_k,
                             stop_at_eos=not ignore_eos, out=out, shards=shards, on_step=advance)
    elapsed = time.perf_counter() - started
    snap = result.snapshot
    if snap is None:  # a rank other than 0 under torchrun: its shard is written, rank 0 reports
        return

    summary = capture_summary(snap, out, golden is not None, elapsed, loaded.decode(snap.token_ids[snap.n_prompt:]))
    if result.tp > 1:
        summary["tp"] = {"ranks": result.tp, "shards": str(result.shards), **result.check}
    if json_path != "-":
        con = console()
        con.print(f"[bold]{model_spec}[/bold]  run: {snap.run}")
        _print_run(con, snap, summary)
        con.print(f"cache: {_cache_line(snap, summary['cache_bytes'])}")
        if result.tp > 1:
            _print_tp(con, result)
        con.rule("generated text")
        con.print(summary["text"], markup=False)
        con.rule()
        con.print(f"snapshot written to {out}")
    write_json(json_path, summary)


def with_engine(run_text: str, engine: str | None) -> str:
    """The run spec text with --engine folded in (one clear error when they disagree)."""
    if engine is None:
        return run_text
    given = [item.partition("=")[2].strip() for item in run_text.split(",") if item.strip().startswith("engine=")]
    if given and given[0] != engine:
        raise click.UsageError(f"--engine {engine} and engine={given[0]} in --run disagree")
    return run_text if given else f"engine={engine}" + ("," + run_text if run_text.strip() else "")


def _capture_engine(model_spec, prompt, prompt_file, chat, max_new_tokens, run, force_tokens, top_k, ignore_eos,
                    out, json_path, quiet) -> None:
    """`kvlab capture --engine llama.cpp`: the engine's run, recorded as a normal snapshot."""
    from kvlab.engines import VLLM, capture_engine
    from kvlab.progress import progress_bar
    from kvlab.snapshot import Snapshot

    golden = Snapshot.load(force_tokens) if force_tokens else None
    text = read_prompt(prompt, prompt_file, required=golden is None)
    if run.engine_name == VLLM:
        from kvlab.engines.vllm import resolve_model
    else:
        from kvlab.engines.llamacpp import resolve_model
    model = resolve_model(model_spec)
    tokens = model.encode(text, chat=chat) if text is not None else None
    steps = len(golden.token_ids) - golden.n_prompt if golden is not None else max_new_tokens
    started = time.perf_counter()
    with progress_bar(steps, "capture", enabled=not quiet) as advance:
        snap = capture_engine(model, tokens, run, force=golden, max_new_tokens=max_new_tokens, top_k=top_k,
                              stop_at_eos=not ignore_eos, on_step=advance,
                              prompt_text=text if tokens is None else None)
    elapsed = time.perf_counter() - started
    snap.save(out)
    generated = snap.token_ids[snap.n_prompt:]
    decoded = model.tokenizer.decode(generated, skip_special_tokens=False) if model.tokenizer is not None else None
    summary = {**capture_summary(snap, out, golden is not None, elapsed, decoded), "engine": snap.meta.get("engine")}
    if json_path != "-":
        con = console()
        engine = snap.meta["engine"]
        source = engine["model_dir"] if engine["name"] == VLLM else Path(engine["gguf"]).name
        con.print(f"[bold]{model_spec}[/bold]  run: {snap.run}  ({engine['package']} {engine['version']}, "
                  f"{source})")
        _print_run(con, snap, summary)
        cache = engine["cache"]
        stored = (f"vLLM kv_cache_dtype {cache['kv_cache_dtype']}" if engine["name"] == VLLM
                  else f"llama.cpp K {cache['k_type']}, V {cache['v_type']}")
        con.print(f"cache ({stored}): {_cache_line(snap, summary['cache_bytes'])}")
        if decoded is not None:
            con.rule("generated text")
            con.print(decoded, markup=False)
            con.rule()
        con.print(f"snapshot written to {out}")
    write_json(json_path, summary)


def capture_summary(snap, out, forced: bool, elapsed: float, text: str | None) -> dict:
    """What `kvlab capture` reports of a snapshot, whoever ran it (`cache_bytes`: what the cache held)."""
    n_generated = len(snap.token_ids) - snap.n_prompt
    return {
        "out": out,
        "model": snap.model,
        "run": snap.run,
        "n_prompt": snap.n_prompt,
        "n_generated": n_generated,
        "teacher_forced": forced,
        "seconds": elapsed,
        "tokens_per_s": n_generated / elapsed if elapsed > 0 else None,
        "cache_shape": list(snap.shape(0)),
        "cache_bytes": snap.cache_nbytes(),
        "text": text,
    }


def _print_run(con, snap, summary: dict) -> None:
    con.print(f"prompt: {snap.n_prompt} tokens  generated: {summary['n_generated']} tokens "
              f"in {summary['seconds']:.2f}s ({summary['tokens_per_s'] or 0:.1f} tok/s)"
              + ("  (teacher-forced)" if summary["teacher_forced"] else ""))


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
