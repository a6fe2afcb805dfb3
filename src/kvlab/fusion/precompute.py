"""Precompute: every distinct chunk of a task file computed once into a shared store.

Resumable and idempotent: a chunk already in the store (and intact) is skipped; a damaged one
is recomputed. Several processes may work on one store at once (`workers`, or separate
commands on overlapping task files): before computing a chunk a process claims it in the store,
so each chunk is computed by one process; a claim left by a killed process is taken over.
"""

from __future__ import annotations

import os
import queue as queue_module
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from kvlab.errors import KvlabError
from kvlab.fusion.chunking import DEFAULT_CHUNK_TOKENS, SentenceEnds, document_chunks
from kvlab.fusion.chunks import chunk_key, compute_chunk_kv, prefix_state
from kvlab.fusion.prompt import prompt_frame
from kvlab.fusion.store import ChunkStore, CorruptChunkError, open_store
from kvlab.tasks import read_task_file

if TYPE_CHECKING:
    from kvlab.runspec import RunSpec

# What one chunk's work came to: found intact, computed, or found damaged and recomputed.
EXISTING, COMPUTED, REPAIRED = "existing", "computed", "repaired"
_WAIT_S = 0.05


@dataclass
class PrecomputeReport:
    """Figures of one precompute run (`--json`)."""

    store: str
    model: str
    dtype: str
    tasks: int
    chunks: int
    existing: int = 0
    computed: int = 0
    repaired: int = 0
    tokens_computed: int = 0
    workers: int = 1
    seconds: float = 0.0
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS
    prefix_tokens: int = 0
    surprisal: bool = False
    repaired_digests: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def plan_chunks(loaded, tasks, chunk_tokens: int) -> list[list[int]]:
    """The distinct token chunks of all tasks, in first-seen order."""
    ends = SentenceEnds(loaded.tokenizer)
    seen: dict[tuple[int, ...], None] = {}
    for task in tasks:
        for ids in document_chunks(loaded.tokenizer, task.documents(), chunk_tokens, ends):
            seen.setdefault(tuple(ids), None)
    return [list(ids) for ids in seen]


def precompute(
    model: str,
    tasks: str,
    store: str | ChunkStore,
    *,
    run: "RunSpec | None" = None,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
    prefix: str | None = None,
    chat: bool | None = None,
    surprisal: bool = False,
    workers: int = 1,
    on_start: Callable[[int], None] | None = None,
    on_chunk: Callable[[str], None] | None = None,
) -> PrecomputeReport:
    """Compute every missing chunk of the task file `tasks` with `model` into `store` (a URL, or
    an open store, which is left open), the model loaded for `run` (None: kvlab's defaults).

    The prefix a fused prompt starts with (`kvlab.fusion.prompt.prompt_frame`) is stored as a chunk
    of its own at position 0 and every chunk is computed after it, as `kvlab fuse run` and
    `kvlab fuse eval` look them up.

    `on_start(n_chunks)` is called once the plan is known, `on_chunk(outcome)` after each chunk.
    """
    import contextlib

    from kvlab.models import load_model

    if workers < 1:
        raise KvlabError(f"--workers must be at least 1, not {workers}")
    if isinstance(store, str) and store.startswith("memory://"):
        raise KvlabError("a memory:// store lives only as long as this process, so what precompute stores would "
                         "vanish at exit: give a folder or a redis:// store")
    store_url = store if isinstance(store, str) else store.url
    if workers > 1 and store_url.startswith("memory://"):
        raise KvlabError("a memory:// store lives in one process: --workers needs a folder or redis:// store")
    task_list = read_task_file(tasks)
    loaded = load_model(model, run)  # a bad model spec fails before a new store folder is made
    with open_store(store) if isinstance(store, str) else contextlib.nullcontext(store) as store:
        plan = plan_chunks(loaded, task_list, chunk_tokens)
        prefix_ids = list(prompt_frame(loaded, chat, prefix).prefix)
        report = PrecomputeReport(store.url, model, chunk_key(loaded, [0]).dtype, len(task_list),
                                  len(plan) + bool(prefix_ids), workers=workers, chunk_tokens=chunk_tokens,
                                  prefix_tokens=len(prefix_ids), surprisal=surprisal)
        if on_start is not None:
            on_start(report.chunks)
        started = time.perf_counter()
        each = None if on_chunk is None else lambda outcome, *_: on_chunk(outcome)
        outcomes = compute_missing(loaded, store, [prefix_ids], (), surprisal, each) if prefix_ids else []
        if workers == 1 or len(plan) <= 1:
            report.workers = 1
            outcomes += compute_missing(loaded, store, plan, prefix_ids, surprisal, each)
        else:
            outcomes += _run_workers(model, run, store_url, plan, prefix_ids, surprisal, workers, on_chunk)
    report.seconds = time.perf_counter() - started
    for outcome, n_tokens, digest in outcomes:
        setattr(report, outcome, getattr(report, outcome) + 1)
        if outcome != EXISTING:
            report.tokens_computed += n_tokens
        if outcome == REPAIRED:
            report.repaired_digests.append(digest)
    return report


def compute_missing(
    loaded,
    store: ChunkStore,
    chunks: Sequence[Sequence[int]],
    prefix_ids: Sequence[int],
    surprisal: bool,
    on_chunk: Callable[[str, int, str], None] | None = None,
) -> list[tuple[str, int, str]]:
    """Make sure every chunk is in the store; returns (outcome, n_tokens, digest) per chunk,
    each also passed to `on_chunk` as soon as it is known.

    A chunk another process has claimed is put aside and looked at again later: by then it is
    either stored (and counted as existing) or its claim is gone and this process computes it.
    """
    prefix_cache, prefix_logits = prefix_state(loaded, prefix_ids)
    pending = [list(ids) for ids in chunks]
    outcomes = []
    while pending:
        deferred = []
        for ids in pending:
            key = chunk_key(loaded, ids, prefix_ids)
            if not store.claim(key):
                deferred.append(ids)
                continue
            try:
                outcome = _stored_state(store, key)
                if outcome != EXISTING:
                    if outcome == REPAIRED:
                        store.delete(key)
                    _, kv = compute_chunk_kv(loaded, ids, prefix_ids, surprisal=surprisal, prefix_cache=prefix_cache,
                                             prefix_logits=prefix_logits)
                    store.put(key, kv)
            finally:
                store.release(key)
            outcomes.append((outcome, len(ids), key.digest()))
            if on_chunk is not None:
                on_chunk(*outcomes[-1])
        if deferred and len(deferred) == len(pending):
            time.sleep(_WAIT_S)
        pending = deferred
    return outcomes


def _stored_state(store: ChunkStore, key) -> str:
    """EXISTING when an intact entry is there, COMPUTED when none is, REPAIRED when it is damaged."""
    try:
        return EXISTING if store.get(key) is not None else COMPUTED
    except CorruptChunkError:
        return REPAIRED


# -- worker processes -----------------------------------------------------------------------


def _run_workers(model, run, store_url, plan, prefix_ids, surprisal, workers, on_chunk):
    """Share the plan among `workers` fresh processes (interleaved slices); collect their outcomes."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")  # a fresh interpreter: no forked torch threads or index handles
    queue = ctx.Queue()
    threads = max(1, (os.cpu_count() or 1) // workers)
    procs = [ctx.Process(target=_worker, args=(model, run, store_url, plan[w::workers], prefix_ids, surprisal,
                                               threads, queue, os.getpid()), daemon=True) for w in range(workers)]
    for proc in procs:
        proc.start()
    outcomes, finished, error = [], 0, None
    try:
        while finished < len(procs):
            try:
                kind, payload = queue.get(timeout=1.0)
            except queue_module.Empty:  # check that the workers are still alive
                dead = [p for p in procs if p.exitcode not in (None, 0)]
                if dead and error is None:
                    error = f"a precompute worker exited with status {dead[0].exitcode}"
                    break
                continue
            if kind == "chunk":
                outcomes.append(tuple(payload))
                if on_chunk is not None:
                    on_chunk(payload[0])
            elif kind == "error":
                error = payload
                finished += 1
            else:
                finished += 1
    finally:
        for proc in procs:
            if error is not None and proc.is_alive():
                proc.terminate()
            proc.join()
    if error is not None:
        raise KvlabError(error)
    return outcomes


class _ParentGone(Exception):
    """The precompute that started this worker was killed: stop after the chunk in hand."""


def _worker(model, run, store_url, chunks, prefix_ids, surprisal, threads, queue, parent_pid) -> None:
    import torch

    from kvlab.models import load_model

    def report(*outcome) -> None:
        if os.getppid() != parent_pid:
            raise _ParentGone
        queue.put(("chunk", outcome))

    torch.set_num_threads(threads)
    try:
        loaded = load_model(model, run)
        with open_store(store_url) as store:
            compute_missing(loaded, store, chunks, prefix_ids, surprisal, on_chunk=report)
    except _ParentGone:
        return
    except KvlabError as err:
        queue.put(("error", str(err)))
        return
    queue.put(("done", None))
