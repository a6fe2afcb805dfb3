"""Task sources by name: one kind of generated task, or the mixed suite of all of them.

The mixed suite cycles through the kinds task by task (needle, needles, twohop, kvqa) and,
within a kind, through its forms, so any prefix of it holds every kind in equal shares:
48 tasks are 12 of each kind and cover every needle form. Seeded: task i of a seed is the
same on every machine and whatever n is.
"""

from __future__ import annotations

from kvlab.errors import KvlabError
from kvlab.tasks.forms import FORMS
from kvlab.tasks.kvqa import KVQASpec, kvqa_task
from kvlab.tasks.needles import SECOND_HOPS, multi_needle_task, needle_form_task, two_hop_task
from kvlab.tasks.records import Task

KINDS = ("needle", "needles", "twohop", "kvqa")
SOURCES = ("needle", "kvqa", "needles", "twohop", "mixed")  # as error messages list them


def generated_task(tokenizer, kind: str, index: int, *, n_docs: int = 8, chunk_tokens: int = 512,
                   seed: int = 0) -> Task:
    """Task `index` of one kind; the form cycles with the index."""
    if kind == "needle":
        return needle_form_task(tokenizer, FORMS[index % len(FORMS)], n_docs, chunk_tokens, index=index, seed=seed)
    if kind == "needles":
        return multi_needle_task(tokenizer, FORMS[index % len(FORMS)], min(4, max(2, n_docs)), n_docs, chunk_tokens,
                                 index=index, seed=seed)
    if kind == "twohop":
        return two_hop_task(tokenizer, index % len(SECOND_HOPS), n_docs, chunk_tokens, index=index, seed=seed)
    if kind == "kvqa":
        return kvqa_task(tokenizer, KVQASpec(n_docs, chunk_tokens), index=index, seed=seed)
    raise KvlabError(f"unknown task kind {kind!r}: use one of {', '.join(SOURCES)}")


def generated_tasks(tokenizer, source: str, n: int, *, n_docs: int = 8, chunk_tokens: int = 512,
                    seed: int = 0) -> list[Task]:
    """`n` tasks of `source`: one kind, or `mixed` (the kinds in turn)."""
    if source == "mixed":
        return [generated_task(tokenizer, KINDS[i % len(KINDS)], i // len(KINDS), n_docs=n_docs,
                               chunk_tokens=chunk_tokens, seed=seed) for i in range(n)]
    return [generated_task(tokenizer, source, i, n_docs=n_docs, chunk_tokens=chunk_tokens, seed=seed)
            for i in range(n)]


def task_kind(task: Task) -> str:
    """The kind an evaluation groups a task under: its generator's kind, a LongBench dataset, else 'file'."""
    return str(task.meta.get("kind") or task.meta.get("dataset") or "file")
