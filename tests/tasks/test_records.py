import json

import pytest

from kvlab.errors import KvlabError
from kvlab.tasks import Task, exact_match, read_task_file, score, substring_match, token_f1, write_task_file
from kvlab.fusion.chunking import as_document
from kvlab.tasks.needle import NeedleSpec, essay_sentences, needle_task, needle_tasks
from tests.conftest import tiny


def test_scoring_rules():
    assert exact_match("The Paris.", ["paris"]) == 1.0
    assert exact_match("Paris, France", ["Paris"]) == 0.0
    assert substring_match("It is Paris, France.", ["paris"]) == 1.0
    assert substring_match("Lyon", ["Paris", "Marseille"]) == 0.0
    assert token_f1("paris france", ["paris"]) == pytest.approx(2 * 0.5 * 1 / 1.5)
    assert token_f1("", ["paris"]) == 0.0
    assert score("42", ["42"]) == {"exact": 1.0, "substring": 1.0, "f1": 1.0}


def test_task_file_round_trip_and_longbench_records(tmp_path):
    tasks = [Task("a", ["doc one.", "doc two."], "What?", ["x"]), Task("b", ["d"], "Q?", ["y", "z"])]
    path = write_task_file(tmp_path / "t.jsonl", tasks)
    assert [t.id for t in read_task_file(path)] == ["a", "b"]
    lb = tmp_path / "lb.jsonl"
    lb.write_text(json.dumps({"_id": "q1", "input": "Who?", "context": "Long text.", "answers": ["Ann"],
                              "dataset": "hotpotqa"}) + "\n")
    (task,) = read_task_file(lb)
    assert task.context == "Long text." and task.chunks == [] and task.documents() == ["Long text."]
    assert "Question: Who?" in task.prompt()


@pytest.mark.parametrize(
    "line, fragment",
    [
        ("not json", "not valid JSON"),
        ('{"id": "a", "chunks": [], "question": "q", "answers": []}', "non-empty list"),
        ('{"id": "a", "question": "q", "answers": []}', "neither 'chunks' nor"),
        ('{"chunks": ["x"], "question": "q", "answers": []}', "no 'id'"),
        ('{"id": "a", "chunks": ["x"], "answers": []}', "no 'question'"),
        ('{"id": "a", "chunks": ["x"], "question": "q", "answers": [1]}', "list of strings"),
    ],
)
def test_bad_task_lines_name_file_and_line(tmp_path, line, fragment):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"id": "ok", "chunks": ["x"], "question": "q", "answers": ["a"]}\n' + line + "\n")
    with pytest.raises(KvlabError, match=fragment) as info:
        read_task_file(path)
    assert f"{path}:2" in str(info.value)


def test_needle_is_placed_at_its_depth_in_a_haystack_of_the_asked_size():
    tok = tiny("tiny-llama").tokenizer  # byte tokenizer: one token per byte
    assert len(essay_sentences()) > 1000
    for depth in (0.0, 0.5, 1.0):
        task = needle_task(tok, NeedleSpec(context_tokens=3000, depth=depth, chunk_tokens=700), index=1)
        text = " ".join(task.chunks)
        needle = task.meta["needle"]
        assert task.answers[0] in needle and needle in text
        position = text.index(needle) / len(text)
        assert abs(position - depth) < 0.1
        assert 0.75 * 3000 <= len(text.encode()) <= 3000 + 5 and len(task.chunks) == 5  # ceil(3000 / 700)
        assert all(len(as_document(c).encode()) <= 700 for c in task.chunks)  # one chunk each in a prompt


def test_needle_tasks_are_reproducible_and_distinct():
    tok = tiny("tiny-llama").tokenizer
    a = needle_tasks(tok, 4, context_tokens=500, seed=7)
    b = needle_tasks(tok, 4, context_tokens=500, seed=7)
    assert [t.to_dict() for t in a] == [t.to_dict() for t in b]
    assert len({t.answers[0] for t in a}) == 4 and len({t.question for t in a}) == 4
    with pytest.raises(KvlabError, match="depth"):
        needle_task(tok, NeedleSpec(depth=1.5))


def test_the_readme_task_and_chunks_file_examples_are_read_as_shown(tmp_path):
    import re
    from pathlib import Path

    from kvlab.fusion.prompt import read_chunks_file
    from kvlab.tasks import read_task_file

    readme = (Path(__file__).parents[2] / "README.md").read_text()
    task_block = re.search(r"```jsonl\n(.*?)```", readme, re.S).group(1)
    chunks_block = re.search(r"A chunks file .*?```text\n(.*?)```", readme, re.S).group(1)
    (tmp_path / "tasks.jsonl").write_text(task_block)
    (tmp_path / "chunks.txt").write_text(chunks_block)
    tasks = read_task_file(tmp_path / "tasks.jsonl")
    assert [t.id for t in tasks] == ["q7", "q8"] and tasks[0].answers == ["Ada"] and len(tasks[0].chunks) == 2
    assert read_chunks_file(tmp_path / "chunks.txt") == ["Ada founded Acme in 1999. It began in a garage.",
                                                         "Acme makes anvils and sells them by mail."]
