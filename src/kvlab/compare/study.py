"""A precision study: capture a golden run, teacher-force each test run on its tokens, diff them all.

Test specs inherit every key they leave out from the golden spec, so `--golden dtype=float32
--test dtype=bfloat16 --test attn=eager` compares one change at a time. `Study` is also what a
plain two-snapshot diff returns, so the CLI, JSON and report treat both alike.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from kvlab.compare.diff import DiffResult, diff_snapshots
from kvlab.compare.tolerance import ToleranceOverride
from kvlab.errors import KvlabError
from kvlab.progress import progress_bar
from kvlab.runspec import RunSpec
from kvlab.snapshot import Snapshot

@dataclass
class Study:
    """One golden run against one or more test runs."""

    golden: Snapshot
    results: list[DiffResult]
    decode: Callable[[list[int]], str] | None = field(default=None, repr=False)
    golden_path: str | None = None

    @property
    def golden_run(self) -> str:
        return self.golden.run

    def golden_text(self) -> str | None:
        if self.decode is None:
            return None
        return self.decode(self.golden.token_ids[self.golden.n_prompt:])

    def token_text(self, token: int | None) -> str | None:
        return None if token is None or self.decode is None else self.decode([token])

    def to_json(self) -> dict[str, Any]:
        """`kvlab diff --json`: `{"golden": RUN, "tests": [...]}` plus the model and token counts."""
        return {
            "golden": self.golden_run,
            "tests": [r.to_json() for r in self.results],
            "model": self.golden.model,
            "n_prompt": self.golden.n_prompt,
            "n_tokens": len(self.golden.token_ids),
            "golden_path": self.golden_path,
            "golden_text": self.golden_text(),
        }


def compare_snapshots(golden_path: str | Path, test_path: str | Path, *, tol: str | None = None,
                      progress: bool = False) -> Study:
    """Diff two snapshot folders (read lazily, layer by layer)."""
    override = ToleranceOverride.parse(tol)
    golden, test = Snapshot.load(golden_path), Snapshot.load(test_path)
    with progress_bar(golden.n_layers, "diff", enabled=progress) as bar:
        result = diff_snapshots(golden, test, tol=override, on_layer=bar)
    return Study(golden, [result], golden_path=str(golden_path))


def resolve_test_runs(golden: RunSpec, tests: Sequence[str]) -> list[RunSpec]:
    """Each test spec with the keys it leaves out taken from the golden spec."""
    runs = []
    for text in tests:
        spec = RunSpec.parse(text)
        given = {k: getattr(spec, k) for k in ("dtype", "attn", "cache", "tp", "device") if getattr(spec, k) is not None}
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
) -> Study:
    """Capture the golden run, then each test run teacher-forced on the golden tokens, then diff.

    With `out`, the snapshots are written to OUT/golden and OUT/test{i}-{spec} and diffed from
    disk; otherwise they stay in memory.
    """
    if not tests:
        raise KvlabError("give at least one --test SPEC")
    override = ToleranceOverride.parse(tol)
    golden_run = RunSpec.parse(golden)
    runs = resolve_test_runs(golden_run, tests)
    models = ModelCache(model_spec, progress=progress)
    first = models.get(golden_run)
    tokens, tokenizer = first.encode(prompt, chat=chat), first.tokenizer
    del first

    golden_snap = capture_run(models, golden_run, tokens, force=None, max_new_tokens=max_new_tokens,
                              progress=progress, label="golden")
    golden_snap = _keep(golden_snap, out, "golden")
    tested: list[Snapshot] = []
    for i, (run, text) in enumerate(zip(runs, tests), start=1):
        snap = capture_run(models, run, None, force=golden_snap, max_new_tokens=max_new_tokens,
                           progress=progress, label=f"test {text}")
        tested.append(_keep(snap, out, f"test{i}-{_slug(text)}"))
    models.clear()

    results = []
    for snap in tested:
        with progress_bar(golden_snap.n_layers, "diff", enabled=progress) as bar:
            results.append(diff_snapshots(golden_snap, snap, tol=override, on_layer=bar))
    golden_path = str(golden_snap.path) if golden_snap.path else None
    return Study(golden_snap, results, decode=lambda ids: tokenizer.decode(ids, skip_special_tokens=False),
                 golden_path=golden_path)


def capture_run(models: "ModelCache", run: RunSpec, tokens: list[int] | None, *, force: Snapshot | None,
                max_new_tokens: int, progress: bool = False, label: str = "capture") -> Snapshot:
    """Greedy (or teacher-forced on `force`) capture of one run, here or on its tensor-parallel ranks."""
    from kvlab.distributed import capture_any, reports_steps

    steps = len(force.token_ids) - force.n_prompt if force is not None else max_new_tokens
    with progress_bar(steps, label, enabled=progress and reports_steps(run)) as bar:
        result = capture_any(models.get(run), tokens, run, force=force, max_new_tokens=max_new_tokens, on_step=bar)
    if result.snapshot is None:
        raise KvlabError(f"the tp={run.tp} capture returned no rebuilt snapshot")
    return result.snapshot


class ModelCache:
    """The model loaded for the latest (dtype, device); runs that share them share one load."""

    def __init__(self, spec: str, progress: bool = False) -> None:
        self.spec = spec
        self.progress = progress
        self._key: tuple | None = None
        self._loaded = None

    def get(self, run: RunSpec):
        from kvlab.models import load_model

        full = run.with_defaults()
        key = (full.dtype, full.device)
        if key != self._key:
            self._loaded = None  # free the previous model before loading the next
            self._loaded = load_model(self.spec, RunSpec(dtype=full.dtype, device=full.device), progress=self.progress)
            self._key = key
        return self._loaded

    def clear(self) -> None:
        self._key, self._loaded = None, None


def _keep(snapshot: Snapshot, out: str | Path | None, name: str) -> Snapshot:
    """Write the snapshot under `out` and reopen it lazily, or keep it in memory."""
    if out is None:
        return snapshot
    path = Path(out) / name
    snapshot.save(path)
    return Snapshot.load(path)


def _slug(spec: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "-", spec).strip("-")[:60] or "run"
