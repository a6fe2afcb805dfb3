"""What a quantized KV cache costs in each engine, side by side in one run, and kvlab's capture overhead.

On the default model, at each context length (4k and 8k tokens of essay text by default):

1. llama.cpp (flash attention on): decode step time with a q8_0 and a q4_0 cache over the f16
   cache. One prefill of the longest context per cache type; shorter contexts are the same cache
   cut back with `llama_memory_seq_rm` (positions before the cut are unchanged by causality).
2. kvlab / transformers (float32): decode step time with the mixed cache (`scheme=q8_0|q4_0`,
   `hot=128,group=32`, the compiled flash-decoding kernel) over the full-precision DynamicCache.
   One prefill of the longest context; each cache is filled with the first n positions.
3. Capture overhead: `kvlab.engines.llamacpp.capture` (greedy, eval callback, sequence state read
   back, snapshot built) against llama.cpp's plain greedy loop on the same prompt and settings.

Each step time is the median of `--steps` decode steps after two warm-up steps; ratios are over
the baseline measured in the same run.

    python bench/engines.py [--contexts 4096,8192] [--steps 8] [--capture-tokens 64] [--json FILE]

vLLM (its own venv; capture overhead against its plain generation, and its fp8 cache in the
precision study) is `python bench/engines.py --engine vllm [--new-tokens 256] [--overhead-only]`,
which runs bench/engines_vllm.py.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import numpy as np
import torch

import kvlab
from kvlab.attention import native
from kvlab.caches import parse_policy
from kvlab.engines.llamacpp import Session, Settings, capture, resolve_model
from kvlab.runspec import RunSpec
from kvlab.tasks.needle import haystack

LLAMA_CACHES = ("f16", "q8_0", "q4_0")
KVLAB_CACHES = ("dynamic", "mixed:scheme=q8_0,hot=128,group=32", "mixed:scheme=q4_0,hot=128,group=32")


def context_ids(loaded, n: int) -> list[int]:
    text = " ".join(haystack(loaded.tokenizer, n + 64))
    return loaded.tokenizer(text, add_special_tokens=False)["input_ids"][:n + 64]


def llama_steps(gguf, ids: list[int], contexts: list[int], steps: int, cache: str) -> dict[int, float]:
    """Median decode step seconds of llama.cpp with `cache` at each context length."""
    longest = max(contexts)
    out = {}
    settings = Settings(cache=cache, flash_attn=True)
    with Session(gguf.path, settings, n_ctx=longest + steps + 8, n_batch=512) as session:
        lib = session.lib
        started = time.perf_counter()
        for at in range(0, longest, 512):
            session.decode(ids[at:min(at + 512, longest)])
        print(f"llama.cpp {cache}: prefill of {longest} tokens {time.perf_counter() - started:.1f} s", flush=True)
        memory = lib.llama_get_memory(session.ctx)
        for n in sorted(contexts, reverse=True):
            lib.llama_memory_seq_rm(memory, 0, n, -1)  # back to the first n positions
            times = []
            for i in range(steps + 2):
                started = time.perf_counter()
                session.decode([ids[n + i]])
                times.append(time.perf_counter() - started)
            out[n] = statistics.median(times[2:])
    return out


def kvlab_steps(loaded, ids: list[int], contexts: list[int], steps: int) -> dict[str, dict[int, float]]:
    """Median decode step seconds of transformers with each kvlab cache at each context length."""
    from transformers import DynamicCache

    model = loaded.model
    longest = max(contexts)
    prefill = DynamicCache(config=model.config)
    started = time.perf_counter()
    with torch.no_grad():
        model(torch.tensor([ids[:longest]]), past_key_values=prefill, use_cache=True, logits_to_keep=1)
    print(f"transformers: prefill of {longest} tokens {time.perf_counter() - started:.1f} s", flush=True)
    kv = [(layer.keys, layer.values) for layer in prefill.layers]
    out: dict[str, dict[int, float]] = {}
    for spec in KVLAB_CACHES:
        policy = parse_policy(spec)
        out[spec] = {}
        for n in contexts:
            cache = policy.build(model)
            with torch.no_grad():
                for layer, (k, v) in zip(cache.layers, kv):
                    layer.update(k[:, :, :n].clone(), v[:, :, :n].clone())
            times = []
            with policy.session(model), torch.no_grad():
                for i in range(steps + 2):
                    feed = torch.tensor([[ids[n + i]]])
                    position = torch.tensor([[n + i]])
                    started = time.perf_counter()
                    model(input_ids=feed, past_key_values=cache, position_ids=position, use_cache=True,
                          logits_to_keep=1)
                    times.append(time.perf_counter() - started)
            out[spec][n] = statistics.median(times[2:])
            del cache
    return out


def plain_generate(gguf, prompt: list[int], n: int, settings: Settings) -> float:
    """llama.cpp's own greedy loop: decode, argmax, feed back (no callback, no state read)."""
    started = time.perf_counter()
    with Session(gguf.path, settings, n_ctx=len(prompt) + n + 1, n_batch=len(prompt)) as session:
        feed = list(prompt)
        for _ in range(n):
            feed = [int(np.argmax(session.decode(feed)))]
    return time.perf_counter() - started


def capture_overhead(gguf, prompt: list[int], n: int, repeats: int) -> dict:
    settings = Settings(cache="f16", flash_attn=True)
    run = RunSpec.parse("engine=llama.cpp,cache=f16,fa=on")
    plain, kv = [], []
    for _ in range(repeats):  # alternate, so drifting load hits both alike
        plain.append(plain_generate(gguf, prompt, n, settings))
        started = time.perf_counter()
        capture(gguf, prompt, run, max_new_tokens=n, stop_at_eos=False)
        kv.append(time.perf_counter() - started)
    return {"tokens": n, "prompt": len(prompt), "plain_s": statistics.median(plain), "capture_s": statistics.median(kv),
            "ratio": statistics.median(kv) / statistics.median(plain)}


def main() -> None:
    first = argparse.ArgumentParser(add_help=False)
    first.add_argument("--engine", choices=("llama.cpp", "vllm"), default="llama.cpp")
    known, rest = first.parse_known_args()
    if known.engine == "vllm":
        import sys

        import engines_vllm  # beside this file

        sys.argv = [sys.argv[0], *rest]
        engines_vllm.main()
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engine", choices=("llama.cpp", "vllm"), default="llama.cpp",
                        help="llama.cpp beside kvlab's mixed cache (default), or vLLM (bench/engines_vllm.py)")
    parser.add_argument("--contexts", default="4096,8192")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--capture-tokens", type=int, default=64)
    parser.add_argument("--capture-repeats", type=int, default=3)
    parser.add_argument("--json", default=None, metavar="FILE")
    args = parser.parse_args()
    contexts = sorted(int(c) for c in args.contexts.split(","))

    loaded = kvlab.load_model("smollm2")
    gguf = resolve_model("smollm2")
    ids = context_ids(loaded, max(contexts) + args.steps + 2)
    print(f"torch threads {torch.get_num_threads()}, {platform.processor() or platform.machine()}; "
          f"native kernel: {native.unavailable_reason() or 'built'}", flush=True)
    report: dict = {"contexts": contexts, "steps": args.steps, "llama.cpp": {}, "kvlab": {}}
    for cache in LLAMA_CACHES:
        report["llama.cpp"][cache] = llama_steps(gguf, ids, contexts, args.steps, cache)
    report["kvlab"] = kvlab_steps(loaded, ids, contexts, args.steps)
    print(f"\n{'context':>7}  {'engine':10} {'cache':40} {'step ms':>8} {'x baseline':>10}")
    for n in contexts:
        base = report["llama.cpp"]["f16"][n]
        for cache in LLAMA_CACHES:
            t = report["llama.cpp"][cache][n]
            print(f"{n:>7}  {'llama.cpp':10} {cache + ' (fa on)':40} {t * 1e3:8.2f} {t / base:10.2f}")
        base = report["kvlab"]["dynamic"][n]
        for spec in KVLAB_CACHES:
            t = report["kvlab"][spec][n]
            label = "full precision (float32 DynamicCache)" if spec == "dynamic" else spec
            print(f"{n:>7}  {'kvlab':10} {label:40} {t * 1e3:8.2f} {t / base:10.2f}")
    prompt = ids[:256]
    report["capture"] = capture_overhead(gguf, prompt, args.capture_tokens, args.capture_repeats)
    c = report["capture"]
    print(f"\ncapture overhead: {c['tokens']} tokens after a {c['prompt']}-token prompt: plain llama.cpp "
          f"{c['plain_s']:.2f} s, kvlab capture {c['capture_s']:.2f} s ({c['ratio']:.2f}x)")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(report, fh, indent=1)


if __name__ == "__main__":
    main()
