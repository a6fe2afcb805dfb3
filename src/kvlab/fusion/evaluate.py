"""`kvlab fuse eval`: accuracy against time to first token, per strategy and rate, per task kind.

Every task is answered by full prefill (the baseline, always run) and by each strategy at each
rate, interleaved task by task so that a noisy machine slows all of them alike. The store is
filled before timing starts (misses are precompute, not fusion), so TTFT covers reading the
chunks from the store, moving them, the fused prefill and the first token. Speedup is the mean
full-prefill TTFT over the strategy's mean TTFT, both from this run.

Accuracy comes with its 95% Wilson interval (`kvlab.tasks.intervals`), and every strategy is
compared with full prefill task by task: the same answer (the first line of the two answers,
normalised) and the same first `agree_tokens` generated tokens. Every figure is given for all
tasks and for each task kind (`kvlab.tasks.suite.task_kind`).
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kvlab.caches.eviction import EvictionPolicy
from kvlab.errors import KvlabError
from kvlab.fusion.fused import Answer, answer, load_chunks
from kvlab.fusion.prompt import DEFAULT_CHUNK_TOKENS, FusionPrompt, build_prompt, task_prompt
from kvlab.fusion.store.base import ChunkStore
from kvlab.fusion.strategies import Strategy, make_strategy
from kvlab.model_facts import LoadedModel
from kvlab.tasks.intervals import score_interval
from kvlab.tasks.records import Task, read_task_file
from kvlab.tasks.scoring import SCORERS, normalize, score
from kvlab.tasks.suite import SOURCES, generated_tasks, task_kind

if TYPE_CHECKING:
    from kvlab.runspec import RunSpec


def make_tasks(loaded: "LoadedModel", source: str, n: int, *, n_chunks: int = 8,
               chunk_tokens: int = DEFAULT_CHUNK_TOKENS, seed: int = 0) -> list[Task]:
    """Generated tasks (`mixed`, `needle`, `needles`, `twohop`, `kvqa`: n_chunks documents of about
    chunk_tokens each) or a task file's first n (kvlab or LongBench records)."""
    if n < 1:
        raise KvlabError(f"--n must be at least 1, got {n}")
    if source in SOURCES:
        return generated_tasks(loaded.tokenizer, source, n, n_docs=n_chunks, chunk_tokens=chunk_tokens, seed=seed)
    if not Path(source).exists():
        raise KvlabError(f"--task {source!r}: not one of {', '.join(SOURCES)} and no such task file")
    return read_task_file(source)[:n]


def expand(strategies: Sequence[str], rates: Sequence[float]) -> list[Strategy]:
    """Every strategy at every rate (once for those without a rate), full prefill first."""
    if not rates:
        raise KvlabError("give at least one rate")
    runs: list[Strategy] = [make_strategy("full")]
    for text in strategies:
        for rate in rates:
            strategy = make_strategy(text, rate)
            if strategy not in runs:
                runs.append(strategy)
    return runs


@dataclass
class Outcome:
    """One strategy at one rate over all tasks."""

    strategy: Strategy
    scores: dict[str, list[float]] = field(default_factory=lambda: {name: [] for name in SCORERS})
    ttft: list[float] = field(default_factory=list)
    ttft_cpu: list[float] = field(default_factory=list)
    tpot: list[float | None] = field(default_factory=list)
    fractions: list[float] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    tokens: list[list[int]] = field(default_factory=list)

    @property
    def label(self) -> str:
        rate = self.strategy.rate_value
        return self.strategy.label() + (f"@{rate:g}" if rate is not None else "")


@dataclass
class EvalResult:
    tasks: list[Task]
    outcomes: list[Outcome]
    metric: str
    precomputed: int  # chunks computed to fill the store before timing
    prompt_tokens: float  # mean prompt length
    agree_tokens: int = 8  # how many first generated tokens must match full prefill's

    def kinds(self) -> list[str]:
        """The task kinds in order of first appearance."""
        return list(dict.fromkeys(task_kind(task) for task in self.tasks))

    def rows(self, kind: str | None = None) -> list[dict[str, Any]]:
        """The DESIGN `fuse eval` JSON rows over all tasks, or those of one kind (plus the other scores,
        the accuracy's 95% interval and agreement with full prefill)."""
        picked = [i for i, task in enumerate(self.tasks) if kind is None or task_kind(task) == kind]
        if not picked:
            raise KvlabError(f"no tasks of kind {kind!r}")
        full = self.outcomes[0]
        base_ttft = statistics.fmean(full.ttft[i] for i in picked)
        base_cpu = statistics.fmean(full.ttft_cpu[i] for i in picked)
        full_right = [i for i in picked if full.scores[self.metric][i] == 1.0]
        rows = []
        for outcome in self.outcomes:
            ttft = statistics.fmean(outcome.ttft[i] for i in picked)
            cpu = statistics.fmean(outcome.ttft_cpu[i] for i in picked)
            same = [same_answer(outcome.texts[i], full.texts[i]) for i in picked]
            same_tokens = [outcome.tokens[i][:self.agree_tokens] == full.tokens[i][:self.agree_tokens] for i in picked]
            interval = score_interval([outcome.scores[self.metric][i] for i in picked])
            tpot = [outcome.tpot[i] for i in picked if outcome.tpot[i] is not None]
            rows.append({
                "strategy": outcome.strategy.name,
                "spec": outcome.strategy.spec(),
                "label": outcome.strategy.label(),
                "rate": outcome.strategy.rate_value,
                "kind": kind or "all",
                "accuracy": statistics.fmean(outcome.scores[self.metric][i] for i in picked),
                "accuracy_low": interval[0] if interval else None,
                "accuracy_high": interval[1] if interval else None,
                "ttft_s": ttft,
                "tpot_s": statistics.fmean(tpot) if tpot else None,
                "speedup": base_ttft / ttft if ttft > 0 else None,
                "recomputed_fraction": statistics.fmean(outcome.fractions[i] for i in picked),
                "n": len(picked),
                "metric": self.metric,
                **{name: statistics.fmean(values[i] for i in picked) for name, values in outcome.scores.items()},
                "agreement_with_full": statistics.fmean(same),
                "same_first_tokens": statistics.fmean(same_tokens),
                "agree_tokens": self.agree_tokens,
                "agreement_where_full_right": (statistics.fmean(same_answer(outcome.texts[i], full.texts[i])
                                                                for i in full_right) if full_right else None),
                "n_full_right": len(full_right),
                "ttft_cpu_s": cpu,
                "speedup_cpu": base_cpu / cpu if cpu > 0 else None,
            })
        return rows

    def to_dict(self, **extra: Any) -> dict[str, Any]:
        details = [
            {"task": task.id, "kind": task_kind(task), "answers": task.answers,
             "runs": [{"label": o.label, "text": o.texts[i], "ttft_s": o.ttft[i],
                       self.metric: o.scores[self.metric][i]} for o in self.outcomes]}
            for i, task in enumerate(self.tasks)
        ]
        return {"results": self.rows(), **extra, "by_kind": {kind: self.rows(kind) for kind in self.kinds()},
                "precomputed_chunks": self.precomputed, "prompt_tokens": self.prompt_tokens, "tasks": details}


def evaluate(loaded: "LoadedModel", tasks: Sequence[Task], strategies: Sequence[Strategy], store: ChunkStore, *,
             evict: EvictionPolicy | None = None, metric: str = "substring", max_new_tokens: int = 24,
             chunk_tokens: int = DEFAULT_CHUNK_TOKENS, chat: bool | None = None, prefix: str | None = None,
             agree_tokens: int = 8, on_step: Callable[[int], None] | None = None) -> EvalResult:
    """Answer every task with every strategy; `strategies[0]` must be full prefill (the baseline)."""
    if metric not in SCORERS:
        raise KvlabError(f"--metric {metric}: not one of {', '.join(SCORERS)}")
    if not strategies or not strategies[0].is_full:
        raise KvlabError("the first strategy must be full prefill: it is the baseline of the speedups")
    if not tasks:
        raise KvlabError("no tasks to evaluate")
    if agree_tokens < 1:
        raise KvlabError(f"agreement needs at least 1 token, got {agree_tokens}")
    prompts: list[FusionPrompt] = [task_prompt(loaded, task, chat=chat, prefix=prefix, chunk_tokens=chunk_tokens)
                                   for task in tasks]
    precomputed = 0
    for prompt in prompts:
        precomputed += load_chunks(loaded, store, prompt, surprisal=True)[2].misses
    # Warm every path up on a short prompt (first calls pay one-off setup), untimed.
    short = FusionPrompt(prompts[0].prefix, prompts[0].chunks[:1], prompts[0].question)
    for strategy in strategies:
        answer(loaded, short, strategy, store, evict=evict, max_new_tokens=2)
    outcomes = [Outcome(strategy) for strategy in strategies]
    for task, prompt in zip(tasks, prompts):
        for outcome in outcomes:
            got = answer(loaded, prompt, outcome.strategy, store, evict=evict, max_new_tokens=max_new_tokens)
            for name, value in score(got.text, task.answers, verbatim=bool(task.meta.get("verbatim"))).items():
                outcome.scores[name].append(value)
            outcome.ttft.append(got.ttft_s)
            outcome.ttft_cpu.append(got.ttft_cpu_s)
            outcome.tpot.append(got.tpot_s)
            outcome.fractions.append(got.prefill.recomputed_fraction)
            outcome.texts.append(got.text)
            outcome.tokens.append(list(got.tokens))
            if on_step is not None:
                on_step(1)
    return EvalResult(list(tasks), outcomes, metric, precomputed, statistics.fmean(p.n_tokens for p in prompts),
                      agree_tokens)


def same_answer(text: str, reference: str) -> bool:
    """Whether two generated answers say the same: their first non-empty lines, normalised, are equal."""
    return normalize(_first_line(text)) == normalize(_first_line(reference))


def _first_line(text: str) -> str:
    return next((line for line in text.splitlines() if line.strip()), "")


# ---- `kvlab fuse run` and `kvlab fuse eval` from a model spec and a store URL ----------------------

def open_chunk_store(url: str) -> ChunkStore:
    """`open_store`, with a backend this build lacks (redis-py) as one error line, not an ImportError."""
    from kvlab.fusion.store import open_store

    try:
        return open_store(url)
    except ModuleNotFoundError as err:
        raise KvlabError(f"store {url}: its backend is not available in this build ({err.name}); use memory://") from None


@dataclass
class FusedAnswer:
    """One question answered from stored chunk caches, and what `kvlab fuse run` reports of it."""

    answer: Answer
    prompt: FusionPrompt
    summary: dict[str, Any]


def answer_question(model_spec: str, run: "RunSpec", store_url: str, strategy: Strategy, *, task: Task | None = None,
                    documents: Sequence[str] | None = None, question: str | None = None,
                    evict: EvictionPolicy | None = None, chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
                    prefix: str | None = None, chat: bool | None = None, max_new_tokens: int = 32,
                    progress: bool = False) -> FusedAnswer:
    """Load the model, answer `task` (or `question` over `documents`) with `strategy` from the store at
    `store_url` (chunks missing there are computed and stored, their time counted in TTFT), score it
    against a task's answers."""
    from kvlab.models import load_model

    loaded = load_model(model_spec, run, progress=progress)
    if task is not None:
        documents, question = task.documents(), task.question
    prompt = build_prompt(loaded, documents, question, chat=chat, prefix=prefix, chunk_tokens=chunk_tokens)
    with open_chunk_store(store_url) as store:
        got = answer(loaded, prompt, strategy, store, evict=evict, max_new_tokens=max_new_tokens)
    result = got.prefill
    summary = {
        "model": model_spec,
        "strategy": strategy.spec(),
        "rate": strategy.rate_value,
        "evict": str(evict) if evict else None,
        **got.to_dict(),
        "store": {"url": store_url, **result.load.to_dict()},
    }
    if task is not None:
        summary["task"] = task.id
        summary["scores"] = score(got.text, task.answers)
    return FusedAnswer(got, prompt, summary)


@dataclass
class ModelEval:
    """`kvlab fuse eval` of one model: the result, its title, its rows (all tasks, then per kind when
    there are several), the report files written and the JSON summary."""

    result: EvalResult
    title: str
    rows: list[dict[str, Any]]
    by_kind: dict[str, list[dict[str, Any]]]
    written: list[Path]
    summary: dict[str, Any]


def evaluate_model(model_spec: str, run: "RunSpec", source: str, n_tasks: int, strategies: Sequence[Strategy],
                   store_url: str, *, evict: EvictionPolicy | None = None, n_chunks: int = 8,
                   chunk_tokens: int = DEFAULT_CHUNK_TOKENS, seed: int = 0, metric: str = "substring",
                   max_new_tokens: int = 24, chat: bool | None = None, prefix: str | None = None,
                   agree_tokens: int = 8, report: str | Path | None = None, progress: bool = False) -> ModelEval:
    """Load the model, make the tasks (`make_tasks`), `evaluate` every strategy on them against the store
    at `store_url`, and write the HTML report when `report` names one."""
    from kvlab.models import load_model
    from kvlab.progress import progress_bar

    loaded = load_model(model_spec, run, progress=progress)
    tasks = make_tasks(loaded, source, n_tasks, n_chunks=n_chunks, chunk_tokens=chunk_tokens, seed=seed)
    with open_chunk_store(store_url) as store, \
            progress_bar(len(tasks) * len(strategies), "fuse eval", enabled=progress) as bar:
        result = evaluate(loaded, tasks, strategies, store, evict=evict, metric=metric, max_new_tokens=max_new_tokens,
                          chunk_tokens=chunk_tokens, chat=chat, prefix=prefix, agree_tokens=agree_tokens, on_step=bar)
    rows = result.rows()
    kinds = result.kinds()
    by_kind = {kind: result.rows(kind) for kind in kinds} if len(kinds) > 1 else {}
    title = f"{model_spec}: {source}, {len(tasks)} tasks" + (f", evict {evict}" if evict else "")
    written: list[Path] = []
    if report:
        from kvlab.fusion.report import write_report

        written = write_report(report, rows, title, by_kind)
    summary = result.to_dict(model=model_spec, task=source, evict=str(evict) if evict else None)
    return ModelEval(result, title, rows, by_kind, written, summary)
