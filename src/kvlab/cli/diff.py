"""`kvlab diff`: find the step, layer and KV head where a test cache leaves the golden one."""

from __future__ import annotations

import click

from kvlab.cli.common import (console, engine_python_option, json_and_quiet, make_table, output_dir, output_file,
                              read_prompt, write_json)


@click.command("diff")
@click.argument("snapshots", nargs=-1, metavar="[GOLDEN TEST]")
@click.option("--model", "-m", "model_spec", default=None, help="Capture mode: model spec (see `kvlab models`).")
@click.option("--prompt", "-p", default=None, help="Capture mode: prompt text.")
@click.option("--prompt-file", default=None, metavar="FILE", help="Capture mode: read the prompt from FILE ('-': stdin).")
@click.option("--chat", is_flag=True, help="Wrap the prompt as one user turn in the model's chat template.")
@click.option("--golden", "golden_spec", default=None, metavar="SPEC",
              help="Capture mode: run spec of the golden run (default: float32, sdpa, dynamic cache).")
@click.option("--test", "test_specs", multiple=True, metavar="SPEC",
              help="Capture mode: a test run spec; keys it leaves out come from --golden. Repeat for a study.")
@click.option("--max-new-tokens", "-n", type=click.IntRange(min=1), default=32, show_default=True,
              help="Capture mode: tokens the golden run generates.")
@click.option("--ignore-eos", is_flag=True,
              help="Capture mode: the golden run keeps generating past the end-of-sequence token.")
@click.option("--tol", default=None, metavar="X|KEY=X,...",
              help="Divergence threshold on per-row rel-L2: one number, or per precision "
                   "(float32=,float16=,bfloat16=,float8_e4m3fn=,float8_e5m2=,lossy=,engine=). Default follows the dtype.")
@click.option("--out", "-o", default=None, metavar="DIR", callback=output_dir,
              help="Capture mode: write the snapshots (and, unless --report says otherwise, report.html) to DIR.")
@click.option("--report", "report_path", default=None, metavar="FILE", callback=output_file, help="Write the HTML report to FILE.")
@engine_python_option
@json_and_quiet
def diff_command(snapshots, model_spec, prompt, prompt_file, chat, golden_spec, test_specs, max_new_tokens,
                 ignore_eos, tol, out, report_path, json_path, quiet) -> None:
    """Diff two snapshots, or capture a golden run and teacher-forced test runs and diff those.

    \b
      kvlab diff GOLDEN TEST [--report report.html] [--json out.json]
      kvlab diff --model M --prompt TEXT --golden dtype=float32 --test dtype=bfloat16 [--test ...]

    Reports, per (layer, KV head, position) of K and V, max abs error, relative L2 error and
    cosine; per step, KL divergence and top-1 agreement of the logits and the first step where
    the test's own greedy token differs; the first position where any row exceeds the tolerance,
    and what that means for the way the runs differ. Caches are streamed layer by layer.
    """
    from pathlib import Path

    from kvlab.study import compare_snapshots, run_study

    capture_mode = any(x is not None for x in (model_spec, prompt, prompt_file, golden_spec)) or bool(test_specs)
    if snapshots and capture_mode:
        raise click.UsageError("give two snapshots, or --model/--prompt/--golden/--test, not both")
    if snapshots:
        if len(snapshots) != 2:
            raise click.UsageError(f"give exactly two snapshots, GOLDEN and TEST (got {len(snapshots)})")
        if out is not None:
            raise click.UsageError("--out is for capture mode; use --report / --json with two snapshots")
        study = compare_snapshots(snapshots[0], snapshots[1], tol=tol, progress=not quiet)
    else:
        if not test_specs:
            raise click.UsageError("give GOLDEN TEST snapshots, or --model M --prompt TEXT --test SPEC")
        text = read_prompt(prompt, prompt_file)
        study = run_study(model_spec or "smollm2", text, golden=golden_spec or "", tests=test_specs, chat=chat,
                          max_new_tokens=max_new_tokens, out=out, tol=tol, progress=not quiet,
                          ignore_eos=ignore_eos)
        if report_path is None and out is not None:
            report_path = str(Path(out) / "report.html")

    if report_path is not None:
        from kvlab.compare.report import write_report

        write_report(study, report_path)
    con = console(json_path)
    print_summary(con, study)
    if report_path is not None:
        con.print(f"report written to {report_path}")
    if json_path is not None:
        con.print(f"json written to {json_path}")
    write_json(json_path, study.to_dict())


def print_summary(con, study) -> None:
    """The terminal summary: per test, first divergence, diagnosis, logits, worst layers and heads."""
    from rich.markup import escape

    from kvlab.compare.fmt import fmt_num, fmt_pct

    golden = study.golden
    con.print(f"[bold]golden[/bold] {study.golden_run}   model {golden.model.get('spec', '?')}, "
              f"{golden.n_prompt} prompt + {len(golden.token_ids) - golden.n_prompt} generated tokens")
    note = study.stop_note()
    if note:
        con.print(f"[yellow]note:[/yellow] {note}")
    for i, result in enumerate(study.results, start=1):
        con.rule(f"test {i}: {result.label}")
        con.print(f"run: {result.test_run}")
        first = result.first_divergence
        tol = result.tolerance
        con.print(f"tolerance: rel-L2 > {fmt_num(tol.rel_l2)} per (layer, KV head, position) row ({tol.basis})")
        if first is None:
            con.print("first divergence: [green]none[/green]")
        else:
            error = "NaN/Inf" if first.nonfinite else f"rel-L2 {fmt_num(first.error)}"
            token = escape(study.position_token(first.position))
            con.print(f"first divergence: [red]position {first.position}[/red] {token} "
                      f"({result.describe_position(first.position)}), layer {first.layer}, KV head {first.head}, "
                      f"{first.tensor}, {error}")
            worst = first.worst
            if worst is not None and (worst.layer, worst.head, worst.tensor) != (first.layer, first.head, first.tensor):
                shown = "NaN/Inf" if worst.nonfinite else f"rel-L2 {fmt_num(worst.error)}"
                con.print(f"  worst at that position: layer {worst.layer}, KV head {worst.head}, {worst.tensor}, {shown}")
        con.print(f"diagnosis: {result.diagnosis.text}", markup=False)
        logits = result.logits
        mismatch = "n/a" if logits.top1 is None else "none"
        if logits.first_token_mismatch is not None:
            g, t = study.token_text(logits.golden_token), study.token_text(logits.test_token)
            mismatch = f"step {logits.first_token_mismatch}" + (f" ({g!r} vs {t!r})" if g is not None else "")
        con.print(f"logits over {logits.steps} steps: KL mean {fmt_num(logits.kl_mean)} (max {fmt_num(logits.kl_max)}), "
                  f"top-1 agreement {fmt_pct(logits.top1_agreement)}, first token mismatch: {mismatch}", markup=False)
        if result.cache.nonfinite_rows:
            where = result.cache.nonfinite[0]
            con.print(f"[red]NaN/Inf in {result.cache.nonfinite_rows} cache rows[/red]; first: {where.snapshot} "
                      f"{where.tensor}, layer {where.layer}, KV head {where.head}, position {where.position}")

        layers = make_table("worst layers", ("layer", "K max abs", "K rel-L2", "K cosine", "V max abs", "V rel-L2",
                                             "V cosine"))
        k, v = result.cache.layer_errors("keys"), result.cache.layer_errors("values")
        rows = 5 if len(study.results) == 1 else 3
        for layer in result.worst_layers(rows):
            layers.add_row(str(layer), *_cells(k[layer], fmt_num), *_cells(v[layer], fmt_num))
        heads = make_table("worst KV heads", ("layer", "KV head", "K rel-L2", "K cosine", "V rel-L2", "V cosine"))
        hk, hv = result.cache.head_errors("keys"), result.cache.head_errors("values")
        for layer, head in result.worst_heads(rows):
            a, b = hk[layer][head], hv[layer][head]
            heads.add_row(str(layer), str(head), fmt_num(a.rel_l2), fmt_num(a.cosine, 6), fmt_num(b.rel_l2),
                          fmt_num(b.cosine, 6))
        con.print(layers)
        con.print(heads)
    con.rule()
    con.print(_study_table(study))


def _study_table(study):
    """One row per test run: first divergence and logits agreement side by side."""
    from kvlab.compare.fmt import fmt_num, fmt_pct

    columns = ("test (change)", "tol", "first divergence", "KL mean", "top-1", "token mismatch")
    table = make_table("summary", columns, labels=len(columns))
    for result in study.results:
        first = result.first_divergence
        where = "none" if first is None else f"{first.position}, L{first.layer}, H{first.head} {first.tensor[0].upper()}"
        mismatch = result.logits.first_token_mismatch
        table.add_row(result.label, fmt_num(result.tolerance.rel_l2), where, fmt_num(result.logits.kl_mean),
                      fmt_pct(result.logits.top1_agreement), "none" if mismatch is None else f"step {mismatch}")
    return table


def _cells(errors, fmt) -> list[str]:
    return [fmt(errors.max_abs), fmt(errors.rel_l2), fmt(errors.cosine, 6)]


COMMANDS = [diff_command]
