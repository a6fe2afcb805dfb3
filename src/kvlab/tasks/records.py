"""RAG task records and task files (JSON lines).

DESIGN format: `{"id", "chunks": [str, ...], "question": str, "answers": [str, ...]}`.
LongBench-style records (`context`, `input`, `answers`, `_id`) are accepted too; their single
`context` string is kept whole for the chunker.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from kvlab.errors import KvlabError

DEFAULT_INSTRUCTION = "Answer the question using the documents above. Answer briefly."


@dataclass
class Task:
    """One question over some documents, with its accepted answers."""

    id: str
    chunks: list[str]
    question: str
    answers: list[str]
    context: str | None = None  # a LongBench-style record's unchunked context
    meta: dict[str, Any] = field(default_factory=dict)

    def documents(self) -> list[str]:
        """The documents as given: the chunks, or the whole context as one piece."""
        if self.chunks:
            return list(self.chunks)
        return [self.context] if self.context else []

    def prompt(self, instruction: str = DEFAULT_INSTRUCTION) -> str:
        """Documents, then the question: the text of one user turn for a full prefill."""
        docs = "\n\n".join(self.documents())
        return f"{docs}\n\n{instruction}\nQuestion: {self.question}"

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        if data["context"] is None:
            del data["context"]
        if not data["meta"]:
            del data["meta"]
        return data


def task_from_record(record: Any, where: str) -> Task:
    """A Task from one parsed JSON line (DESIGN or LongBench style)."""
    if not isinstance(record, dict):
        raise KvlabError(f"{where}: a task record must be a JSON object")
    answers = record.get("answers", [])
    if isinstance(answers, str):
        answers = [answers]
    if not isinstance(answers, list) or not all(isinstance(a, str) for a in answers):
        raise KvlabError(f"{where}: 'answers' must be a list of strings")
    task_id = str(record.get("id", record.get("_id", "")))
    if not task_id:
        raise KvlabError(f"{where}: the record has no 'id'")
    question = record.get("question", record.get("input"))
    if not isinstance(question, str) or not question.strip():
        raise KvlabError(f"{where}: the record has no 'question' (or LongBench 'input')")
    if "chunks" in record:
        chunks = record["chunks"]
        if not isinstance(chunks, list) or not chunks or not all(isinstance(c, str) for c in chunks):
            raise KvlabError(f"{where}: 'chunks' must be a non-empty list of strings")
        return Task(task_id, chunks, question, answers, meta=record.get("meta", {}) or {})
    context = record.get("context")
    if not isinstance(context, str) or not context.strip():
        raise KvlabError(f"{where}: the record has neither 'chunks' nor a LongBench 'context'")
    meta = {k: record[k] for k in ("dataset", "length", "language") if k in record}
    return Task(task_id, [], question, answers, context=context, meta=meta)


def read_task_file(path: str | Path) -> list[Task]:
    """All tasks of a JSON-lines file; a bad line is an error naming the file and line."""
    path = Path(path)
    if not path.is_file():
        raise KvlabError(f"task file {path} does not exist")
    tasks: list[Task] = []
    seen: set[str] = set()
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise KvlabError(f"{where}: not valid JSON ({err.msg})") from None
            task = task_from_record(record, where)
            if task.id in seen:
                raise KvlabError(f"{where}: duplicate task id {task.id!r}")
            seen.add(task.id)
            tasks.append(task)
    if not tasks:
        raise KvlabError(f"task file {path} holds no tasks")
    return tasks


def write_task_file(path: str | Path, tasks: Iterable[Task]) -> Path:
    """Write tasks as JSON lines, atomically."""
    from kvlab.atomic import atomic_file

    with atomic_file(path, "w") as handle:
        for task in tasks:
            handle.write(json.dumps(task.to_dict(), ensure_ascii=False) + "\n")
    return Path(path)
