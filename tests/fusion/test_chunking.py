"""Chunking: documents cut into token chunks at sentence ends near the limit, nothing lost."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvlab.errors import KvlabError
from kvlab.fusion.chunking import SentenceEnds, chunk_text, document_chunks, split_at_sentences
from kvlab.tasks import Task
from kvlab.tokenizer_bytes import byte_tokenizer


def test_split_cuts_after_a_sentence_end_in_the_last_quarter_else_at_the_limit():
    ends = [i in (6, 15) for i in range(20)]
    # Window 0..8: a sentence ends at token 6 (cut after it, 7 tokens). Window 7..15: the end at
    # token 15 lies just beyond, and none lies in 13..14: cut at the limit. Then the rest.
    assert split_at_sentences(list(range(20)), ends, 8) == [list(range(7)), list(range(7, 15)), list(range(15, 20))]
    assert split_at_sentences(list(range(5)), [False] * 5, 8) == [list(range(5))]
    assert split_at_sentences([], [], 8) == []
    far = [i == 2 for i in range(12)]  # a sentence end too far back is not used
    assert split_at_sentences(list(range(12)), far, 8) == [list(range(8)), list(range(8, 12))]
    with pytest.raises(KvlabError, match="at least 1 token"):
        split_at_sentences([1], [False], 0)


def test_chunk_text_keeps_the_document_tokens_and_ends_at_sentences():
    tok = byte_tokenizer()
    text = "The sea is wide. Ships sail on it! Do they sink? Rarely.\nWaves come and go all day long"
    pieces = chunk_text(tok, text, 20)
    assert [t for p in pieces for t in p] == tok(text, add_special_tokens=False)["input_ids"]
    # Sentence ends in a window's last 5 tokens are used; "?" 6 tokens back is too far: a hard cut.
    assert [tok.decode(p) for p in pieces] == [
        "The sea is wide.", " Ships sail on it!", " Do they sink? Rarel", "y.\nWaves come and go", " all day long"]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.sampled_from(["ab", "c", " ", ". ", "! ", "?", "\n", "xyz"]), max_size=60),
       st.integers(min_value=1, max_value=24))
def test_chunks_cover_the_document_in_order_and_respect_the_size(parts, size):
    tok = byte_tokenizer()
    text = "".join(parts)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    pieces = chunk_text(tok, text, size)
    assert [t for p in pieces for t in p] == ids
    assert all(0 < len(p) <= size for p in pieces)
    ends = SentenceEnds(tok)(ids)
    start = 0
    for piece in pieces[:-1]:
        cut = start + len(piece)
        near = range(max(start, start + size - size // 4), start + size)  # token indexes that may end a piece
        if any(ends[i] for i in near):
            assert ends[cut - 1] and not any(ends[i] for i in near if i > cut - 1)
        else:
            assert len(piece) == size
        start = cut


def test_given_chunks_are_kept_whole_when_they_fit():
    tok = byte_tokenizer()
    task = Task("t", [" short one. ", "x" * 25], "q?", [])  # each document stripped, then a blank line
    assert [tok.decode(p) for p in document_chunks(tok, task.documents(), 12)] == ["short one.\n\n", "x" * 12, "x" * 12, "x\n\n"]
    longbench = Task("l", [], "q?", [], context="Yes. No.")
    assert [tok.decode(p) for p in document_chunks(tok, longbench.documents(), 4)] == ["Yes.", " No.", "\n\n"]
