"""Facts planted into essay documents: the common ground of the needle, multi-needle and two-hop tasks.

Each task has `n_docs` documents that each fit one chunk of `chunk_tokens` tokens as a prompt
lays them out (`kvlab.fusion.chunking.as_document`): consecutive essay sentences from a random
place anywhere in the essays, with fact sentences inserted at random sentence boundaries of
the documents they are meant for. A planted task is checked before it is returned: every
string that must occur once in the documents (answers, subjects) does, else the draw is
repeated (seeded, so the same arguments still give the same tasks).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from kvlab.errors import KvlabError
from kvlab.tasks.needle import DOCUMENT_RESERVE, essay_sentences, fill_documents

MAX_DRAWS = 50


@dataclass(frozen=True)
class Planted:
    """Documents with facts in them, and where each fact went."""

    chunks: list[str]
    documents: list[int]  # the document each fact was put in, in the order the facts were given
    depths: list[float]  # each fact's relative position in all documents laid end to end (0 = start)


def plant(tokenizer, facts: Sequence[tuple[int, str]], n_docs: int, chunk_tokens: int,
          rng: random.Random) -> Planted:
    """Essay documents sized to one chunk each, fact `text` inserted into document `doc` for each fact."""
    if n_docs < 1:
        raise KvlabError("a task needs at least one document")
    if chunk_tokens < 16:
        raise KvlabError(f"documents must be at least 16 tokens, got {chunk_tokens}")
    room = chunk_tokens - DOCUMENT_RESERVE
    used = [0] * n_docs
    for doc, text in facts:
        used[doc] += len(tokenizer(" " + text, add_special_tokens=False)["input_ids"])
    if max(used) > room:
        raise KvlabError(f"documents of {chunk_tokens} tokens are too small for the facts planted in them")
    documents = fill_documents(tokenizer, [room - u for u in used], offset=rng.randrange(len(essay_sentences())))
    for doc, text in facts:
        documents[doc].insert(rng.randint(0, len(documents[doc])), text)
    chunks = [" ".join(parts) for parts in documents]
    joined = " ".join(chunks)
    depths = [joined.index(text) / max(1, len(joined)) for _, text in facts]
    return Planted(chunks, [doc for doc, _ in facts], depths)


def occurrences(chunks: Sequence[str], text: str) -> int:
    """How often `text` occurs in the documents (case-insensitively, overlapping matches counted once)."""
    needle = text.lower()
    return sum(chunk.lower().count(needle) for chunk in chunks)


def draw_until_unique(build: Callable[[random.Random], tuple[Planted, dict[str, int]] | None],
                      rng: random.Random, what: str) -> Planted:
    """Call `build(rng)` until each of its strings occurs in the documents as often as it must
    (`{text: count}`): an answer that the essays happen to contain would be found for the wrong reason.
    `build` returns None for a draw it rejects itself (two facts drew the same value)."""
    for _ in range(MAX_DRAWS):
        got = build(rng)
        if got is None:
            continue
        planted, counts = got
        if all(occurrences(planted.chunks, text) == count for text, count in counts.items()):
            return planted
    raise KvlabError(f"could not draw a {what} task whose answer occurs only where it is planted")
