"""Capture vs plain `model.generate` on the default model, side by side in one process.

Both run greedy decoding of the same chat prompt for exactly N new tokens with a DynamicCache.
capture additionally keeps every step's full logits and top-k and exports the cache; the
snapshot write is timed separately. Runs alternate so drift hits both alike.

    python bench/capture_overhead.py [--new-tokens 256] [--repeats 3] [--model smollm2]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time

import torch

import kvlab

PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."


def time_generate(loaded, ids: list[int], n: int) -> float:
    start = time.perf_counter()
    loaded.model.generate(torch.tensor([ids]), max_new_tokens=n, min_new_tokens=n, do_sample=False)
    return time.perf_counter() - start


def time_capture(loaded, ids: list[int], n: int) -> tuple[float, kvlab.Snapshot]:
    start = time.perf_counter()
    snap = kvlab.capture(loaded, ids, max_new_tokens=n, stop_at_eos=False)
    return time.perf_counter() - start, snap


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    loaded = kvlab.load_model(args.model)
    ids = loaded.encode(PROMPT, chat=True)
    time_generate(loaded, ids, 8)  # warm-up both paths
    time_capture(loaded, ids, 8)

    generate_s, capture_s = [], []
    snap = None
    for _ in range(args.repeats):
        generate_s.append(time_generate(loaded, ids, args.new_tokens))
        seconds, snap = time_capture(loaded, ids, args.new_tokens)
        capture_s.append(seconds)
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        snap.save(f"{tmp}/snap")
        save_s = time.perf_counter() - start

    g, c = statistics.median(generate_s), statistics.median(capture_s)
    print(f"model {args.model}, prompt {len(ids)} tokens, {args.new_tokens} new tokens, "
          f"{args.repeats} runs each, torch threads {torch.get_num_threads()}, {platform.processor() or platform.machine()}")
    print(f"{'':24}{'median s':>10}{'min s':>10}{'tok/s':>10}")
    print(f"{'generate (baseline)':24}{g:10.2f}{min(generate_s):10.2f}{args.new_tokens / g:10.1f}")
    print(f"{'kvlab capture':24}{c:10.2f}{min(capture_s):10.2f}{args.new_tokens / c:10.1f}")
    print(f"capture / generate = {c / g:.3f}  (overhead {100 * (c / g - 1):+.1f}%, goal <= +10%)")
    print(f"snapshot write: {save_s:.2f} s for {sum(snap.keys(i).nbytes * 2 for i in range(snap.n_layers)) / 2**20:.1f} MiB "
          f"of cache + {snap.logits().nbytes / 2**20:.1f} MiB of logits")


if __name__ == "__main__":
    main()
