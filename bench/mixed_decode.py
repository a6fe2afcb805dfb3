"""Mixed cache on the default model: decode attention time, memory, peers, needle accuracy.

Everything is measured in one process, side by side, on the same keys, values and queries:

1. Attention per decode step (summed over the 30 layers) at each context length, for
   full-precision SDPA (the baseline), the mixed cache read by dequantize-everything-then-SDPA,
   and the mixed cache read by flash-decoding, with PyTorch ops ("flash torch") and with the
   compiled kernel ("flash native", when it builds); cache memory against float16; and the attention
   error against float64 attention over the full-precision cache. The keys, values and each
   layer's decode query come from a real prefill of essay text and one real decode step.
2. Peers on the same data: transformers' QuantizedCache (fp8 backend; HQQ and quanto when
   importable), each step = its `update()` (which dequantizes) + SDPA.
3. Needle-in-a-haystack accuracy (substring match) for the full cache and mixed caches: one
   full-precision prefill per needle, then each cache decodes greedily from the same first token.

    python bench/mixed_decode.py [--contexts 4096,8192] [--repeats 5] [--needles 4]
        [--needle-contexts 2048,4096] [--skip-needles] [--json FILE]

HQQ / quanto are not dependencies; to include them without touching the environment:
`pip install --no-deps --target DIR hqq==0.2.8.post1 einops termcolor optimum-quanto==0.2.7 ninja`
then run with `PYTHONPATH=src:DIR`.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import itertools
import json
import platform
import statistics
import time

import torch
from transformers import QuantizedCache
from transformers.integrations.sdpa_attention import sdpa_attention_forward

import kvlab
from kvlab.attention import native
from kvlab.attention.flash_decoding import flash_decode, native_flash_decode
from kvlab.caches import parse_policy
from kvlab.compare import tensor_errors
from kvlab.decode import decode_n_tokens
from kvlab.intercept import intercept, register_attention
from kvlab.progress import progress_bar
from kvlab.tasks import score
from kvlab.tasks.needle import haystack, needle_tasks

MIXED = ["bits=2", "bits=4", "bits=8", "scheme=q4_0", "scheme=q8_0", "scheme=fp8"]
NEEDLE_MIXED = ["bits=2", "bits=4", "bits=8"]
MIXED_COMMON = "hot=128,group=32"
NEW_TOKENS = 24


# ---- data ---------------------------------------------------------------------------------

def context_ids(loaded, n: int) -> list[int]:
    text = " ".join(haystack(loaded.tokenizer, n + 64))
    return loaded.tokenizer(text, add_special_tokens=False)["input_ids"][:n + 1]


class QueryRecorder:
    """One decode step under a registered attention that records each layer's query, then runs SDPA."""

    name = "kvlab_bench_record"

    def __init__(self):
        self.queries: dict[int, torch.Tensor] = {}
        self.modules: dict[int, torch.nn.Module] = {}

    def __call__(self, module, query, key, value, attention_mask, **kwargs):
        self.queries[module.layer_idx] = query.detach().clone()
        self.modules[module.layer_idx] = module
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def decode_inputs(loaded, ids: list[int], contexts: list[int]):
    """Per context: per layer (module, query, keys, values) of the decode step at that position."""
    from transformers import DynamicCache

    model = loaded.model
    longest = max(contexts)
    cache = DynamicCache(config=model.config)
    started = time.perf_counter()
    with torch.no_grad():
        model(torch.tensor([ids[:longest]]), past_key_values=cache, use_cache=True, logits_to_keep=1)
    print(f"prefill of {longest} tokens: {time.perf_counter() - started:.1f} s", flush=True)
    recorder = QueryRecorder()
    register_attention(recorder.name, recorder)
    out = {}
    with intercept(model, attention=recorder.name):
        for n in sorted(contexts, reverse=True):
            cache.crop(n - cache.get_seq_length()) if cache.get_seq_length() > n else None
            with torch.no_grad():
                model(torch.tensor([[ids[n]]]), past_key_values=cache, use_cache=True, logits_to_keep=1)
            out[n] = [(recorder.modules[i], recorder.queries[i], layer.keys.clone(), layer.values.clone())
                      for i, layer in enumerate(cache.layers)]
            cache.crop(-1)
    return out


# ---- timing -------------------------------------------------------------------------------

def reference(module, q, k, v) -> torch.Tensor:
    groups = q.shape[1] // k.shape[1]
    k, v = k.double().repeat_interleave(groups, 1), v.double().repeat_interleave(groups, 1)
    return torch.softmax(q.double() @ k.transpose(-1, -2) * module.scaling, -1) @ v


def sdpa(module, q, k, v) -> torch.Tensor:
    return sdpa_attention_forward(module, q, k, v, None, scaling=module.scaling)[0].transpose(1, 2)


def mixed_layers(loaded, spec: str, layers):
    policy = parse_policy(f"mixed:{spec},{MIXED_COMMON}")
    cache = policy.build(loaded.model)
    with torch.no_grad():
        for layer, (_, _, k, v) in zip(cache.layers, layers):
            layer.update(k, v)  # what a prefill stores
    return cache


def flash(module, q, layer) -> torch.Tensor:
    """Flash-decoding with PyTorch ops: one split dequantized at a time."""
    parts = itertools.chain(layer.cold_parts(q.dtype), [(layer.keys, layer.values)])
    return flash_decode(q, parts, module.scaling)


def flash_native(module, q, layer) -> torch.Tensor:
    """Flash-decoding with the compiled kernel: each block dequantized inside the loop."""
    return native_flash_decode(q, layer.native_parts(), layer.keys, layer.values, module.scaling)


def dequant_sdpa(module, q, layer) -> torch.Tensor:
    k, v = layer.dequantized()
    return sdpa(module, q, k, v)


def time_step(fn_per_layer, n_layers: int) -> float:
    started = time.perf_counter()
    with torch.no_grad():
        for i in range(n_layers):
            fn_per_layer(i)
    return time.perf_counter() - started


def peer_specs(wanted: set[str]) -> list[tuple[str, str, dict]]:
    peers = [("hf-fp8", "fp8", {})] if "fp8" in wanted else []
    if "hqq" in wanted and importlib.util.find_spec("hqq") is not None:
        peers += [("hf-hqq-4bit", "hqq", dict(nbits=4, q_group_size=32, axis_key=1, axis_value=1, residual_length=128)),
                  ("hf-hqq-2bit", "hqq", dict(nbits=2, q_group_size=32, axis_key=1, axis_value=1, residual_length=128))]
    if "quanto" in wanted and importlib.util.find_spec("optimum") is not None \
            and importlib.util.find_spec("optimum.quanto") is not None:
        peers += [("hf-quanto-4bit", "quanto", dict(nbits=4, q_group_size=32, residual_length=128))]
    for name in sorted(wanted - {"fp8", "hqq", "quanto"}):
        print(f"unknown peer {name!r}; allowed: fp8, hqq, quanto")
    return peers


def tensors_in(obj, seen=None) -> int:
    """Bytes of every distinct tensor reachable from obj (quantized payloads, scales, residuals)."""
    seen = set() if seen is None else seen
    if isinstance(obj, torch.Tensor):
        key = (obj.data_ptr(), obj.numel(), obj.dtype)
        if key in seen or obj.numel() == 0:
            return 0
        seen.add(key)
        inner = [getattr(obj, a) for a in ("_data", "_scale", "_shift")
                 if isinstance(getattr(obj, a, None), torch.Tensor)]
        return sum(tensors_in(t, seen) for t in inner) if inner else obj.numel() * obj.element_size()
    if isinstance(obj, (tuple, list)):
        return sum(tensors_in(o, seen) for o in obj)
    if isinstance(obj, dict):
        return sum(tensors_in(o, seen) for o in obj.values())
    return 0


def peer_layers(loaded, backend: str, kwargs: dict, layers):
    cache = QuantizedCache(backend=backend, config=loaded.model.config, **kwargs)
    with torch.no_grad():
        for layer, (_, _, k, v) in zip(cache.layers, layers):
            layer.update(k[:, :, :-1], v[:, :, :-1])  # the context before this step
    return cache


def peer_bytes(layer) -> int:
    return tensors_in([layer._quantized_keys, layer._quantized_values, layer.keys, layer.values])


def attention_section(loaded, inputs, repeats: int, peers: set[str]) -> list[dict]:
    results = []
    n_layers = len(next(iter(inputs.values())))
    for n, layers in sorted(inputs.items()):
        fp16_bytes = sum(2 * (k.numel() + v.numel()) for _, _, k, v in layers)
        refs = [reference(m, q, k, v) for m, q, k, v in layers]

        def errors(outputs):
            e = [tensor_errors(o.double(), r) for o, r in zip(outputs, refs)]
            return max(x.max_abs for x in e), max(x.rel_l2 for x in e)

        methods: dict[str, dict] = {}
        methods["full-sdpa"] = dict(step=lambda i: sdpa(*layers[i][:2], *layers[i][2:]), bytes=2 * fp16_bytes,
                                    outputs=lambda: [sdpa(m, q, k, v) for m, q, k, v in layers])
        for spec in MIXED:
            cache = mixed_layers(loaded, spec, layers)
            nbytes = sum(layer.nbytes for layer in cache.layers)
            methods[f"mixed {spec} dequant+sdpa"] = dict(
                step=lambda i, c=cache: dequant_sdpa(layers[i][0], layers[i][1], c.layers[i]), bytes=nbytes,
                outputs=lambda c=cache: [dequant_sdpa(m, q, c.layers[i]) for i, (m, q, _, _) in enumerate(layers)])
            kernels = [("flash torch", flash)] + ([("flash native", flash_native)] if native.available() else [])
            for label, fn in kernels:
                methods[f"mixed {spec} {label}"] = dict(
                    step=lambda i, c=cache, f=fn: f(layers[i][0], layers[i][1], c.layers[i]), bytes=nbytes,
                    outputs=lambda c=cache, f=fn: [f(m, q, c.layers[i]) for i, (m, q, _, _) in enumerate(layers)])
        for label, backend, kwargs in peer_specs(peers):
            try:
                cache = peer_layers(loaded, backend, kwargs, layers)
            except Exception as err:  # a peer that does not run here is reported, not fatal
                print(f"{label}: cannot run here: {type(err).__name__}: {str(err).splitlines()[0][:120]}")
                continue

            def peer_step(i, c=cache):
                layer = c.layers[i]
                state = dict(layer.__dict__)  # update() reassigns its tensors: put them back after
                _, q, k, v = layers[i]
                started = time.perf_counter()
                keys, values = layer.update(k[:, :, -1:], v[:, :, -1:])
                out = sdpa(layers[i][0], q, keys, values)
                elapsed = time.perf_counter() - started
                layer.__dict__.update(state)
                return out, elapsed

            methods[label + " update+sdpa"] = dict(
                step=None, peer_step=peer_step, bytes=sum(peer_bytes(layer) for layer in cache.layers),
                outputs=lambda f=peer_step: [f(i)[0] for i in range(n_layers)])

        times: dict[str, list[float]] = {name: [] for name in methods}
        with progress_bar(repeats * len(methods), f"attention at {n} tokens", enabled=True) as advance:
            for _ in range(repeats):
                for name, method in methods.items():
                    if method.get("peer_step") is not None:
                        with torch.no_grad():
                            times[name].append(sum(method["peer_step"](i)[1] for i in range(n_layers)))
                    else:
                        times[name].append(time_step(method["step"], n_layers))
                    advance(1)
        base = min(times["full-sdpa"])  # ratios from the fastest repeat: the least disturbed by other load
        for name, method in methods.items():
            with torch.no_grad():
                max_abs, rel_l2 = errors(method["outputs"]())
            t = statistics.median(times[name])
            results.append({"context": n, "method": name, "step_ms": 1e3 * t, "step_min_ms": 1e3 * min(times[name]),
                            "vs_full": min(times[name]) / base, "cache_bytes": method["bytes"],
                            "vs_float16": method["bytes"] / fp16_bytes,
                            "attn_max_abs": max_abs, "attn_rel_l2": rel_l2})
            print_row(results[-1])
    return results


def print_header() -> None:
    print(f"\n{'context':>7} {'method':34} {'median ms':>9} {'min ms':>8} {'min/full':>8} {'MiB':>8} {'x fp16':>7} "
          f"{'attn max|d|':>11} {'rel L2':>8}", flush=True)


def print_row(r: dict) -> None:
    print(f"{r['context']:>7} {r['method']:34} {r['step_ms']:9.2f} {r['step_min_ms']:8.2f} {r['vs_full']:8.2f} "
          f"{r['cache_bytes'] / 2**20:8.2f} {r['vs_float16']:7.3f} {r['attn_max_abs']:11.2e} {r['attn_rel_l2']:8.1e}",
          flush=True)


# ---- memory -------------------------------------------------------------------------------

MEMORY_SPECS = ["bits=2", "bits=4", "bits=4,group=64", "bits=8", "scheme=q4_0", "scheme=q8_0", "scheme=fp8"]


def memory_section(loaded, contexts: list[int]) -> list[dict]:
    """Exact cache bytes (payload + scales + zeros + hot window) against float16, for runs in
    float32 and bfloat16 (the hot window is kept in the run's dtype). Bytes do not depend on the
    values, so zeros of the model's cache shape stand in for real keys and values."""
    from kvlab.caches.mixed_layer import cache_nbytes
    from kvlab.model_facts import model_shape

    shape = model_shape(loaded.config)
    rows = []
    for n in contexts:
        x = torch.zeros(1, shape["n_kv_heads"], n, shape["head_dim"])
        fp16 = 2 * 2 * x.numel() * shape["n_layers"]
        for dtype in (torch.float32, torch.bfloat16):
            for spec in MEMORY_SPECS:
                policy = parse_policy(f"mixed:hot=128,{spec}")
                cache = policy.build(loaded.model)
                for layer in cache.layers:
                    layer.update(x.to(dtype), x.to(dtype))
                nbytes = cache_nbytes(cache)
                rows.append({"context": n, "dtype": str(dtype).removeprefix("torch."), "spec": policy.spec(),
                             "bytes": nbytes, "vs_float16": nbytes / fp16})
    return rows


# ---- needles ------------------------------------------------------------------------------

def greedy(model, cache, first: int, steps: int, session=None) -> list[int]:
    with session if session is not None else contextlib.nullcontext():
        return [first, *decode_n_tokens(model, cache, [first], steps - 1, attention_mask=False).ids]


def needle_section(loaded, n: int, contexts: list[int]) -> list[dict]:
    from transformers import DynamicCache

    model = loaded.model
    configs = ["full"] + NEEDLE_MIXED
    hits = {(c, name): [] for c in contexts for name in configs}
    total = n * len(contexts)
    with progress_bar(total, "needles", enabled=True) as advance:
        for context in contexts:
            for task in needle_tasks(loaded.tokenizer, n, context, (0.1, 0.5, 0.9), 512, 0):
                ids = loaded.encode(task.prompt(), chat=True)
                cache = DynamicCache(config=model.config)
                with torch.no_grad():
                    out = model(torch.tensor([ids]), past_key_values=cache, use_cache=True, logits_to_keep=1)
                first = int(out.logits[0, -1].argmax())
                kv = [(layer.keys, layer.values) for layer in cache.layers]
                for name in configs:
                    if name == "full":
                        run_cache, session = cache, None
                    else:
                        policy = parse_policy(f"mixed:{name},{MIXED_COMMON}")
                        run_cache, session = policy.build(model), policy.session(model)
                        for layer, (k, v) in zip(run_cache.layers, kv):
                            layer.update(k, v)
                    answer = loaded.tokenizer.decode(greedy(model, run_cache, first, NEW_TOKENS, session),
                                                     skip_special_tokens=True)
                    hits[(context, name)].append(score(answer, task.answers)["substring"])
                print(f"needle {task.id}: " + ", ".join(f"{name} {hits[(context, name)][-1]:.0f}" for name in configs),
                      flush=True)
                advance(1)
    return [{"context": c, "cache": name, "accuracy": statistics.mean(v), "n": len(v)}
            for (c, name), v in hits.items()]


# ---- report -------------------------------------------------------------------------------

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--contexts", default="4096,8192")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--needles", type=int, default=4, help="needles per context length")
    parser.add_argument("--needle-contexts", default="2048,4096")
    parser.add_argument("--peers", default="fp8,hqq", help="fp8, hqq, quanto (quanto is very slow on CPU)")
    parser.add_argument("--skip-needles", action="store_true")
    parser.add_argument("--skip-attention", action="store_true")
    parser.add_argument("--json", default=None, metavar="FILE")
    args = parser.parse_args()

    loaded = kvlab.load_model(args.model)
    print(f"native kernel: {native.unavailable_reason() or native.library_path()}")
    print(f"model {args.model}, torch threads {torch.get_num_threads()}, {platform.processor() or platform.machine()}, "
          f"mixed caches: {MIXED_COMMON},split={parse_policy('mixed').split}")
    report: dict = {"model": args.model, "mixed": MIXED_COMMON}
    if not args.skip_attention:
        contexts = [int(c) for c in args.contexts.split(",")]
        inputs = decode_inputs(loaded, context_ids(loaded, max(contexts)), contexts)
        print_header()
        report["attention"] = attention_section(loaded, inputs, args.repeats, set(args.peers.split(",")))
        print("goals: 4-bit memory <= 0.3x float16; flash-decoding step <= 1.5x full-precision SDPA")
    contexts = [int(c) for c in args.contexts.split(",")]
    report["memory"] = memory_section(loaded, contexts)
    print(f"\n{'context':>7} {'run dtype':9} {'cache':58} {'MiB':>8} {'x fp16':>7}")
    for r in report["memory"]:
        print(f"{r['context']:>7} {r['dtype']:9} {r['spec']:58} {r['bytes'] / 2**20:8.2f} {r['vs_float16']:7.3f}")
    if not args.skip_needles:
        contexts = [int(c) for c in args.needle_contexts.split(",")]
        rows = needle_section(loaded, args.needles, contexts)
        report["needles"] = rows
        print(f"\n{'context':>7} {'cache':10} {'accuracy':>9} {'n':>3}   (substring match, {NEW_TOKENS} new tokens)")
        for r in rows:
            print(f"{r['context']:>7} {r['cache']:10} {r['accuracy']:9.2f} {r['n']:>3}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(report, fh, indent=1)


if __name__ == "__main__":
    main()
