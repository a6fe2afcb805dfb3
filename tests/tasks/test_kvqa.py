import re

import pytest

from kvlab.errors import KvlabError
from kvlab.fusion.chunking import as_document
from kvlab.tasks.kvqa import KVQASpec, kvqa_task, kvqa_tasks
from tests.conftest import tiny


def test_kvqa_documents_hold_distinct_facts_and_the_answer_is_in_one_of_them():
    tok = tiny("tiny-llama").tokenizer  # one token per byte
    spec = KVQASpec(n_chunks=5, chunk_tokens=300, facts_per_document=2)
    task = kvqa_task(tok, spec, index=3, seed=1)
    assert len(task.chunks) == 5
    sizes = [len(tok(as_document(chunk), add_special_tokens=False)["input_ids"]) for chunk in task.chunks]
    assert 0.7 * 5 * 300 < sum(sizes) and max(sizes) <= 300  # each one chunk in a prompt
    for chunk in task.chunks:
        assert chunk.count("The special magic number for the") == 2
        assert re.sub(r"The special magic number for the \w+ \w+ is \d+\.", "", chunk).strip()  # essay text too
    keys = [line.split(" is ")[0] for c in task.chunks for line in c.split(". ") if "magic number for the" in line]
    assert len(keys) == len(set(keys)) == 10
    (value,) = task.answers
    holding = [i for i, c in enumerate(task.chunks) if task.meta["fact"] in c]
    assert holding == [task.meta["document"]] and value in task.meta["fact"]
    assert task.meta["key"] in task.question and task.meta["fact"].endswith(f"{value}.")


def test_kvqa_is_seeded():
    tok = tiny("tiny-llama").tokenizer
    a, b = kvqa_tasks(tok, 3, n_chunks=2, chunk_tokens=100), kvqa_tasks(tok, 3, n_chunks=2, chunk_tokens=100)
    assert [t.to_dict() for t in a] == [t.to_dict() for t in b]
    assert len({t.answers[0] for t in a}) == 3
    assert kvqa_tasks(tok, 1, n_chunks=2, chunk_tokens=100, seed=5)[0].to_dict() != a[0].to_dict()


@pytest.mark.parametrize("spec, fragment", [
    (KVQASpec(n_chunks=0), "at least one document"),
    (KVQASpec(chunk_tokens=8), "at least 16 tokens"),
    (KVQASpec(n_chunks=600, facts_per_document=2), "distinct keys"),
])
def test_kvqa_rejects_impossible_shapes(spec, fragment):
    with pytest.raises(KvlabError, match=fragment):
        kvqa_task(tiny("tiny-llama").tokenizer, spec)
