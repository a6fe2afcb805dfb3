"""Needle tasks of many forms, with one needle or several per prompt, and two-hop questions.

- `needle`: one fact of a given form (`kvlab.tasks.forms`) in one of the documents; the
  question asks for its value.
- `needles`: several facts per prompt, two of the asked form (a distractor of the same form
  about another subject) and the rest of other forms, each in a different document where
  there are enough. `facts` / `documents` name the asked one, `distractors` the others.
- `twohop`: "<subject> is run by <person>." in one document and "<person> <second fact>." in
  another; the question names the subject and asks for the second fact, so the answer needs
  both documents. A distractor pair about another subject and person sits in two further
  documents where there are enough.

Each answer occurs exactly once in the documents, each subject once per fact that names it;
the same arguments give the same tasks.
"""

from __future__ import annotations

import random

from kvlab.errors import KvlabError
from kvlab.tasks.forms import FORMS, FORMS_BY_NAME, Form, person, subjects
from kvlab.tasks.planting import Planted, draw_until_unique, plant
from kvlab.tasks.records import Task

SECOND_HOPS = (
    ("{person} was born in a town called {value}.", "In which town was the person who runs {subject} born?",
     "town"),
    ("The badge number of {person} is {value}.", "What is the badge number of the person who runs {subject}?",
     "magic5"),
)
BRIDGE = "{subject} is run by {person}."


def _rng(kind: str, seed: int, index: int) -> random.Random:
    return random.Random(f"{kind}:{seed}:{index}")


def _documents(n_docs: int, count: int, rng: random.Random) -> list[int]:
    """`count` documents for facts: all different while there are enough."""
    order = list(range(n_docs))
    rng.shuffle(order)
    return [order[i % n_docs] if i < n_docs else rng.randrange(n_docs) for i in range(count)]


def needle_form_task(tokenizer, form: Form | str, n_docs: int = 8, chunk_tokens: int = 512, index: int = 0,
                     seed: int = 0, document: int | None = None) -> Task:
    """One needle of `form` in document `document` (default: drawn), at a random sentence boundary."""
    form = FORMS_BY_NAME[form] if isinstance(form, str) else form
    rng = _rng(f"needle-{form.name}", seed, index)
    pool = subjects()
    chosen: dict[str, str] = {}

    def build(r: random.Random) -> tuple[Planted, dict[str, int]] | None:
        chosen["subject"], chosen["value"] = r.choice(pool), form.value(r)
        doc = r.randrange(n_docs) if document is None else document
        planted = plant(tokenizer, [(doc, form.sentence(chosen["subject"], chosen["value"]))], n_docs, chunk_tokens, r)
        return planted, {chosen["value"]: 1, chosen["subject"]: 1}

    planted = draw_until_unique(build, rng, f"needle ({form.name})")
    return Task(
        id=f"needle-{form.name}-{seed}-{index}",
        chunks=planted.chunks,
        question=form.ask(chosen["subject"]),
        answers=[chosen["value"]],
        meta={"kind": "needle", "form": form.name, "verbatim": form.verbatim, "documents": planted.documents,
              "depth": round(planted.depths[0], 3), "facts": [form.sentence(chosen["subject"], chosen["value"])]},
    )


def multi_needle_task(tokenizer, form: Form | str, n_needles: int = 4, n_docs: int = 8, chunk_tokens: int = 512,
                      index: int = 0, seed: int = 0) -> Task:
    """`n_needles` facts (at least 2): the asked one, one more of its form, the rest of other forms."""
    form = FORMS_BY_NAME[form] if isinstance(form, str) else form
    if n_needles < 2:
        raise KvlabError("a multi-needle task needs at least 2 needles")
    rng = _rng(f"needles-{form.name}", seed, index)
    others = [f for f in FORMS if f is not form]
    chosen: dict[str, list] = {}

    def build(r: random.Random) -> tuple[Planted, dict[str, int]] | None:
        forms = [form, form] + [r.choice(others) for _ in range(n_needles - 2)]
        names = r.sample(subjects(), n_needles)
        values = [f.value(r) for f in forms]
        facts = [f.sentence(s, v) for f, s, v in zip(forms, names, values)]
        docs = _documents(n_docs, n_needles, r)
        chosen.update(forms=forms, names=names, values=values, facts=facts)
        planted = plant(tokenizer, list(zip(docs, facts)), n_docs, chunk_tokens, r)
        counts = {v: 1 for v in values} | {s: 1 for s in names}
        return (planted, counts) if len(counts) == 2 * n_needles else None  # a value drawn twice

    planted = draw_until_unique(build, rng, f"multi-needle ({form.name})")
    return Task(
        id=f"needles-{form.name}-{seed}-{index}",
        chunks=planted.chunks,
        question=form.ask(chosen["names"][0]),
        answers=[chosen["values"][0]],
        meta={"kind": "needles", "form": form.name, "verbatim": form.verbatim, "documents": planted.documents[:1],
              "depth": round(planted.depths[0], 3), "facts": chosen["facts"][:1], "distractors": chosen["facts"][1:],
              "distractor_documents": planted.documents[1:]},
    )


def two_hop_task(tokenizer, hop: int = 0, n_docs: int = 8, chunk_tokens: int = 512, index: int = 0,
                 seed: int = 0) -> Task:
    """Bridge fact and second fact in two different documents (n_docs >= 2), plus a distractor pair."""
    if n_docs < 2:
        raise KvlabError("a two-hop task needs at least 2 documents")
    second, question, value_form = SECOND_HOPS[hop % len(SECOND_HOPS)]
    rng = _rng(f"twohop-{hop % len(SECOND_HOPS)}", seed, index)
    chosen: dict[str, list] = {}

    def build(r: random.Random) -> tuple[Planted, dict[str, int]] | None:
        names, people = r.sample(subjects(), 2), [person(r), person(r)]
        values = [FORMS_BY_NAME[value_form].value(r) for _ in range(2)]
        facts = [BRIDGE.format(subject=names[0], person=people[0]), second.format(person=people[0], value=values[0]),
                 BRIDGE.format(subject=names[1], person=people[1]), second.format(person=people[1], value=values[1])]
        facts = [f[:1].upper() + f[1:] for f in facts]
        docs = _documents(n_docs, 4, r)
        chosen.update(names=names, people=people, values=values, facts=facts)
        planted = plant(tokenizer, list(zip(docs, facts)), n_docs, chunk_tokens, r)
        counts = {values[0]: 1, values[1]: 1, names[0]: 1, names[1]: 1, people[0]: 2, people[1]: 2}
        return (planted, counts) if len(counts) == 6 else None  # a person or value drawn twice

    planted = draw_until_unique(build, rng, "two-hop")
    return Task(
        id=f"twohop-{value_form}-{seed}-{index}",
        chunks=planted.chunks,
        question=question.format(subject=chosen["names"][0]),
        answers=[chosen["values"][0]],
        meta={"kind": "twohop", "form": value_form, "verbatim": False, "documents": planted.documents[:2],
              "depth": round(planted.depths[1], 3), "facts": chosen["facts"][:2], "distractors": chosen["facts"][2:]},
    )
