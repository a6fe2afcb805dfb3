"""KVPR vs transformers' offloaded cache vs a FlexGen split at equal device memory, side by side.

On CUDA (the figure BENCHMARKS.md asks for): a random multi-head model in float16 at batch >= 8
and prompt >= 1024, KVPR at the cost model's split (`kvpr:auto`, from `kvlab hw` figures), the
offloaded cache, and FlexGen with the device memory KVPR used; goal: KVPR >= 1.3x the offloaded
cache's decode throughput. The fully resident baseline runs too, and is reported as not fitting
when it runs out of device memory.

Without CUDA it runs the same comparison on the CPU (device == host) with the far part in
memory-mapped files (`tier=disk`) on a smaller model, and says so: those are CPU figures.

    python bench/offload_decode.py [--model SPEC] [--batch 8] [--prompt-len 1024] [--gen-len 32]
                                   [--tier host|disk] [--kvpr PARAMS]
"""

from __future__ import annotations

import argparse
import platform

import torch

import kvlab
from kvlab.caches.registry import make_policy
from kvlab.offload.bench import bench_decode, method_policies

GIB = 2**30


def run_one(loaded, method: str, policy, args) -> dict | None:
    try:
        return bench_decode(loaded, [(method, policy)], batch=args.batch, prompt_len=args.prompt_len,
                            gen_len=args.gen_len)["results"][0]
    except torch.OutOfMemoryError:
        torch.cuda.empty_cache()
        return None


def main() -> None:
    cuda = torch.cuda.is_available()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="random:llama-mha,hidden=4096,layers=8" if cuda
                        else "random:llama-mha,hidden=1024,layers=8")
    parser.add_argument("--batch", type=int, default=8 if cuda else 4)
    parser.add_argument("--prompt-len", type=int, default=1024 if cuda else 512)
    parser.add_argument("--gen-len", type=int, default=32 if cuda else 16)
    parser.add_argument("--tier", choices=["host", "disk"], default="host" if cuda else "disk")
    parser.add_argument("--kvpr", default="auto", help="kvpr parameters (default: the cost model's split)")
    args = parser.parse_args()

    run = "dtype=float16,device=cuda" if cuda else "dtype=float32,device=cpu"
    loaded = kvlab.load_model(args.model, run)
    rows = {}
    kvpr_policy = method_policies(["kvpr"], tier=args.tier, params={"kvpr": args.kvpr})[0][1]
    rows["kvpr"] = run_one(loaded, "kvpr", kvpr_policy, args)
    rows["offload"] = run_one(loaded, "offload", make_policy("offload"), args)
    if rows["kvpr"] is not None:  # FlexGen with the device memory KVPR used
        budget = rows["kvpr"]["peak_bytes"] / GIB
        flexgen = make_policy("flexgen", ["auto", f"budget_gb={budget:.6g}", "reserve_gb=0", f"tier={args.tier}"])
        rows["flexgen"] = run_one(loaded, "flexgen", flexgen, args)
    rows["baseline"] = run_one(loaded, "baseline", make_policy("dynamic"), args)

    where = torch.cuda.get_device_name() if cuda else f"CPU ({platform.machine()}, {torch.get_num_threads()} threads)"
    print(f"{args.model} {run} on {where}; batch {args.batch}, prompt {args.prompt_len}, {args.gen_len} steps, "
          f"tier {args.tier}" + ("" if cuda else "  -- CPU figures: device == host, transfers are copies"))
    print(f"{'method':10}{'cache':44}{'split':>7}{'tok/s':>9}{'p50 ms':>9}{'pred ms':>9}{'peak GiB':>10}{'MiB/step':>10}")
    for method, r in rows.items():
        if r is None:
            print(f"{method:10}{'does not fit in device memory':44}")
            continue
        pred = "-" if r["predicted_step_s"] is None else f"{r['predicted_step_s'] * 1e3:.1f}"
        print(f"{method:10}{r['cache']:44}{str(r['split'] if r['split'] is not None else '-'):>7}"
              f"{r['tokens_per_s']:9.1f}{r['step_p50_s'] * 1e3:9.1f}{pred:>9}{r['peak_bytes'] / GIB:10.2f}"
              f"{r['bytes_moved_per_step'] / 2**20:10.1f}")
    if rows["kvpr"] and rows["offload"]:
        print(f"kvpr / offload throughput = {rows['kvpr']['tokens_per_s'] / rows['offload']['tokens_per_s']:.2f}x "
              "(goal >= 1.3x on a GPU)")
    if rows["kvpr"] and rows.get("flexgen"):
        print(f"kvpr / flexgen (equal device memory) = "
              f"{rows['kvpr']['tokens_per_s'] / rows['flexgen']['tokens_per_s']:.2f}x")
    if rows["kvpr"] and rows["kvpr"]["split_reason"]:
        print(f"kvpr split: {rows['kvpr']['split_reason']}")


if __name__ == "__main__":
    main()
