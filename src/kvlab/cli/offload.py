"""`kvlab hw` and `kvlab bench decode`: hardware figures for the cost model, and the
forward-only decode benchmark of the offloaded caches."""

from __future__ import annotations

import click

from kvlab.cli.common import console, json_and_quiet, make_table, output_dir, write_json

MIB = 2**20


@click.command("hw")
@click.option("--device", default="cpu", show_default=True, help="Device to measure: cpu, cuda or cuda:N.")
@click.option("--size-mb", type=click.IntRange(min=1), default=256, show_default=True,
              help="Bytes per transfer and size of the disk file, in MiB.")
@click.option("--gemm-n", type=click.IntRange(min=16), default=None,
              help="Square GEMM size (default 4096 on CUDA, 1024 on CPU).")
@click.option("--disk-dir", default=None, metavar="DIR", callback=output_dir,
              help="Folder on the disk to measure (default: the temp folder, where tier=disk files go).")
@click.option("--repeats", type=click.IntRange(min=1), default=3, show_default=True)
@json_and_quiet
def hw_command(device, size_mb, gemm_n, disk_dir, repeats, json_path, quiet) -> None:
    """Measure host-to-device bandwidth, disk reads and GEMM throughput; save hw_metrics.json.

    The figures go to hw_metrics.json in the kvlab home (one entry per device), where every
    `auto` split (cache=flexgen:auto, cache=kvpr:auto, bench decode --auto) reads them.
    """
    from kvlab.offload.hw import measure, save_metrics

    err = console(stderr=True)
    report = (lambda name: None) if quiet or json_path == "-" else (lambda name: err.print(f"measuring {name} ..."))
    metrics = measure(device, size_mb=size_mb, gemm_n=gemm_n, disk_dir=disk_dir, repeats=repeats, on_step=report)
    path = save_metrics(metrics)
    table = make_table(f"kvlab hw: {metrics['device']} ({metrics['name']})", ("figure", "value"), labels=1)
    for key, label in (("h2d_pinned_bytes_per_s", "host->device, pinned"),
                       ("h2d_pageable_bytes_per_s", "host->device, pageable"),
                       ("d2h_bytes_per_s", "device->host"), ("device_copy_bytes_per_s", "device memory read"),
                       ("disk_read_bytes_per_s", "disk read, cold"),
                       ("disk_read_cached_bytes_per_s", "disk read, page cache")):
        value = metrics.get(key)
        table.add_row(label, "n/a (no pinned memory without CUDA)" if value is None else f"{value / 1e9:.2f} GB/s")
    for dtype, rate in metrics["gemm_flops_per_s"].items():
        table.add_row(f"GEMM {dtype} (n={metrics['gemm_n'][dtype]})", "n/a" if rate is None else f"{rate / 1e12:.3f} TFLOP/s")
    table.add_row("device memory", f"{metrics['device_memory_bytes'] / 2**30:.1f} GiB")
    con = console(json_path)
    con.print(table)
    con.print(f"saved to {path}")
    write_json(json_path, metrics)


@click.group("bench")
def bench_group() -> None:
    """Benchmarks that run a baseline and kvlab side by side."""


@bench_group.command("decode")
@click.option("--model", "-m", "model_spec", default="smollm2", show_default=True,
              help="Model spec; random:llama-mha,hidden=4096,layers=8 builds a random model of that size.")
@click.option("--run", "run_text", default="", metavar="SPEC", help="dtype, attn and device (e.g. 'dtype=float16,device=cuda').")
@click.option("--methods", default="baseline,offload,flexgen,kvpr", show_default=True,
              help="Comma list of: baseline (DynamicCache, all resident), offload, flexgen, kvpr.")
@click.option("--batch", type=click.IntRange(min=1), default=1, show_default=True)
@click.option("--prompt-len", type=click.IntRange(min=1), default=512, show_default=True)
@click.option("--gen-len", type=click.IntRange(min=1), default=32, show_default=True)
@click.option("--tier", type=click.Choice(["host", "disk"]), default="host", show_default=True,
              help="Where flexgen and kvpr keep the offloaded part.")
@click.option("--auto", is_flag=True, help="flexgen and kvpr splits from the cost model (needs `kvlab hw`).")
@click.option("--flexgen", "flexgen_params", default=None, metavar="PARAMS",
              help="flexgen parameters (default gpu_ratio=0.5), e.g. 'gpu_len=256' or 'auto,budget_gb=8'.")
@click.option("--kvpr", "kvpr_params", default=None, metavar="PARAMS",
              help="kvpr parameters (default ratio=0.5), e.g. 'recompute_len=128'.")
@click.option("--seed", type=int, default=0, show_default=True)
@json_and_quiet
def decode_command(model_spec, run_text, methods, batch, prompt_len, gen_len, tier, auto, flexgen_params,
                   kvpr_params, seed, json_path, quiet) -> None:
    """Forward-only decoding (model.forward with past_key_values) with each cache method.

    Prefill time, per-step latency p50/p90, tokens/s, peak device memory, bytes moved per
    step, speedups against `baseline` and `offload`, the cost model's predicted step time, and
    the largest logit difference from the baseline (the methods are lossless).
    """
    from kvlab.errors import KvlabError
    from kvlab.models import load_model
    from kvlab.offload.bench import bench_decode, method_policies
    from kvlab.progress import progress_bar
    from kvlab.runspec import RunSpec

    run = RunSpec.parse(run_text)
    if run.cache is not None:
        raise KvlabError("--run sets dtype, attn and device; the caches come from --methods")
    names = [name.strip() for name in methods.split(",") if name.strip()]
    policies = method_policies(names, tier=tier, auto=auto, params={"flexgen": flexgen_params, "kvpr": kvpr_params})
    loaded = load_model(model_spec, run, progress=not quiet)
    with progress_bar(len(policies) * gen_len, "decode", enabled=not quiet) as advance:
        report = bench_decode(loaded, policies, batch=batch, prompt_len=prompt_len, gen_len=gen_len, seed=seed,
                              on_step=advance)
    _print_report(console(json_path), report)
    write_json(json_path, report)


def _print_report(con, report: dict) -> None:
    title = (f"bench decode: {report['model']}  {report['dtype']} on {report['device']}  batch {report['batch']}, "
             f"prompt {report['prompt_len']}, {report['gen_len']} steps")
    table = make_table(title, ("method", "split", "prefill s", "p50 ms", "p90 ms", "pred. ms", "tok/s", "x base",
                               "x offload", "peak MiB", "MiB/step", "max |dlogit|"), labels=1)
    for r in report["results"]:
        table.add_row(
            r["method"], "-" if r["split"] is None else str(r["split"]), f"{r['prefill_s']:.3f}",
            f"{r['step_p50_s'] * 1e3:.2f}", f"{r['step_p90_s'] * 1e3:.2f}",
            "-" if r["predicted_step_s"] is None else f"{r['predicted_step_s'] * 1e3:.2f}",
            f"{r['tokens_per_s']:.1f}", _ratio(r["speedup_vs_baseline"]), _ratio(r["speedup_vs_offload"]),
            f"{r['peak_bytes'] / MIB:.1f}", f"{r['bytes_moved_per_step'] / MIB:.2f}",
            "-" if r["max_logit_diff"] is None else f"{r['max_logit_diff']:.1e}",
        )
    if not con.is_terminal:
        con.width = max(con.width, 132)  # logs and pipes: keep every column readable
    con.print(table)
    for r in report["results"]:
        con.print(f"{r['method']}: cache={r['cache']}")
    if any(r["peak_bytes_source"] == "accounted" for r in report["results"]):
        con.print("peak MiB: accounted (device == host): weights + what the cache keeps on the device + one "
                  "layer's K/V being assembled")
    con.print(f"cost model: {report['hw_metrics']}")
    for r in report["results"]:
        for text in (r["split_reason"], r["note"]):
            if text:
                con.print(f"{r['method']}: {text}")


def _ratio(value) -> str:
    return "-" if value is None else f"{value:.2f}x"


COMMANDS = [hw_command, bench_group]
