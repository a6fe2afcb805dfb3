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

from kvlab.compare.diff import DiffResult, diff_snapshots, refuse_evicting
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
    golden_stop: dict[str, Any] | None = None  # the golden run ended at an end-of-sequence token early

    def stop_note(self) -> str | None:
        """One line when the golden run stopped before the steps asked for (its end-of-sequence token)."""
        stop = self.golden_stop
        if stop is None:
            return None
        text = self.token_text(stop["token"])
        token = repr(text) if text is not None else str(stop["token"])
        return (f"the golden run stopped early at step {stop['step']} (end-of-sequence token "
                f"{token}) after {stop['steps']} of the {stop['asked']} "
                "steps asked: there is less to compare; --ignore-eos keeps it generating")

    @property
    def golden_run(self) -> str:
        return self.golden.run

    def golden_text(self) -> str | None:
        if self.decode is None:
            return None
        return self.decode(self.golden.token_ids[self.golden.n_prompt:])

    def token_text(self, token: int | None) -> str | None:
        return None if token is None or self.decode is None else self.decode([token])

    def prompt_text(self) -> str | None:
        return None if self.decode is None else self.decode(self.golden.token_ids[: self.golden.n_prompt])

    def tokens(self) -> list[str] | None:
        """The text of the token at each position, or None without a tokenizer."""
        if self.decode is None:
            return None
        return [self.decode([t]) for t in self.golden.token_ids]

    def position_token(self, position: int) -> str:
        """The token at `position` for a line of text: its text quoted, else its id."""
        ids = self.golden.token_ids
        if not 0 <= position < len(ids):
            return ""
        if self.decode is None:
            return f"[id {ids[position]}]"
        from kvlab.compare.plots import short_token

        return repr(short_token(self.decode([ids[position]]), 24))

    def to_dict(self) -> dict[str, Any]:
        """`kvlab diff --json`: `{"golden": RUN, "tests": [...]}` plus the model and token counts."""
        return {
            "golden": self.golden_run,
            "tests": [r.to_dict() for r in self.results],
            "model": self.golden.model,
            "n_prompt": self.golden.n_prompt,
            "n_tokens": len(self.golden.token_ids),
            "golden_path": self.golden_path,
            "golden_text": self.golden_text(),
            "golden_stopped_early": self.golden_stop,
        }


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

    golden_snap = capture_run(models, golden_run, tokens, force=None, max_new_tokens=max_new_tokens,
                              progress=progress, label="golden", stop_at_eos=not ignore_eos)
    golden_stop = _early_stop(golden_snap, max_new_tokens)
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
    decode = None if tokenizer is None else (lambda ids: tokenizer.decode(ids, skip_special_tokens=False))
    return Study(golden_snap, results, decode=decode, golden_path=golden_path, golden_stop=golden_stop)


def _early_stop(golden: Snapshot, asked: int) -> dict[str, Any] | None:
    """Where a greedy golden run ended before `asked` steps (its last token was end-of-sequence)."""
    steps = len(golden.token_ids) - golden.n_prompt
    if steps >= asked or steps == 0:
        return None
    return {"step": steps - 1, "steps": steps, "asked": asked, "token": golden.token_ids[-1]}


def capture_run(models: "ModelCache", run: RunSpec, tokens: list[int] | None, *, force: Snapshot | None,
                max_new_tokens: int, progress: bool = False, label: str = "capture",
                stop_at_eos: bool = True) -> Snapshot:
    """Greedy (or teacher-forced on `force`) capture of one run: by its engine, here, or on its ranks."""
    from kvlab.distributed import capture_any, reports_steps

    steps = len(force.token_ids) - force.n_prompt if force is not None else max_new_tokens
    if run.is_engine:
        from kvlab.engines import VLLM, capture_engine

        model = models.spec if run.engine_name == VLLM else models.gguf()  # vLLM runs the model folder
        with progress_bar(steps, label, enabled=progress) as bar:
            return capture_engine(model, tokens, run, force=force, max_new_tokens=max_new_tokens,
                                  on_step=bar, stop_at_eos=stop_at_eos)
    with progress_bar(steps, label, enabled=progress and reports_steps(run)) as bar:
        result = capture_any(models.get(run), tokens, run, force=force, max_new_tokens=max_new_tokens, on_step=bar,
                             stop_at_eos=stop_at_eos)
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

    def gguf(self):
        """The model as a GGUF file for an engine run (resolved once)."""
        if getattr(self, "_gguf", None) is None:
            from kvlab.engines.llamacpp import resolve_model

            self._gguf = resolve_model(self.spec)
        return self._gguf

    def get(self, run: RunSpec):
        from kvlab.models import load_model

        if run.is_engine:
            return self.gguf()
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
