"""Needle forms, multi-needle and two-hop tasks, the mixed suite, verbatim scoring, intervals."""

import json
import re
import string

import pytest

from kvlab.errors import KvlabError
from kvlab.fusion.chunking import as_document
from kvlab.tasks import read_task_file
from kvlab.tasks.forms import FORMS
from kvlab.tasks.intervals import score_interval, wilson_interval
from kvlab.tasks.needle import essay_sentences
from kvlab.tasks.needles import multi_needle_task, needle_form_task, two_hop_task
from kvlab.tasks.planting import occurrences
from kvlab.tasks.scoring import score
from kvlab.tasks.suite import KINDS, generated_tasks, task_kind
from tests.conftest import tiny


def tok():
    return tiny("tiny-llama").tokenizer  # byte tokenizer: one token per byte


def fits(task, chunk_tokens):
    return all(len(as_document(c).encode()) <= chunk_tokens for c in task.chunks)


def test_the_forms_cover_numbers_of_several_lengths_names_places_dates_times_passwords_and_phrases():
    assert len(FORMS) >= 8 and len({f.name for f in FORMS}) == len(FORMS)
    tasks = {f.name: needle_form_task(tok(), f, n_docs=4, chunk_tokens=300, index=2, seed=3) for f in FORMS}
    digits = {len(t.answers[0]) for t in tasks.values() if t.answers[0].isdigit()}
    assert {3, 5, 9} <= digits
    assert any(len(t.answers[0].split()) >= 3 for t in tasks.values())  # multi-word answers
    assert re.fullmatch(r"\d{1,2} [A-Z][a-z]+ \d{4}", tasks["date"].answers[0])
    assert re.fullmatch(r"\d{1,2}:\d\d [ap]m", tasks["time"].answers[0])
    password = tasks["password"].answers[0]
    assert sum(c in string.punctuation for c in password) >= 2 and tasks["password"].meta["verbatim"]
    assert len(tasks["name"].answers[0].split()) == 2


@pytest.mark.parametrize("form", [f.name for f in FORMS])
def test_a_needle_of_every_form_is_planted_once_where_its_meta_says(form):
    task = needle_form_task(tok(), form, n_docs=5, chunk_tokens=300, index=1, seed=4)
    (answer,) = task.answers
    (fact,) = task.meta["facts"]
    (doc,) = task.meta["documents"]
    assert occurrences(task.chunks, answer) == 1 and answer in fact
    assert fact in task.chunks[doc] and occurrences(task.chunks, fact) == 1
    assert answer not in task.question and task.question.endswith("?")
    subject = re.search(r"the \w+ \w+", task.question).group(0)
    assert occurrences(task.chunks, subject) == 1 and subject.lower() in fact.lower()
    assert len(task.chunks) == 5 and fits(task, 300)
    assert sum(len(c) for c in task.chunks) > 0.5 * 5 * 300  # essay text (whole sentences) fills the documents


def test_needle_tasks_are_seeded():
    a = needle_form_task(tok(), "password", n_docs=3, chunk_tokens=200, index=5, seed=1)
    assert a.to_dict() == needle_form_task(tok(), "password", n_docs=3, chunk_tokens=200, index=5, seed=1).to_dict()
    assert a.to_dict() != needle_form_task(tok(), "password", n_docs=3, chunk_tokens=200, index=5, seed=2).to_dict()
    assert a.to_dict() != needle_form_task(tok(), "password", n_docs=3, chunk_tokens=200, index=6, seed=1).to_dict()


def test_haystacks_come_from_anywhere_in_the_essays():
    text = " ".join(essay_sentences())
    starts = []
    for seed in range(24):
        task = needle_form_task(tok(), "code3", n_docs=2, chunk_tokens=200, index=0, seed=seed, document=0)
        starts.append(text.index(task.chunks[1][:60]) / len(text))  # document 1 holds essay text only
    assert min(starts) < 0.25 and max(starts) > 0.75


def test_several_needles_per_prompt_with_a_distractor_of_the_asked_form():
    task = multi_needle_task(tok(), "magic5", n_needles=4, n_docs=6, chunk_tokens=300, index=2, seed=0)
    facts = task.meta["facts"] + task.meta["distractors"]
    docs = task.meta["documents"] + task.meta["distractor_documents"]
    assert len(facts) == 4 and len(set(docs)) == 4  # one needle per document while there are enough
    for fact, doc in zip(facts, docs):
        assert fact in task.chunks[doc] and occurrences(task.chunks, fact) == 1
    asked, distractor = facts[0], facts[1]
    assert asked.startswith("The special magic number for") and distractor.startswith("The special magic number for")
    (answer,) = task.answers
    assert answer in asked and answer not in distractor and occurrences(task.chunks, answer) == 1
    assert fits(task, 300)
    with pytest.raises(KvlabError, match="at least 2 needles"):
        multi_needle_task(tok(), "magic5", n_needles=1)


@pytest.mark.parametrize("hop", [0, 1])
def test_two_hop_facts_lie_in_two_different_documents(hop):
    task = two_hop_task(tok(), hop, n_docs=6, chunk_tokens=300, index=3, seed=2)
    (bridge, second), (doc_a, doc_b) = task.meta["facts"], task.meta["documents"]
    assert doc_a != doc_b and bridge in task.chunks[doc_a] and second in task.chunks[doc_b]
    person = bridge.removesuffix(".").split(" is run by ")[1]
    subject = bridge.split(" is run by ")[0]
    (answer,) = task.answers
    assert person in second and answer in second and answer not in bridge
    assert occurrences(task.chunks, answer) == 1 and occurrences(task.chunks, person) == 2
    assert subject.lower() in task.question.lower() and person not in task.question
    assert subject.lower() not in second.lower()  # the second fact alone cannot be matched to the question
    assert len(task.meta["distractors"]) == 2 and fits(task, 300)
    with pytest.raises(KvlabError, match="at least 2 documents"):
        two_hop_task(tok(), hop, n_docs=1)


def test_the_mixed_suite_holds_every_kind_and_form_and_is_seeded():
    tasks = generated_tasks(tok(), "mixed", 48, n_docs=4, chunk_tokens=300, seed=0)
    kinds = [task_kind(t) for t in tasks]
    assert {k: kinds.count(k) for k in KINDS} == {k: 12 for k in KINDS}
    assert {t.meta["form"] for t in tasks if task_kind(t) == "needle"} == {f.name for f in FORMS}
    assert len({t.id for t in tasks}) == 48 and len({t.question for t in tasks}) == 48
    again = generated_tasks(tok(), "mixed", 8, n_docs=4, chunk_tokens=300, seed=0)
    assert [t.to_dict() for t in again] == [t.to_dict() for t in tasks[:8]]
    for task in tasks:
        assert occurrences(task.chunks, task.answers[0]) == 1, task.id
        assert {"kind", "form", "documents", "facts", "verbatim"} <= set(task.meta), task.id
        for fact, doc in zip(task.meta["facts"], task.meta["documents"]):
            assert fact in task.chunks[doc], task.id


def test_longbench_records_keep_their_dataset_as_kind(tmp_path):
    path = tmp_path / "lb.jsonl"
    records = [{"_id": f"q{i}", "input": "Who?", "context": "Ann wrote it. " * 5, "answers": ["Ann"],
                "dataset": name, "length": 10, "all_classes": None} for i, name in enumerate(["hotpotqa", "2wikimqa"])]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    assert [task_kind(t) for t in read_task_file(path)] == ["hotpotqa", "2wikimqa"]


def test_a_verbatim_answer_needs_its_exact_characters():
    assert score("The password is kX7#p-2Lm.", ["kX7#p-2Lm"], verbatim=True)["substring"] == 1.0
    assert score("kX7p2Lm", ["kX7#p-2Lm"], verbatim=True)["substring"] == 0.0
    assert score("kX7p2Lm", ["kX7#p-2Lm"])["substring"] == 1.0  # what normalised scoring would have let through
    assert score("kx7#p-2lm", ["kX7#p-2Lm"], verbatim=True)["exact"] == 0.0
    assert score("'kX7#p-2Lm'.", ["kX7#p-2Lm"], verbatim=True)["exact"] == 1.0


def test_wilson_interval_against_hand_worked_cases():
    # 8 of 10: p = 0.8, z^2/n = 0.38415; centre = (0.8 + 0.19207) / 1.38415 = 0.71674,
    # half = 1.95996 / 1.38415 * sqrt(0.016 + 0.0096037) = 0.22658 -> (0.4902, 0.9433)
    low, high = wilson_interval(8, 10)
    assert low == pytest.approx(0.4902, abs=5e-5) and high == pytest.approx(0.9433, abs=5e-5)
    # 0 of 10: centre = half = 0.19207 / 1.38415 = 0.13877 -> (0, 0.2775), never the point 0
    assert wilson_interval(0, 10) == pytest.approx((0.0, 0.27753), abs=5e-5)
    assert wilson_interval(10, 10)[0] == pytest.approx(1 - 0.27753, abs=5e-5)
    assert wilson_interval(0, 0) == (0.0, 1.0)
    assert score_interval([1.0, 0.0, 1.0, 1.0]) == wilson_interval(3, 4)
    assert score_interval([0.5, 1.0]) is None  # graded scores (token F1) have no binomial interval
    with pytest.raises(ValueError):
        wilson_interval(11, 10)
