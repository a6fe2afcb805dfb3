"""`kvlab fuse eval`: accuracy against time to first token, per strategy and rate.

Every task is answered by full prefill (the baseline, always run) and by each strategy at each
rate, interleaved task by task so that a noisy machine slows all of them alike. The store is
filled before timing starts (misses are precompute, not fusion), so TTFT covers reading the
chunks from the store, moving them, the fused prefill and the first token. Speedup is the mean
full-prefill TTFT over the strategy's mean TTFT, both from this run.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kvlab.caches.eviction import EvictionPolicy
from kvlab.errors import KvlabError
from kvlab.fusion.fused import answer, load_chunks
from kvlab.fusion.prompt import DEFAULT_CHUNK_TOKENS, FusionPrompt, task_prompt
from kvlab.fusion.store.base import ChunkStore
from kvlab.fusion.strategies import Strategy, make_strategy
from kvlab.tasks.records import Task, read_task_file
from kvlab.tasks.scoring import SCORERS

if TYPE_CHECKING:
    from kvlab.models import LoadedModel

BUILTIN_TASKS = ("needle", "kvqa")


def make_tasks(loaded: "LoadedModel", source: str, n: int, *, n_chunks: int = 8,
               chunk_tokens: int = DEFAULT_CHUNK_TOKENS, seed: int = 0) -> list[Task]:
    """`needle`, `kvqa` (generated: n_chunks documents of about chunk_tokens) or a task file's first n."""
    if n < 1:
        raise KvlabError(f"--n must be at least 1, got {n}")
    if source == "needle":
        from kvlab.tasks.needle import needle_tasks

        depths = tuple(round(0.1 + 0.8 * i / max(1, min(n, 5) - 1), 2) for i in range(min(n, 5)))
        return needle_tasks(loaded.tokenizer, n, context_tokens=n_chunks * chunk_tokens, depths=depths,
                            chunk_tokens=chunk_tokens, seed=seed)
    if source == "kvqa":
        from kvlab.tasks.kvqa import kvqa_tasks

        return kvqa_tasks(loaded.tokenizer, n, n_chunks=n_chunks, chunk_tokens=chunk_tokens, seed=seed)
    if not Path(source).exists():
        raise KvlabError(f"--task {source!r}: not one of {', '.join(BUILTIN_TASKS)} and no such task file")
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
    tpot: list[float] = field(default_factory=list)
    fractions: list[float] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)

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

    def rows(self) -> list[dict[str, Any]]:
        """The DESIGN `fuse eval` JSON rows (plus the other scores and agreement with full prefill)."""
        full = self.outcomes[0]
        base_ttft = statistics.fmean(full.ttft)
        base_cpu = statistics.fmean(full.ttft_cpu)
        rows = []
        for outcome in self.outcomes:
            ttft = statistics.fmean(outcome.ttft)
            cpu = statistics.fmean(outcome.ttft_cpu)
            agree = [a.strip() == b.strip() for a, b in zip(outcome.texts, full.texts)]
            rows.append({
                "strategy": outcome.strategy.name,
                "spec": outcome.strategy.spec(),
                "label": outcome.strategy.label(),
                "rate": outcome.strategy.rate_value,
                "accuracy": statistics.fmean(outcome.scores[self.metric]),
                "ttft_s": ttft,
                "tpot_s": statistics.fmean(outcome.tpot) if outcome.tpot else None,
                "speedup": base_ttft / ttft if ttft > 0 else None,
                "recomputed_fraction": statistics.fmean(outcome.fractions),
                "n": len(outcome.ttft),
                "metric": self.metric,
                **{f"{name}": statistics.fmean(values) for name, values in outcome.scores.items()},
                "agreement_with_full": statistics.fmean(agree) if agree else None,
                "ttft_cpu_s": cpu,
                "speedup_cpu": base_cpu / cpu if cpu > 0 else None,
            })
        return rows

    def to_json(self, **extra: Any) -> dict[str, Any]:
        details = [
            {"task": task.id, "answers": task.answers,
             "runs": [{"label": o.label, "text": o.texts[i], "ttft_s": o.ttft[i]} for o in self.outcomes]}
            for i, task in enumerate(self.tasks)
        ]
        return {"results": self.rows(), **extra, "precomputed_chunks": self.precomputed,
                "prompt_tokens": self.prompt_tokens, "tasks": details}


def evaluate(loaded: "LoadedModel", tasks: Sequence[Task], strategies: Sequence[Strategy], store: ChunkStore, *,
             evict: EvictionPolicy | None = None, metric: str = "substring", max_new_tokens: int = 24,
             chunk_tokens: int = DEFAULT_CHUNK_TOKENS, chat: bool | None = None, prefix: str | None = None,
             on_step: Callable[[int], None] | None = None) -> EvalResult:
    """Answer every task with every strategy; `strategies[0]` must be full prefill (the baseline)."""
    if metric not in SCORERS:
        raise KvlabError(f"--metric {metric}: not one of {', '.join(SCORERS)}")
    if not strategies or not strategies[0].is_full:
        raise KvlabError("the first strategy must be full prefill: it is the baseline of the speedups")
    if not tasks:
        raise KvlabError("no tasks to evaluate")
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
            for name, scorer in SCORERS.items():
                outcome.scores[name].append(scorer(got.text, task.answers))
            outcome.ttft.append(got.ttft_s)
            outcome.ttft_cpu.append(got.ttft_cpu_s)
            if got.tpot_s is not None:
                outcome.tpot.append(got.tpot_s)
            outcome.fractions.append(got.prefill.recomputed_fraction)
            outcome.texts.append(got.text)
            if on_step is not None:
                on_step(1)
    return EvalResult(list(tasks), outcomes, metric, precomputed, statistics.fmean(p.n_tokens for p in prompts))
