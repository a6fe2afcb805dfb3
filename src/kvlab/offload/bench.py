"""`kvlab bench decode`: forward-only decoding with each cache method, side by side in one run.

Every method gets the same model, the same seeded token ids (batch x (prompt + gen)), a fresh
cache from its policy, and the same loop: one prefill `model(...)` call, then one call per
new token with `past_key_values` (no `generate`, no sampling: the tokens fed are fixed, so the
methods' logits can be compared with the baseline's). Measured: prefill time, per-step latency
(p50, p90), tokens per second, peak device memory, bytes moved per step; beside them the cost
model's predicted step time (when `kvlab hw` has measured this device).

Peak memory is `torch.cuda.max_memory_allocated` on CUDA. On a CPU device, device == host and
there is nothing separate to measure, so it is accounted: the weights, what the cache keeps on
the device (all K/V for `baseline`; two layers for `offload`; resident part, landing buffers and
rotary rows for the split caches) and one layer's K/V assembled for attention.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch

from kvlab.caches.registry import CachePolicy, make_policy
from kvlab.decode import Step, decode_n_tokens, policy_cache
from kvlab.errors import KvlabError
from kvlab.offload.costmodel import Hardware, ModelShape, predict_step
from kvlab.offload.hw import load_metrics

METHODS = ("baseline", "offload", "flexgen", "kvpr")
DEFAULT_PARAMS = {"flexgen": "gpu_ratio=0.5", "kvpr": "ratio=0.5"}


@dataclass
class DecodeResult:
    method: str
    cache: str
    prefill_s: float
    step_p50_s: float
    step_p90_s: float
    tokens_per_s: float
    peak_bytes: int
    peak_bytes_source: str
    bytes_moved_per_step: float
    split: int | None
    split_reason: str
    predicted_step_s: float | None
    max_logit_diff: float | None = None
    speedup_vs_baseline: float | None = None
    speedup_vs_offload: float | None = None
    note: str = ""


def method_policies(methods: list[str], *, tier: str = "host", auto: bool = False,
                    params: dict[str, str | None] | None = None) -> list[tuple[str, CachePolicy]]:
    """(method, policy) for each name: baseline = dynamic, offload, flexgen and kvpr with `params`
    (default: `gpu_ratio=0.5` / `ratio=0.5`, or `auto` with `auto`) on `tier`."""
    params = params or {}
    out = []
    for method in methods:
        if method not in METHODS:
            raise KvlabError(f"unknown method {method!r}; allowed: {', '.join(METHODS)}")
        if method == "baseline":
            out.append((method, make_policy("dynamic")))
        elif method == "offload":
            out.append((method, make_policy("offload")))
        else:
            text = params.get(method) or ("auto" if auto else DEFAULT_PARAMS[method])
            items = [item.strip() for item in text.split(",") if item.strip()]
            if not any(item.startswith("tier=") for item in items):
                items.append(f"tier={tier}")
            try:
                out.append((method, make_policy(method, items)))
            except ValueError as err:
                raise KvlabError(str(err)) from None
    return out


def bench_decode(loaded, methods: list[tuple[str, CachePolicy]], *, batch: int = 1, prompt_len: int = 512,
                 gen_len: int = 32, seed: int = 0,
                 on_step: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Run every (method, policy) and return `{"results": [...], ...}` (DESIGN.md's keys and more)."""
    if batch < 1 or prompt_len < 1 or gen_len < 1:
        raise KvlabError("batch, prompt length and generation length must all be at least 1")
    model = loaded.model
    device = model.device
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 256, (batch, prompt_len + gen_len), generator=generator).to(device)
    hardware, shape, hw_note = _cost_inputs(model, batch)
    _run(model, make_policy("dynamic"), ids[:, : min(prompt_len, 16) + 2], min(prompt_len, 16), None)  # warm-up

    results: list[DecodeResult] = []
    reference: list[torch.Tensor] | None = None
    for method, policy in methods:
        run = _run(model, policy, ids, prompt_len, on_step)
        steps = run["steps"]
        split = getattr(run["cache"], "split", None)
        predicted = None
        if hardware is not None:
            tier_hw = _tier_hardware(hardware, policy, model)
            predicted = predict_step(method, prompt_len + gen_len // 2, shape, tier_hw, split or 0)
        diff = None
        if method == "baseline" and reference is None:
            reference = run["logits"]
        if reference is not None:
            diff = max(float((a - b).abs().max()) for a, b in zip(run["logits"], reference))
        note = policy.note(device) if hasattr(policy, "note") else ""
        results.append(DecodeResult(
            method=method, cache=policy.spec(), prefill_s=run["prefill_s"],
            step_p50_s=statistics.median(steps), step_p90_s=_quantile(steps, 0.9),
            tokens_per_s=batch * len(steps) / sum(steps), peak_bytes=run["peak_bytes"],
            peak_bytes_source=run["peak_source"], bytes_moved_per_step=run["bytes_moved"] / len(steps),
            split=split, split_reason=getattr(run["cache"], "split_reason", ""), predicted_step_s=predicted,
            max_logit_diff=diff, note=note,
        ))
        if hasattr(run["cache"], "close"):
            run["cache"].close()  # frees tier=disk files and landing buffers now
    _speedups(results)
    return {
        "model": loaded.spec, "device": str(device), "dtype": str(model.dtype).removeprefix("torch."),
        "batch": batch, "prompt_len": prompt_len, "gen_len": gen_len,
        "hw_metrics": hw_note, "results": [asdict(r) for r in results],
    }


def _run(model, policy: CachePolicy, ids: torch.Tensor, prompt_len: int, on_step) -> dict[str, Any]:
    device = model.device
    cuda = device.type == "cuda"
    batch, total = ids.shape
    weights = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    peak_cache = moved = moved_before = 0
    logits: list[torch.Tensor] = []

    def observe(step: Step) -> None:
        nonlocal peak_cache, moved, moved_before
        logits.append(step.logits.float().cpu())
        if step.index == 0:  # the prefill
            moved_before = _bytes_moved(step.cache)
            return
        moved += _step_bytes(step.cache)
        peak_cache = max(peak_cache, _cache_device_bytes(step.cache, device))
        if on_step is not None:
            on_step(1)

    with policy_cache(model, policy, batch_size=batch, max_length=total) as cache:
        if cuda:
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        decoded = decode_n_tokens(model, cache, ids[:, :prompt_len], total - prompt_len + 1,
                                  forced=ids[:, prompt_len:], callback=observe, attention_mask=False)
        moved += _bytes_moved(cache) - moved_before
    if cuda:
        peak, source = int(torch.cuda.max_memory_allocated(device)), "cuda.max_memory_allocated"
    else:
        peak, source = weights + peak_cache + _assembled_layer_bytes(cache), "accounted"
    return {"cache": cache, "prefill_s": decoded.seconds[0], "steps": decoded.seconds[1:], "logits": logits,
            "bytes_moved": moved, "peak_bytes": peak, "peak_source": source}


def _bytes_moved(cache) -> int:
    return int(cache.bytes_moved()) if hasattr(cache, "bytes_moved") else 0


def _step_bytes(cache) -> int:
    """transformers' offloaded cache keeps no counter: each step moves every layer in and out."""
    if hasattr(cache, "bytes_moved") or not getattr(cache, "offloading", False):
        return 0
    return 2 * sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values)
                   if t is not None)


def _cache_device_bytes(cache, device: torch.device) -> int:
    if hasattr(cache, "device_bytes"):
        return int(cache.device_bytes())
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values)
               if t is not None and t.device == device)


def _assembled_layer_bytes(cache) -> int:
    """One layer's full K/V: what attention reads while the cache is assembling or growing it."""
    length = cache.get_seq_length()
    for layer in cache.layers:
        keys = getattr(layer, "keys", None)
        if keys is not None and keys.numel():
            return 2 * keys.numel() * keys.element_size() * length // max(1, keys.shape[-2])
        far = getattr(layer, "far", None)
        if far is not None:
            return far.row_bytes * length
    return 0


def _cost_inputs(model, batch: int):
    shape = ModelShape.from_model(model, batch=batch)
    try:
        metrics = load_metrics(str(model.device), need="gemm_flops_per_s")
    except KvlabError as err:
        return None, shape, f"no prediction: {err}"
    return metrics, shape, f"{metrics.get('device')} measured {metrics.get('measured')}"


def _tier_hardware(metrics: dict[str, Any], policy: CachePolicy, model):
    return Hardware.from_metrics(metrics, dtype=model.dtype, tier=getattr(policy, "tier", "host"))


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def _speedups(results: list[DecodeResult]) -> None:
    by_method = {r.method: r for r in results}
    for r in results:
        if "baseline" in by_method:
            r.speedup_vs_baseline = r.tokens_per_s / by_method["baseline"].tokens_per_s
        if "offload" in by_method:
            r.speedup_vs_offload = r.tokens_per_s / by_method["offload"].tokens_per_s
