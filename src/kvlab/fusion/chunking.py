"""How a RAG task's documents become token chunks (the tasks themselves: `kvlab.tasks`).

Documents (a task file's `chunks` entries, or a LongBench record's one `context`) end with a
blank line (`as_document`), so that documents laid end to end in a prompt read as paragraphs,
and are cut into chunks of at most `chunk_tokens` tokens, at a sentence end when one lies in the
last quarter of the window, else exactly at the limit. The cut is made on the document's own
tokenization, so the chunks laid end to end are exactly the tokens of the document; a given
`chunks` entry is kept whole when it fits and cut the same way when it does not.

Precompute and fused prefill must agree on these token ids (they name the chunks in the store):
both call `document_chunks`.
"""

from __future__ import annotations

from collections.abc import Sequence

from kvlab.errors import KvlabError

DEFAULT_CHUNK_TOKENS = 512
_SENTENCE_ENDS = (".", "!", "?", "\u3002", "\uff01", "\uff1f")
_CLOSERS = "\"')]}\u201d\u2019"


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
    return "\n" in text or text.rstrip().rstrip(_CLOSERS).endswith(_SENTENCE_ENDS)


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


def as_document(text: str) -> str:
    """A document as it stands in a prompt: its text, then a blank line."""
    return text.strip() + "\n\n"


def document_chunks(tokenizer, documents: Sequence[str], chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
                    sentence_ends: SentenceEnds | None = None) -> list[list[int]]:
    """The token chunks of some documents, in order."""
    ends = sentence_ends or SentenceEnds(tokenizer)
    return [piece for doc in documents for piece in chunk_text(tokenizer, as_document(doc), chunk_tokens, ends)]
