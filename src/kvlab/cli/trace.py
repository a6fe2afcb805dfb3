"""`kvlab trace record / check`: attention traces in GGUF, recorded from a run and checked in float64."""

from __future__ import annotations

import click

from kvlab.cli.common import (console, json_and_quiet, make_table, model_option, output_file, read_prompt,
                              with_engine, write_json)

DEFAULT_PROMPT = "The key-value cache of a transformer keeps, for every layer,"


def _parse_layers(text: str) -> list[int] | None:
    """`0,5`, `0-3,7` or `all` (None)."""
    if text.strip() == "all":
        return None
    layers: list[int] = []
    try:
        for part in (p.strip() for p in text.split(",") if p.strip()):
            first, _, last = part.partition("-")
            layers.extend(range(int(first), int(last) + 1) if last else [int(first)])
    except ValueError:
        raise click.BadParameter(f"{text!r}: give layer numbers like 0,5 or 0-3, or 'all'", param_hint="--layers") from None
    if not layers:
        raise click.BadParameter("no layers given", param_hint="--layers")
    return layers


@click.group("trace")
def trace_group() -> None:
    """Attention traces (GGUF, ggml layout): record q, k, v, mask and output; check them in float64."""


@trace_group.command("record")
@model_option
@click.option("--layers", "-l", "layers_text", default="0", show_default=True, metavar="LIST",
              help="Layers to record: 0,5 or 0-3 or all.")
@click.option("--steps", "-n", type=click.IntRange(min=1), default=8, show_default=True, help="Decode steps to record.")
@click.option("--run", "run_text", default="", metavar="SPEC", help="Run spec, e.g. 'dtype=float16,cache=mixed:bits=4'.")
@click.option("--engine", default=None, type=click.Choice(["transformers", "llama.cpp"]),
              help="Who runs the model (same as engine= in --run); llama.cpp records its own graph's tensors.")
@click.option("--prompt", "-p", default=None, help="Prompt text (default: a short sentence).")
@click.option("--prompt-file", default=None, metavar="FILE", help="Read the prompt from FILE ('-' for stdin).")
@click.option("--chat", is_flag=True, help="Wrap the prompt as one user turn in the model's chat template.")
@click.option("--prefill", is_flag=True, help="Also record the prompt's forward pass, as step 0.")
@click.option("--out", "-o", required=True, metavar="FILE", callback=output_file, help="Trace file to write (.gguf).")
@json_and_quiet
def record_command(model_spec, layers_text, steps, run_text, engine, prompt, prompt_file, chat, prefill, out,
                   json_path, quiet) -> None:
    """Record q, k, v, mask and attention output of LAYERS at each decode step into a GGUF trace.

    Tensors are named blk.{layer}.step.{n}.{q|k|v|mask|out} (plus k_quant / v_quant when the
    cache policy exports raw quantized blocks), stored in ggml conventions with their torch
    shapes and permutations in kvlab.* metadata. Step n is the n-th forward pass: 0 the
    prompt, 1.. the decode steps.
    """
    from kvlab.runner import record_prompt_trace
    from kvlab.runspec import RunSpec

    layers = _parse_layers(layers_text)
    run = RunSpec.parse(with_engine(run_text, engine))
    text = read_prompt(prompt, prompt_file, required=False) or DEFAULT_PROMPT
    summary = record_prompt_trace(model_spec, text, run, layers=layers, steps=steps, out=out, chat=chat,
                                  prefill=prefill, progress=not quiet)
    con = console(json_path)
    con.print(f"[bold]{model_spec}[/bold]  run: {summary.run}")
    con.print(f"layers {', '.join(map(str, summary.layers))}  steps {summary.steps[0]}..{summary.steps[-1]}  "
              f"{len(summary.tensors)} tensors, {summary.bytes / 2**20:.2f} MiB in {summary.seconds:.2f}s")
    con.print(f"trace written to {summary.path}")
    write_json(json_path, summary.to_dict())


@trace_group.command("check")
@click.argument("trace_path", metavar="TRACE")
@click.option("--tol", type=click.FloatRange(min=0), default=None,
              help="Relative L2 tolerance per head (default: by the coarsest stored type, 1e-4 for f32).")
@click.option("--max-abs", type=click.FloatRange(min=0), default=None, help="Also require max abs error <= this.")
@click.option("--scale", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Softmax scale when the trace records none (default head_dim ** -0.5).")
@click.option("--layout", type=click.Choice(["kvlab", "llama.cpp", "llama.cpp-views", "llama.cpp-noflash"]),
              default=None, help="How tensors without kvlab metadata are laid out (default: what the file's "
                                 "kvlab.layout says, else kvlab).")
@click.option("--deinterleave-qk", is_flag=True, help="q and k use LLaMA GGUF's interleaved RoPE channel order.")
@click.option("--rounding", type=click.Choice(["auto", "ggml-cpu", "none"]), default="auto", show_default=True,
              help="Replay the roundings of ggml's CPU flash-attention kernel in the reference (auto: for traces "
                   "kvlab recorded from llama.cpp with flash attention).")
@click.option("--per-head", is_flag=True, help="One table row per head instead of per layer and step.")
@click.option("--plot", "plot_path", default=None, metavar="PNG", callback=output_file, help="Also draw the errors per layer, step and head.")
@json_and_quiet
def check_command(trace_path, tol, max_abs, scale, layout, deinterleave_qk, rounding, per_head, plot_path,
                  json_path, quiet) -> int:
    """Recompute each recorded attention in float64 and compare element-wise with the recorded output.

    Per layer, step and query head: max abs error, relative L2 error and cosine similarity
    (never sums of outputs). Exit status 1 when a head exceeds the tolerance.
    """
    from kvlab.progress import progress_bar
    from kvlab.trace import TraceError, TraceFile, check_trace

    trace = TraceFile(trace_path, layout=layout, deinterleave_qk=deinterleave_qk)
    pairs = trace.steps()
    if not pairs:
        raise TraceError(f"{trace_path} holds no attention tensors (blk.{{layer}}.step.{{n}}.q, k, v, out)")
    with progress_bar(len(pairs), "check", enabled=not quiet) as advance:
        report = check_trace(trace, tol=tol, max_abs=max_abs, scale=scale, rounding=rounding, on_step=advance)
    if plot_path is not None:
        from kvlab.trace.plot import plot_check

        plot_check(report, plot_path)
    con = console(json_path)
    _print_report(con, report, per_head)
    if plot_path is not None:
        con.print(f"plot written to {plot_path}")
    write_json(json_path, report.to_dict())
    return 0 if report.ok else 1


def _print_report(con, report, per_head: bool) -> None:
    types = ", ".join(f"{role} {kind}" for role, kind in report.types.items())
    table = make_table(f"{report.path}  ({types})", ("layer", "step", "head", "max abs", "rel L2", "1 - cosine", ""))
    rows: dict[tuple[int, int], list] = {}
    for entry in report.entries:
        rows.setdefault((entry.layer, entry.step), []).append(entry)
    for (layer, step), entries in rows.items():
        shown = entries if per_head else [max(entries, key=lambda e: (e.rel_l2 != e.rel_l2, e.rel_l2))]
        for e in shown:
            ok = e.within(report.tolerance, report.max_abs_tolerance)
            head = str(e.head) if per_head else f"{e.head} (worst of {len(entries)})"
            table.add_row(str(layer), str(step), head, f"{e.max_abs:.3g}", f"{e.rel_l2:.3g}", f"{1 - e.cosine:.3g}",
                          "[green]ok[/green]" if ok else "[red]FAIL[/red]")
    con.print(table)
    bound = f"rel L2 <= {report.tolerance:g}" + (f", max abs <= {report.max_abs_tolerance:g}" if report.max_abs_tolerance is not None else "")
    failures = report.failures
    if failures:
        con.print(f"[red]{len(failures)} of {len(report.entries)} heads exceed {bound}[/red]")
    else:
        con.print(f"[green]all {len(report.entries)} heads within {bound}[/green]")


COMMANDS = [trace_group]
