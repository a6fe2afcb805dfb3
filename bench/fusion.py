"""Fused prefill vs full prefill on the default model, side by side in one process.

Tasks of 8 chunks of 512 tokens plus a question (about 4.1k tokens; by default the mixed suite:
needles of ten forms, several needles per prompt, two-hop questions and kvqa, in turn), answered
by full prefill (the baseline), a3 and cacheblend at rate 0.15, task by task so that drift hits
all alike. The store is filled first; TTFT then covers the store reads, moving the chunks, the
fused prefill and the first token (wall clock; the CPU time this process spent up to the first
token is shown too, a steadier figure on a shared machine). Goals for a3 at rate 0.15: TTFT at
least 3.5x lower than full prefill; full prefill's answer on at least 90% of the tasks it gets
right.

    python bench/fusion.py [--n 16] [--kinds mixed|needle,kvqa,...] [--rate 0.15] [--store memory://]
                           [--threads N] [--model smollm2] [--profile]
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch

import kvlab
from kvlab.fusion.evaluate import evaluate, expand, make_tasks
from kvlab.fusion.store import open_store
from kvlab.fusion.strategies import split_strategies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--n", type=int, default=16, help="tasks of each source in --kinds")
    parser.add_argument("--rate", type=float, default=0.15)
    parser.add_argument("--chunks", type=int, default=8)
    parser.add_argument("--chunk-tokens", type=int, default=512)
    parser.add_argument("--strategies", default="a3,cacheblend")
    parser.add_argument("--store", default="memory://")
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--kinds", default="mixed", help="task sources to run (mixed, needle, needles, twohop, "
                        "kvqa or a task file), comma-separated")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument("--profile", action="store_true",
                        help="also profile one fused prefill of the first strategy (torch profiler, CPU kernels)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    loaded = kvlab.load_model(args.model)
    runs = expand(split_strategies(args.strategies), [args.rate])
    print(f"model {args.model}, {args.chunks} chunks x {args.chunk_tokens} tokens + question, n={args.n} per task "
          f"kind, rate {args.rate}, store {args.store}, torch threads {torch.get_num_threads()}, "
          f"{platform.processor() or platform.machine()}", flush=True)
    report = {}
    with open_store(args.store) as store:
        for kind in args.kinds.split(","):
            tasks = make_tasks(loaded, kind, args.n, n_chunks=args.chunks, chunk_tokens=args.chunk_tokens)
            started = time.perf_counter()
            result = evaluate(loaded, tasks, runs, store, max_new_tokens=args.max_new_tokens,
                              chunk_tokens=args.chunk_tokens)
            print(f"\n{kind}: {len(tasks)} tasks, {result.prompt_tokens} prompt tokens on average, "
                  f"{time.perf_counter() - started:.0f} s")
            groups = [(kind, None)] + ([(k, k) for k in result.kinds()] if len(result.kinds()) > 1 else [])
            for title, group in groups:
                rows = {row["label"]: row for row in result.rows(group)}
                report[title] = list(rows.values())
                width = max(12, *(len(name) + 2 for name in rows))
                print(f"{title} ({next(iter(rows.values()))['n']} tasks)")
                print(f"{'':{width}}{'accuracy':>10}{'95% CI':>12}{'=full':>7}{'TTFT s':>8}{'speedup':>9}{'CPU s':>8}"
                      f"{'CPU ratio':>10}{'TPOT ms':>9}{'recomp':>8}")
                for name, row in rows.items():
                    tpot = f"{row['tpot_s'] * 1000:.1f}" if row["tpot_s"] else "-"
                    ci = f"{row['accuracy_low']:.2f}-{row['accuracy_high']:.2f}" if row["accuracy_low"] is not None else "-"
                    print(f"{name:{width}}{row['accuracy']:10.3f}{ci:>12}{row['agreement_with_full']:7.2f}"
                          f"{row['ttft_s']:8.2f}{row['speedup']:8.2f}x{row['ttft_cpu_s']:8.2f}{row['speedup_cpu']:9.2f}x"
                          f"{tpot:>9}{row['recomputed_fraction']:8.1%}")
    first = {row["label"]: row for row in report.get(args.kinds.split(",")[0], [])}
    if "a3" in first:
        a3 = first["a3"]
        agree = a3.get("agreement_where_full_right")
        print(f"\ngoals for a3 at rate {args.rate} ({a3['n']} tasks, full prefill right on {a3.get('n_full_right')})")
        print(f"  TTFT >= 3.5x lower than full prefill:           {a3['speedup']:.2f}x  {_mark(a3['speedup'] >= 3.5)}")
        if agree is not None:
            print(f"  full prefill's answer where it is right >= 90%: {agree:.2f}  {_mark(agree >= 0.9)}")
    if args.profile:
        _profile(loaded, args)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(report, handle, indent=2)


def _profile(loaded, args) -> None:
    """Where one fused prefill's time goes: share of CPU time per kernel, and the chunk reads."""
    from torch.profiler import ProfilerActivity, profile

    from kvlab.fusion.fused import load_chunks, prefill
    from kvlab.fusion.prompt import task_prompt
    from kvlab.fusion.strategies import make_strategy

    kind = args.kinds.split(",")[0]
    task = make_tasks(loaded, kind, 1, n_chunks=args.chunks, chunk_tokens=args.chunk_tokens)[0]
    prompt = task_prompt(loaded, task, chunk_tokens=args.chunk_tokens)
    strategy = make_strategy(split_strategies(args.strategies)[0], args.rate)
    with open_store("memory://") as store:
        prefill(loaded, prompt, strategy, store)  # fills the store and warms up
        started = time.perf_counter()
        load_chunks(loaded, store, prompt, surprisal=False)
        loading = time.perf_counter() - started
        started = time.perf_counter()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            prefill(loaded, prompt, strategy, store)
        seconds = time.perf_counter() - started
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events)
    print(f"\nprofile of one {strategy.spec()} prefill ({kind}, {seconds:.2f} s under the profiler; "
          f"reading the chunks alone: {loading:.2f} s)")
    for event in events[:6]:
        print(f"  {event.key:50} {event.self_cpu_time_total / total:6.1%}")


def _mark(ok: bool) -> str:
    return "met" if ok else "NOT met"


if __name__ == "__main__":
    main()
