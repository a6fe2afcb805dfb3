"""The token layout of a RAG prompt: prefix, document chunks, question.

prefix    the chat template's opening up to the user's text (or the tokenizer's BOS), or a
          given prefix text; computed once and stored as a chunk of its own at position 0
chunks    each document's tokens, computed after the prefix at position base len(prefix) and
          stored; a fused prompt moves each to where it lands
question  the instruction, the question and the template's closing; always computed

Each part is tokenized on its own so that a chunk has the same token ids in every prompt it
appears in (which is what lets its cache be reused): documents are cut by
`kvlab.fusion.chunking.document_chunks`, as `kvlab fuse precompute` cuts them, and the prefix is
`prompt_frame(...).prefix` in both. The full-prefill baseline runs the same token ids, so fused
and full prefill are compared on identical input.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from kvlab.errors import KvlabError
from kvlab.fusion.chunking import DEFAULT_CHUNK_TOKENS, document_chunks
from kvlab.model_facts import LoadedModel
from kvlab.tasks.records import DEFAULT_INSTRUCTION, Task, read_task_file


_MARK = "\u0000kvlab-user-text\u0000"


@dataclass(frozen=True)
class FusionPrompt:
    prefix: tuple[int, ...]
    chunks: tuple[tuple[int, ...], ...]
    question: tuple[int, ...]  # instruction, question and closing: always computed
    query: tuple[int, int] | None = None  # the user's question within `question` ([start, end)); None: all of it

    @property
    def query_span(self) -> tuple[int, int]:
        return self.query if self.query is not None else (0, len(self.question))

    @cached_property
    def ids(self) -> list[int]:
        return [t for part in (self.prefix, *self.chunks, self.question) for t in part]

    @property
    def n_prefix(self) -> int:
        return len(self.prefix)

    @property
    def n_docs(self) -> int:
        return sum(len(c) for c in self.chunks)

    @property
    def n_tokens(self) -> int:
        return self.n_prefix + self.n_docs + len(self.question)

    @cached_property
    def spans(self) -> list[tuple[int, int]]:
        """Each chunk's [start, end) among the document tokens (0 = first document token)."""
        spans, start = [], 0
        for chunk in self.chunks:
            spans.append((start, start + len(chunk)))
            start += len(chunk)
        return spans


@dataclass(frozen=True)
class PromptFrame:
    """Token ids around the documents: the prefix and the text closing the question."""

    prefix: tuple[int, ...]
    closing: str


def prompt_frame(loaded: "LoadedModel", chat: bool | None = None, prefix: str | None = None) -> PromptFrame:
    """The prefix ids and closing text.

    `chat` (default: when the tokenizer has a template) wraps documents and question in one
    user turn; the prefix is then the template's opening. A `prefix` text replaces that
    opening and is encoded as a prompt starts (`loaded.encode`, special tokens included), as
    `kvlab fuse precompute --prefix` encodes it.
    """
    tokenizer = loaded.tokenizer
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if chat is None:
        chat = has_template
    if chat and not has_template:
        raise KvlabError(f"model {loaded.spec} has no chat template: run without chat")
    head_ids = None
    closing = "\nAnswer:"
    if chat:
        text = tokenizer.apply_chat_template([{"role": "user", "content": _MARK}], add_generation_prompt=True,
                                             tokenize=False)
        head, _, closing = text.partition(_MARK)
        head_ids = tuple(tokenizer(head, add_special_tokens=False)["input_ids"])
    if prefix is not None:
        return PromptFrame(tuple(loaded.encode(prefix)) if prefix else (), closing)
    if head_ids is not None:
        return PromptFrame(head_ids, closing)
    with_specials = tokenizer("x")["input_ids"]
    without = tokenizer("x", add_special_tokens=False)["input_ids"]
    lead = len(with_specials) - len(without) if with_specials[-len(without):] == without else 0
    return PromptFrame(tuple(with_specials[:lead]), closing)


def build_prompt(loaded: "LoadedModel", documents: Sequence[str], question: str, *, chat: bool | None = None,
                 prefix: str | None = None, instruction: str = DEFAULT_INSTRUCTION,
                 chunk_tokens: int = DEFAULT_CHUNK_TOKENS) -> FusionPrompt:
    """A prompt over some documents, each cut into chunks as `kvlab.fusion.chunking` cuts them."""
    if not documents or not any(doc.strip() for doc in documents):
        raise KvlabError("a fused prompt needs at least one non-empty document")
    if not question.strip():
        raise KvlabError("a fused prompt needs a question")
    frame = prompt_frame(loaded, chat, prefix)
    chunks = document_chunks(loaded.tokenizer, documents, chunk_tokens)
    lead = f"{instruction}\nQuestion: "
    text = f"{lead}{question.strip()}{frame.closing}"
    encoded = loaded.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return FusionPrompt(frame.prefix, tuple(tuple(c) for c in chunks), tuple(encoded["input_ids"]),
                        _span(encoded["offset_mapping"], len(lead), len(lead) + len(question.strip())))


def _span(offsets, start: int, end: int) -> tuple[int, int] | None:
    """The tokens whose characters overlap [start, end) (None when offsets are not available)."""
    inside = [i for i, (a, b) in enumerate(offsets) if a < end and b > start]
    return (inside[0], inside[-1] + 1) if inside else None


def task_prompt(loaded: "LoadedModel", task: Task, *, chat: bool | None = None, prefix: str | None = None,
                chunk_tokens: int = DEFAULT_CHUNK_TOKENS) -> FusionPrompt:
    """The prompt of a task: its documents (`chunks`, or a LongBench `context`) cut into chunks."""
    return build_prompt(loaded, task.documents(), task.question, chat=chat, prefix=prefix, chunk_tokens=chunk_tokens)


def find_task(path: str | Path, task_id: str) -> Task:
    """The task named `task_id` in a task file (`fuse run --id`, `fuse explain --id`)."""
    for task in read_task_file(path):
        if task.id == task_id:
            return task
    raise KvlabError(f"task file {path} has no task with id {task_id!r}")


def read_chunks_file(path: str | Path) -> list[str]:
    """Chunks from a file: a JSON list of strings (or {"chunks": [...]}), else blank-line separated text."""
    path = Path(path)
    if not path.is_file():
        raise KvlabError(f"chunks file {path} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise KvlabError(f"chunks file {path} is not UTF-8 text") from None
    if text.lstrip().startswith(("[", "{")):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise KvlabError(f"chunks file {path}: not valid JSON ({err.msg})") from None
        chunks = data.get("chunks") if isinstance(data, dict) else data
        if not isinstance(chunks, list) or not chunks or not all(isinstance(c, str) and c.strip() for c in chunks):
            raise KvlabError(f"chunks file {path}: expected a non-empty list of non-empty strings")
        return chunks
    chunks = [part.strip() for part in text.split("\n\n") if part.strip()]
    if not chunks:
        raise KvlabError(f"chunks file {path} holds no text")
    return chunks
