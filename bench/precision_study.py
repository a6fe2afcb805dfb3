"""What FP8 (and float16 / bfloat16) costs in accuracy, against the float32 cache, side by side.

The float32 golden run generates N tokens greedily from a chat prompt; every other run is
teacher-forced on the golden tokens (kvlab.capture), so K/V and logits are compared position by
position with kvlab.compare's metrics. Runs:

  float16, bfloat16           the whole model in that dtype (dynamic cache)
  fp8 per-tensor calibrated   float32 model, cache=fp8:scales=calibrate,granularity=tensor
  fp8 per-head calibrated     float32 model, cache=fp8:scales=calibrate,granularity=head
  fp8 prefill scales          float32 model, cache=fp8:scales=prefill (kvlab, clamped)
  transformers fp8            float32 model, QuantizedCache(backend="fp8") (cache=hf-fp8):
                              per-tensor scale frozen at the first update

Figures: K and V relative L2 error (mean and worst layer), logits KL(golden || run) mean and
max over the steps, greedy agreement (teacher-forced top-1 agreement over the N steps, and the
first step where the run's own greedy token differs: the length of the common prefix a free
run would have), and needle-in-a-haystack accuracy at about C tokens of context (each needle
answered by `model.generate` with the run's cache, substring match).

    python bench/precision_study.py [--model smollm2] [--new-tokens 256] [--needles 6]
                                    [--context 2048] [--prompt TEXT] [--json FILE] [--plot FILE.png]
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass

import torch

import kvlab
from kvlab.caches import parse_policy
from kvlab.compare import first_mismatch, kl_divergence, tensor_errors
from kvlab.tasks import score
from kvlab.tasks.needle import needle_tasks

PROMPT = ("Write a long, detailed essay on the history of the printing press: its inventors, how it spread "
          "across Europe, and how it changed science, religion and politics.")


@dataclass(frozen=True)
class Config:
    label: str
    dtype: str
    cache: str


CONFIGS = [
    Config("float16", "float16", "dynamic"),
    Config("bfloat16", "bfloat16", "dynamic"),
    Config("fp8 per-tensor calibrated", "float32", "fp8:scales=calibrate,granularity=tensor"),
    Config("fp8 per-head calibrated", "float32", "fp8:scales=calibrate,granularity=head"),
    Config("fp8 prefill scales (kvlab)", "float32", "fp8:scales=prefill,granularity=tensor"),
    Config("transformers fp8 (built-in)", "float32", "hf-fp8"),
]


def cache_errors(golden: kvlab.Snapshot, test: kvlab.Snapshot) -> dict:
    k = [tensor_errors(golden.keys(i), test.keys(i)).rel_l2 for i in range(golden.n_layers)]
    v = [tensor_errors(golden.values(i), test.values(i)).rel_l2 for i in range(golden.n_layers)]
    return {"k_rel_mean": sum(k) / len(k), "k_rel_max": max(k), "v_rel_mean": sum(v) / len(v), "v_rel_max": max(v),
            "k_rel_per_layer": k, "v_rel_per_layer": v}


def logit_figures(golden: kvlab.Snapshot, test: kvlab.Snapshot) -> dict:
    kl = kl_divergence(golden.logits(), test.logits())
    g, t = golden.greedy_ids, test.greedy_ids
    agree = sum(a == b for a, b in zip(g, t)) / len(g)
    return {"kl_mean": float(kl.mean()), "kl_max": float(kl.max()), "top1_agreement": agree,
            "first_divergence": first_mismatch(g, t), "steps": len(g)}


def needle_accuracy(loaded, cache_spec: str, tasks, max_new_tokens: int) -> dict:
    policy = parse_policy(cache_spec)
    hits, answers = 0, []
    for task in tasks:
        ids = loaded.encode(task.prompt(), chat=True)
        with torch.no_grad():
            out = loaded.model.generate(torch.tensor([ids]), past_key_values=policy.build(loaded.model),
                                        max_new_tokens=max_new_tokens, do_sample=False)
        text = loaded.tokenizer.decode(out[0, len(ids):], skip_special_tokens=True)
        hit = score(text, task.answers)["substring"]
        hits += hit
        answers.append({"id": task.id, "answer": task.answers[0], "hit": bool(hit), "text": text.strip()[:80]})
    return {"needle_accuracy": hits / len(tasks), "needles": len(tasks), "needle_answers": answers}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--prompt", default=PROMPT, help="chat prompt of the golden run")
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--needles", type=int, default=6, help="needle tasks (depths 0.1, 0.5, 0.9 in turn)")
    parser.add_argument("--context", type=int, default=2048, help="needle haystack tokens")
    parser.add_argument("--answer-tokens", type=int, default=24)
    parser.add_argument("--json", default=None, metavar="FILE")
    parser.add_argument("--plot", default=None, metavar="PNG", help="per-layer K/V error plot")
    args = parser.parse_args()

    started = time.perf_counter()
    golden_model = kvlab.load_model(args.model)
    ids = golden_model.encode(args.prompt, chat=True)
    golden = kvlab.capture(golden_model, ids, max_new_tokens=args.new_tokens, stop_at_eos=False)
    tasks = needle_tasks(golden_model.tokenizer, args.needles, context_tokens=args.context) if args.needles else []
    print(f"model {args.model}: prompt {golden.n_prompt} tokens, {len(golden.greedy_ids)} teacher-forced steps; "
          f"{len(tasks)} needles at ~{args.context} tokens of context")

    rows = []
    baseline = {"label": "float32 (golden)", "run": golden.run}
    if tasks:
        baseline.update(needle_accuracy(golden_model, "dynamic", tasks, args.answer_tokens))
    models = {"float32": golden_model}
    for config in CONFIGS:
        t0 = time.perf_counter()
        loaded = models.get(config.dtype) or models.setdefault(config.dtype,
                                                              kvlab.load_model(args.model, f"dtype={config.dtype}"))
        run = f"dtype={config.dtype},cache={config.cache}"
        test = kvlab.capture(loaded, None, run, force=golden)
        row = {"label": config.label, "run": test.run, **cache_errors(golden, test), **logit_figures(golden, test)}
        if tasks:
            row.update(needle_accuracy(loaded, config.cache, tasks, args.answer_tokens))
        row["seconds"] = time.perf_counter() - t0
        rows.append(row)
        print(f"  done {config.label} in {row['seconds']:.0f} s", flush=True)

    header = f"{'run':30}{'K rel':>9}{'K max':>9}{'V rel':>9}{'V max':>9}{'KL mean':>10}{'KL max':>9}" \
             f"{'top1':>7}{'1st div':>8}{'needle':>8}"
    print(header)
    if tasks:
        print(f"{baseline['label']:30}{'':>70}{baseline['needle_accuracy']:>8.2f}")
    for r in rows:
        div = "-" if r["first_divergence"] is None else str(r["first_divergence"])
        needle = f"{r['needle_accuracy']:.2f}" if tasks else "-"
        print(f"{r['label']:30}{r['k_rel_mean']:9.2e}{r['k_rel_max']:9.2e}{r['v_rel_mean']:9.2e}{r['v_rel_max']:9.2e}"
              f"{r['kl_mean']:10.2e}{r['kl_max']:9.2e}{r['top1_agreement']:7.3f}{div:>8}{needle:>8}")
    by_label = {r["label"]: r for r in rows}
    builtin = by_label["transformers fp8 (built-in)"]
    for label in ("fp8 per-tensor calibrated", "fp8 per-head calibrated"):
        print(f"{label} vs transformers fp8: {_versus(by_label[label], builtin, bool(tasks))}")
    print(f"total {time.perf_counter() - started:.0f} s, torch threads {torch.get_num_threads()}")

    if args.plot:
        _plot(rows, args.plot)
        print(f"plot written to {args.plot}")
    if args.json:
        from kvlab.atomic import write_text_atomic

        write_text_atomic(args.json, json.dumps({"model": args.model, "prompt_tokens": golden.n_prompt,
                                                 "golden": baseline, "runs": rows}, indent=2) + "\n")


def _versus(ours: dict, builtin: dict, needles: bool) -> str:
    """Each figure of `ours` against the built-in: relative change of errors, side by side otherwise."""
    def change(key: str) -> str:
        base = builtin[key]
        return f"{100 * (ours[key] / base - 1):+.1f}%" if base else "n/a"

    def div(row: dict) -> str:
        return "none" if row["first_divergence"] is None else str(row["first_divergence"])

    parts = [f"K rel {change('k_rel_mean')}", f"V rel {change('v_rel_mean')}", f"KL mean {change('kl_mean')}",
             f"top1 {ours['top1_agreement']:.3f} vs {builtin['top1_agreement']:.3f}",
             f"first divergence {div(ours)} vs {div(builtin)}"]
    if needles:
        parts.append(f"needles {ours['needle_accuracy']:.2f} vs {builtin['needle_accuracy']:.2f}")
    return ", ".join(parts)


def _plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4), sharey=True)
    for ax, key, title in ((axes[0], "k_rel_per_layer", "keys"), (axes[1], "v_rel_per_layer", "values")):
        for r in rows:
            ax.plot(r[key], marker=".", label=r["label"])
        ax.set_yscale("log")
        ax.set_xlabel("layer")
        ax.set_title(f"{title}: relative L2 error vs float32")
    axes[0].set_ylabel("relative L2 error")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
