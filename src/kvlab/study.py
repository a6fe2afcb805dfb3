"""A precision study: capture a golden run, teacher-force each test run on its tokens, diff them all.

Test specs inherit every key they leave out from the golden spec, so `--golden dtype=float32
--test dtype=bfloat16 --test attn=eager` compares one change at a time. Two snapshot folders are
diffed the same way (`compare_snapshots`). Both return `kvlab.compare.study.Study`, so the CLI,
JSON and report treat them alike; the captures go through `kvlab.runner`, the diffs through
`kvlab.compare`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from kvlab.compare.diff import diff_snapshots, refuse_evicting
from kvlab.compare.study import Study
from kvlab.compare.tolerance import ToleranceOverride
from kvlab.errors import KvlabError
from kvlab.progress import progress_bar
from kvlab.runner import ModelCache, capture_run
from kvlab.runspec import RunSpec
from kvlab.snapshot import Snapshot


def compare_snapshots(golden_path: str | Path, test_path: str | Path, *, tol: str | None = None,
                      progress: bool = False) -> Study:
    """Diff two snapshot folders (read lazily, layer by layer)."""
    override = ToleranceOverride.parse(tol)
    golden, test = Snapshot.load(golden_path), Snapshot.load(test_path)
    with progress_bar(golden.n_layers, "diff", enabled=progress) as bar:
        result = diff_snapshots(golden, test, tol=override, on_layer=bar)
    return Study(golden, [result], decode=snapshot_decoder(golden), golden_path=str(golden_path))


def snapshot_decoder(snapshot: Snapshot) -> Callable[[list[int]], str] | None:
    """Decode a snapshot's token ids with its model's tokenizer, when that loads from this machine."""
    from kvlab.models import load_tokenizer

    tokenizer = load_tokenizer(snapshot.model)
    if tokenizer is None:
        return None
    return lambda ids: tokenizer.decode(ids, skip_special_tokens=False)


def resolve_test_runs(golden: RunSpec, tests: Sequence[str]) -> list[RunSpec]:
    """Each test spec with the keys it leaves out taken from the golden spec.

    A test on another engine than the golden's takes nothing from it (transformers' keys do not
    apply to an engine, nor an engine's to transformers); a test that names no engine runs on
    the golden's.
    """
    runs = []
    for text in tests:
        if golden.is_engine and "engine=" not in text:
            text = f"engine={golden.engine}" + ("," + text if text.strip() else "")
        spec = RunSpec.parse(text)
        if spec.engine_name != golden.engine_name:
            runs.append(spec)
            continue
        given = {k: getattr(spec, k) for k in ("dtype", "attn", "cache", "tp", "device", "fa", "rope_base", "scales")
                 if getattr(spec, k) is not None}
        runs.append(replace(golden, **given))
    return runs


def run_study(
    model_spec: str,
    prompt: str,
    *,
    golden: str = "",
    tests: Sequence[str],
    chat: bool = False,
    max_new_tokens: int = 32,
    out: str | Path | None = None,
    tol: str | None = None,
    progress: bool = False,
    ignore_eos: bool = False,
) -> Study:
    """Capture the golden run, then each test run teacher-forced on the golden tokens, then diff.

    The golden run stops at the model's end-of-sequence token unless `ignore_eos`; when it stops
    before `max_new_tokens`, `Study.golden_stop` says at which step.

    With `out`, the snapshots are written to OUT/golden and OUT/test{i}-{spec} and diffed from
    disk; otherwise they stay in memory.
    """
    if not tests:
        raise KvlabError("give at least one --test SPEC")
    override = ToleranceOverride.parse(tol)
    golden_run = RunSpec.parse(golden)
    runs = resolve_test_runs(golden_run, tests)
    for run in [golden_run, *runs]:
        refuse_evicting(run)
    models = ModelCache(model_spec, progress=progress)
    first = models.get(golden_run)
    tokens, tokenizer = first.encode(prompt, chat=chat), first.tokenizer
    if tokens is None:  # a GGUF file kvlab has no tokenizer for: llama.cpp's own
        from kvlab.engines.llamacpp import tokenize

        tokens = tokenize(first.path, prompt)
    del first

    golden_snap = _capture(models, golden_run, tokens, force=None, max_new_tokens=max_new_tokens,
                           progress=progress, label="golden", stop_at_eos=not ignore_eos)
    golden_stop = _early_stop(golden_snap, max_new_tokens)
    golden_snap = _keep(golden_snap, out, "golden")
    tested: list[Snapshot] = []
    for i, (run, text) in enumerate(zip(runs, tests), start=1):
        snap = _capture(models, run, None, force=golden_snap, max_new_tokens=max_new_tokens,
                        progress=progress, label=f"test {text}")
        tested.append(_keep(snap, out, f"test{i}-{_slug(text)}"))
    models.clear()

    results = []
    for snap in tested:
        with progress_bar(golden_snap.n_layers, "diff", enabled=progress) as bar:
            results.append(diff_snapshots(golden_snap, snap, tol=override, on_layer=bar))
    golden_path = str(golden_snap.path) if golden_snap.path else None
    decode = None if tokenizer is None else (lambda ids: tokenizer.decode(ids, skip_special_tokens=False))
    return Study(golden_snap, results, decode=decode, golden_path=golden_path, golden_stop=golden_stop)


def _early_stop(golden: Snapshot, asked: int) -> dict[str, Any] | None:
    """Where a greedy golden run ended before `asked` steps (its last token was end-of-sequence)."""
    steps = len(golden.token_ids) - golden.n_prompt
    if steps >= asked or steps == 0:
        return None
    return {"step": steps - 1, "steps": steps, "asked": asked, "token": golden.token_ids[-1]}


def _capture(models: ModelCache, run: RunSpec, tokens: list[int] | None, *, force: Snapshot | None,
             max_new_tokens: int, progress: bool, label: str, stop_at_eos: bool = True) -> Snapshot:
    """One run of the study, captured by `kvlab.runner`, as a whole snapshot in this process."""
    captured = capture_run(models, run, tokens, force=force, max_new_tokens=max_new_tokens, stop_at_eos=stop_at_eos,
                           progress=progress, label=label)
    if captured.snapshot is None:
        raise KvlabError(f"the tp={captured.tp} capture returned no rebuilt snapshot")
    return captured.snapshot


def _keep(snapshot: Snapshot, out: str | Path | None, name: str) -> Snapshot:
    """Write the snapshot under `out` and reopen it lazily, or keep it in memory."""
    if out is None:
        return snapshot
    path = Path(out) / name
    snapshot.save(path)
    return Snapshot.load(path)


def _slug(spec: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "-", spec).strip("-")[:60] or "run"
