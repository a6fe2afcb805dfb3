"""Engines beside transformers: what capturing vLLM's cache costs, and what its fp8 cache costs in accuracy.

1. Capture overhead: vLLM's plain greedy generation of N tokens (its own process, no connector,
   no hooks) against `kvlab capture --engine vllm` teacher-forced on the same N tokens (KV
   connector, input hooks, per-position logits, files, kvlab reading them back). Both include
   vLLM's start; the in-engine seconds are listed apart, with vLLM's own prefill of the same
   tokens (what the teacher-forced capture runs, without connector, hooks or logits).
2. Precision study, all teacher-forced on the float32 golden run's N greedy tokens, K/V error and
   logits (KL, top-1) against it, beside bench/precision_study.py's rows:
     transformers fp8 (built-in)  QuantizedCache(backend="fp8") (cache=hf-fp8)
     kvlab fp8 cache              cache=fp8 with kvlab's calibrated per-tensor scales
     vLLM auto                    engine=vllm (float32 cache)
     vLLM fp8 with kvlab scales   engine=vllm,kv_cache_dtype=fp8 on `kvlab scales export` of the same scales
     vLLM fp8 without scales      engine=vllm,kv_cache_dtype=fp8 (scale 1.0: the silent fallback)

    python bench/engines_vllm.py [--new-tokens 256] [--json FILE] [--overhead-only]      (needs .venv-vllm or KVLAB_VLLM_PYTHON)
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import kvlab
from kvlab import embedded
from kvlab.engines import vllm as engine
from kvlab.runspec import RunSpec

sys.path.insert(0, str(Path(__file__).resolve().parent))
from precision_study import PROMPT, cache_errors, logit_figures  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--prompt", default=PROMPT)
    parser.add_argument("--json", default=None, metavar="FILE")
    parser.add_argument("--overhead-only", action="store_true", help="skip the precision study")
    args = parser.parse_args()
    python = engine.find_python()

    started = time.perf_counter()
    golden_model = kvlab.load_model("smollm2")
    ids = golden_model.encode(args.prompt, chat=True)
    golden = kvlab.capture(golden_model, ids, max_new_tokens=args.new_tokens, stop_at_eos=False)
    print(f"smollm2: prompt {golden.n_prompt} tokens, {len(golden.greedy_ids)} teacher-forced steps; "
          f"vLLM {engine.PINNED_VERSION} at {python}")

    with tempfile.TemporaryDirectory(prefix="kvlab-bench-") as tmp:
        work = Path(tmp)
        from kvlab.scales.api import calibrate_to_files
        from kvlab.scales.vllm_export import export_checkpoint

        scales_file = work / "scales" / "kv_cache_scales.safetensors"
        checkpoint = work / "ckpt"
        if not args.overhead_only:
            calibrate_to_files(golden_model, work / "scales", granularity="tensor", fmt="compressed-tensors")
            export_checkpoint(work / "scales", embedded.ensure_converted(), checkpoint)

        overhead = _overhead(golden, work, args.new_tokens)
        rows = []
        for label, run in () if args.overhead_only else (
            ("transformers fp8 (built-in)", "cache=hf-fp8"),
            ("kvlab fp8 cache", f"cache=fp8:scales={scales_file}"),
            ("vLLM auto", "engine=vllm"),
            ("vLLM fp8 with kvlab scales", f"engine=vllm,kv_cache_dtype=fp8,scales={checkpoint}"),
            ("vLLM fp8 without scales", "engine=vllm,kv_cache_dtype=fp8"),
        ):
            t0 = time.perf_counter()
            if run.startswith("engine="):
                test = engine.capture("smollm2", None, RunSpec.parse(run), force=golden)
            else:
                test = kvlab.capture(golden_model, None, run, force=golden)
            rows.append({"label": label, "run": run, **cache_errors(golden, test), **logit_figures(golden, test),
                         "seconds": time.perf_counter() - t0})
            print(f"  done {label} in {rows[-1]['seconds']:.0f} s", flush=True)

    print(f"capture overhead over {args.new_tokens} tokens (wall, including vLLM's start):")
    print(f"  vLLM plain greedy generation   {overhead['plain_wall']:7.1f} s  "
          f"(load {overhead['plain_load']:.1f} s, generate {overhead['plain_generate']:.1f} s, the same tokens as "
          f"one prefill {overhead['plain_prefill']:.1f} s)")
    print(f"  kvlab capture --engine vllm    {overhead['capture_wall']:7.1f} s  "
          f"(load {overhead['capture_load']:.1f} s, teacher-forced prefill {overhead['capture_forced']:.1f} s)")
    header = f"{'run':30}{'K rel':>9}{'K max':>9}{'V rel':>9}{'V max':>9}{'KL mean':>10}{'KL max':>9}{'top1':>7}"
    print(header)
    for r in rows:
        print(f"{r['label']:30}{r['k_rel_mean']:9.2e}{r['k_rel_max']:9.2e}{r['v_rel_mean']:9.2e}{r['v_rel_max']:9.2e}"
              f"{r['kl_mean']:10.2e}{r['kl_max']:9.2e}{r['top1_agreement']:7.3f}")
    print(f"total {time.perf_counter() - started:.0f} s")
    if args.json:
        from kvlab.atomic import write_text_atomic

        write_text_atomic(args.json, json.dumps({"prompt_tokens": golden.n_prompt, "steps": args.new_tokens,
                                                 "overhead": overhead, "runs": rows}, indent=2) + "\n")


def _overhead(golden: kvlab.Snapshot, work: Path, new_tokens: int) -> dict:
    prompt = golden.token_ids[: golden.n_prompt]
    settings = engine.Settings()
    t0 = time.perf_counter()
    forced = golden.token_ids[golden.n_prompt:]
    plain = engine.run_worker(embedded.ensure_converted(), prompt, forced, settings, work / "plain",
                              max_new_tokens=new_tokens, plain=True)
    plain_wall = time.perf_counter() - t0
    t0 = time.perf_counter()
    snap = engine.capture("smollm2", None, RunSpec(engine="vllm"), force=golden)
    capture_wall = time.perf_counter() - t0
    seconds = snap.meta["engine"]["seconds"]
    return {"plain_wall": plain_wall, "plain_load": plain.result["seconds"]["load"],
            "plain_generate": plain.result["seconds"]["generate"], "plain_prefill": plain.result["seconds"]["prefill"],
            "capture_wall": capture_wall,
            "capture_load": seconds["load"], "capture_forced": seconds["forced"]}


if __name__ == "__main__":
    main()
