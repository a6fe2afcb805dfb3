"""RAG task files and how their documents become token chunks.

A task file holds JSON lines, either in kvlab's own form (DESIGN.md, "Task files")

    {"id": "...", "chunks": ["text", ...], "question": "...", "answers": ["...", ...]}

or LongBench's (`context` one long string, `input` the question, `_id` the id). Documents are
cut into chunks of at most `chunk_tokens` tokens, at a sentence end when one lies in the last
quarter of the window, else exactly at the limit. The cut is made on the document's own
tokenization, so the chunks laid end to end are exactly the tokens of the document; a given
`chunks` entry is kept whole when it fits and cut the same way when it does not.

Precompute and fused prefill must agree on these token ids (they name the chunks in the store):
both call `task_chunks`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvlab.errors import KvlabError

DEFAULT_CHUNK_TOKENS = 512
_SENTENCE_ENDS = (".", "!", "?", "\u3002", "\uff01", "\uff1f")
_CLOSERS = "\"')]}\u201d\u2019"


@dataclass
class TaskRecord:
    """One RAG task: its documents (given chunks or one context string), question and answers."""

    id: str
    chunks: list[str] = field(default_factory=list)
    context: str | None = None
    question: str = ""
    answers: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def documents(self) -> list[str]:
        """The texts to chunk: the given chunks, or the one context."""
        return list(self.chunks) if self.chunks else ([self.context] if self.context else [])


def read_task_file(path: str | Path) -> list[TaskRecord]:
    """Every record of a JSON-lines task file; KvlabError naming the line for a bad one."""
    path = Path(path)
    if not path.is_file():
        raise KvlabError(f"task file {path} does not exist")
    records = []
    try:
        lines = path.read_text().splitlines()
    except UnicodeDecodeError:
        raise KvlabError(f"task file {path} is not UTF-8 text") from None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            data = json.loads(line)
        except ValueError as err:
            raise KvlabError(f"{path}:{number}: not JSON ({err.args[0] if err.args else err})") from None
        records.append(parse_task(data, f"{path}:{number}", default_id=str(number)))
    if not records:
        raise KvlabError(f"task file {path} holds no records")
    return records


def parse_task(data: Any, where: str, default_id: str = "") -> TaskRecord:
    """A TaskRecord from one decoded JSON object (kvlab or LongBench fields)."""
    if not isinstance(data, dict):
        raise KvlabError(f"{where}: a task is a JSON object, not {type(data).__name__}")
    chunks, context = data.get("chunks"), data.get("context")
    if chunks is not None:
        if not isinstance(chunks, list) or not all(isinstance(c, str) for c in chunks):
            raise KvlabError(f"{where}: 'chunks' must be a list of strings")
    elif context is not None:
        if not isinstance(context, str):
            raise KvlabError(f"{where}: 'context' must be a string")
    else:
        raise KvlabError(f"{where}: a task needs 'chunks' (a list of strings) or 'context' (a string)")
    question = data.get("question", data.get("input", ""))
    answers = data.get("answers", data.get("answer", []))
    if isinstance(answers, str):
        answers = [answers]
    if not isinstance(question, str) or not isinstance(answers, list):
        raise KvlabError(f"{where}: 'question' must be a string and 'answers' a list of strings")
    known = {"id", "_id", "chunks", "context", "question", "input", "answers", "answer"}
    return TaskRecord(
        id=str(data.get("id", data.get("_id", default_id))),
        chunks=list(chunks or []),
        context=context if chunks is None else None,
        question=question,
        answers=[str(a) for a in answers],
        extra={k: v for k, v in data.items() if k not in known},
    )


class SentenceEnds:
    """Which token ids end a sentence, decided once per id from the token's own text."""

    def __init__(self, tokenizer) -> None:
        self._tokenizer = tokenizer
        self._known: dict[int, bool] = {}

    def __call__(self, ids: Sequence[int]) -> list[bool]:
        new = sorted({int(i) for i in ids} - self._known.keys())
        if new:
            texts = self._tokenizer.batch_decode([[i] for i in new])
            self._known.update((i, _ends_sentence(t)) for i, t in zip(new, texts))
        return [self._known[int(i)] for i in ids]


def _ends_sentence(text: str) -> bool:
    if "\n" in text:
        return True
    return text.rstrip().rstrip(_CLOSERS).endswith(_SENTENCE_ENDS)


def split_at_sentences(ids: Sequence[int], ends: Sequence[bool], chunk_tokens: int) -> list[list[int]]:
    """Cut `ids` into pieces of at most `chunk_tokens`, after a sentence end in a window's last quarter."""
    if chunk_tokens < 1:
        raise KvlabError(f"chunk size must be at least 1 token, not {chunk_tokens}")
    near = max(0, chunk_tokens // 4)
    pieces, start = [], 0
    while len(ids) - start > chunk_tokens:
        limit = start + chunk_tokens
        cut = limit
        for end in range(limit, max(start, limit - near), -1):
            if ends[end - 1]:
                cut = end
                break
        pieces.append(list(ids[start:cut]))
        start = cut
    if start < len(ids):
        pieces.append(list(ids[start:]))
    return pieces


def chunk_text(tokenizer, text: str, chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
               sentence_ends: SentenceEnds | None = None) -> list[list[int]]:
    """The token chunks of one document (no special tokens)."""
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    ends = (sentence_ends or SentenceEnds(tokenizer))(ids)
    return split_at_sentences(ids, ends, chunk_tokens)


def task_chunks(tokenizer, record: TaskRecord, chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
                sentence_ends: SentenceEnds | None = None) -> list[list[int]]:
    """The token chunks of a task's documents, in order."""
    ends = sentence_ends or SentenceEnds(tokenizer)
    return [piece for doc in record.documents for piece in chunk_text(tokenizer, doc, chunk_tokens, ends)]

