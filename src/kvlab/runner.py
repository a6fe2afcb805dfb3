"""Capture a run from a model spec, whoever runs it: its engine, this process or tensor-parallel ranks.

`kvlab capture` and a precision study (`kvlab.study`) both come here, so they load, capture and
report a run alike. An engine run goes to its engine (`kvlab.engines`); a transformers run to
`kvlab.distributed.capture_any`, the one place that decides whether it runs in this process or
on tensor-parallel ranks.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvlab.capture import DEFAULT_TOP_K
from kvlab.distributed import Captured, capture_any
from kvlab.engines import LLAMA_CPP, VLLM
from kvlab.errors import KvlabError
from kvlab.progress import progress_bar
from kvlab.runspec import RunSpec
from kvlab.snapshot import Snapshot


class ModelCache:
    """The model a run needs, loaded once: transformers' for the latest (dtype, device), an engine's
    own (a GGUF file, a model folder) once per engine."""

    def __init__(self, spec: str, progress: bool = False) -> None:
        self.spec = spec
        self.progress = progress
        self._key: tuple | None = None
        self._loaded = None
        self._engines: dict[str, Any] = {}

    def get(self, run: RunSpec):
        """A `LoadedModel` for a transformers run, the engine's resolved model for an engine run."""
        if run.is_engine:
            return self._engine_model(run.engine_name)
        from kvlab.models import load_model

        full = run.with_defaults()
        key = (full.dtype, full.device)
        if key != self._key:
            self._loaded = None  # free the previous model before loading the next
            self._loaded = load_model(self.spec, RunSpec(dtype=full.dtype, device=full.device), progress=self.progress)
            self._key = key
        return self._loaded

    def _engine_model(self, engine: str):
        if engine not in self._engines:
            if engine == VLLM:
                from kvlab.engines.vllm import resolve_model
            else:
                from kvlab.engines.llamacpp import resolve_model
            self._engines[engine] = resolve_model(self.spec)
        return self._engines[engine]

    def clear(self) -> None:
        self._key, self._loaded = None, None


def capture_run(models: ModelCache, run: RunSpec, tokens: Sequence[int] | None, *, force: Snapshot | None = None,
                max_new_tokens: int = 32, top_k: int = DEFAULT_TOP_K, stop_at_eos: bool = True,
                out: str | Path | None = None, shards: str | Path | None = None, prompt_text: str | None = None,
                progress: bool = False, label: str = "capture") -> Captured:
    """Greedy (or teacher-forced on `force`) capture of one run: by its engine, here, or on its ranks.

    prompt_text: what an engine tokenizes itself when `tokens` is None and nothing is forced.
    With `out` the snapshot is written there. `progress` draws a bar labelled `label`.
    """
    if not run.is_engine:
        return capture_any(models.get(run), tokens, run, force=force, max_new_tokens=max_new_tokens, top_k=top_k,
                           stop_at_eos=stop_at_eos, out=out, shards=shards, progress=label if progress else None)
    steps = len(force.token_ids) - force.n_prompt if force is not None else max_new_tokens
    with progress_bar(steps, label, enabled=progress) as bar:
        snapshot = _capture_engine(models.get(run), tokens, run, force=force, max_new_tokens=max_new_tokens,
                                   top_k=top_k, stop_at_eos=stop_at_eos, on_step=bar, prompt_text=prompt_text)
    if out is not None:
        snapshot.save(out)
    return Captured(tp=1, rank=0, snapshot=snapshot, shards=None)


def _capture_engine(model, tokens, run: RunSpec, **kwargs) -> Snapshot:
    if run.engine_name == LLAMA_CPP:
        from kvlab.engines import llamacpp

        return llamacpp.capture(model, tokens, run, **kwargs)
    if run.engine_name == VLLM:
        from kvlab.engines import vllm

        return vllm.capture(model, tokens, run, **kwargs)
    raise KvlabError(f"engine={run.engine_name} has no capture")


# ---- `kvlab capture` ---------------------------------------------------------------------------

@dataclass
class CaptureReport:
    """One capture as `kvlab capture` reports it: the outcome and its JSON summary."""

    captured: Captured
    summary: dict[str, Any]

    @property
    def snapshot(self) -> Snapshot:
        assert self.captured.snapshot is not None
        return self.captured.snapshot


def capture_prompt(model_spec: str, text: str | None, run: RunSpec, *, out: str | Path, chat: bool = False,
                   force: Snapshot | None = None, max_new_tokens: int = 32, top_k: int = DEFAULT_TOP_K,
                   stop_at_eos: bool = True, shards: str | Path | None = None,
                   progress: bool = False) -> CaptureReport | None:
    """Load `model_spec` for `run`, capture it on `text` (or teacher-forced on `force`) into `out`.

    None on a tensor-parallel rank other than 0 under torchrun: its shard is written, rank 0 reports.
    """
    models = ModelCache(model_spec, progress=progress)
    model = models.get(run)
    tokens = model.encode(text, chat=chat) if text is not None else None
    started = time.perf_counter()
    captured = capture_run(models, run, tokens, force=force, max_new_tokens=max_new_tokens, top_k=top_k,
                           stop_at_eos=stop_at_eos, out=out, shards=shards,
                           prompt_text=text if tokens is None else None, progress=progress)
    elapsed = time.perf_counter() - started
    snap = captured.snapshot
    if snap is None:
        return None
    generated = snap.token_ids[snap.n_prompt:]
    decoded = model.tokenizer.decode(generated, skip_special_tokens=False) if model.tokenizer is not None else None
    summary = capture_summary(snap, out, force is not None, elapsed, decoded)
    if run.is_engine:
        summary["engine"] = snap.meta.get("engine")
    if captured.tp > 1:
        summary["tp"] = {"ranks": captured.tp, "shards": str(captured.shards), **captured.check}
    return CaptureReport(captured, summary)


def capture_summary(snap: Snapshot, out, forced: bool, elapsed: float, text: str | None) -> dict[str, Any]:
    """What `kvlab capture` reports of a snapshot, whoever ran it (`cache_bytes`: what the cache held)."""
    n_generated = len(snap.token_ids) - snap.n_prompt
    return {
        "out": out,
        "model": snap.model,
        "run": snap.run,
        "n_prompt": snap.n_prompt,
        "n_generated": n_generated,
        "teacher_forced": forced,
        "seconds": elapsed,
        "tokens_per_s": n_generated / elapsed if elapsed > 0 else None,
        "cache_shape": list(snap.shape(0)),
        "cache_bytes": snap.cache_nbytes(),
        "text": text,
    }


def record_prompt_trace(model_spec: str, text: str, run: RunSpec, *, layers: Sequence[int] | None, steps: int,
                        out: str | Path, chat: bool = False, prefill: bool = False, progress: bool = False):
    """Record an attention trace of `run` on `text` into `out`, whoever runs the model: llama.cpp's own
    graph tensors for an engine run, transformers' attention otherwise. `layers` None: every layer."""
    if run.is_engine and run.engine_name != LLAMA_CPP:
        raise KvlabError(f"trace record runs on transformers or llama.cpp, not engine={run.engine_name}")
    model = ModelCache(model_spec, progress=progress).get(run)
    tokens = model.encode(text, chat=chat)
    if run.is_engine:
        from kvlab.engines.llamacpp_trace import record_trace as record_engine_trace

        if layers is None:
            if model.describe.get("n_layers") is None:
                raise KvlabError("--layers all needs the layer count: give the layers (e.g. 0-29)")
            layers = list(range(model.describe["n_layers"]))
        with progress_bar(steps + 1, "record", enabled=progress) as advance:
            return record_engine_trace(model, tokens, run, layers=layers, steps=steps, out=out, prefill=prefill,
                                       prompt_text=text, on_step=advance)
    from kvlab.model_facts import model_shape
    from kvlab.trace import record_trace

    if layers is None:
        layers = list(range(model_shape(model.config)["n_layers"]))
    with progress_bar(steps + 1, "record", enabled=progress) as advance:
        return record_trace(model, tokens, run, layers=layers, steps=steps, out=out, prefill=prefill, on_step=advance)
