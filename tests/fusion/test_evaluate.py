"""`fuse eval` figures: per-kind rows, intervals and agreement with full prefill, on hand-made outcomes and
on a tiny model end to end."""

import json

import pytest

from kvlab.fusion.evaluate import EvalResult, Outcome, same_answer
from kvlab.fusion.strategies import make_strategy
from kvlab.tasks import Task
from kvlab.tasks.intervals import wilson_interval


def outcome(name, rate, right, texts, tokens, ttft):
    o = Outcome(make_strategy(name, rate))
    for r, text, toks, t in zip(right, texts, tokens, ttft):
        for metric in o.scores:
            o.scores[metric].append(float(r))
        o.texts.append(text)
        o.tokens.append(toks)
        o.ttft.append(t)
        o.ttft_cpu.append(t)
        o.tpot.append(None)
        o.fractions.append(1.0 if name == "full" else 0.15)
    return o


def test_rows_give_intervals_and_agreement_per_kind():
    tasks = [Task(f"t{i}", ["d"], "q?", ["x"], meta={"kind": kind}) for i, kind in enumerate("aabb")]
    full = outcome("full", None, [1, 1, 1, 0], ["x", "x.", "X\nmore", "y"], [[1, 2], [1, 2], [3, 4], [5]],
                   [2.0, 2.0, 4.0, 4.0])
    fused = outcome("a3", 0.15, [1, 0, 1, 0], ["x", "z", "x", "y"], [[1, 2], [9, 2], [3, 5], [5]], [1.0, 1.0, 1.0, 1.0])
    result = EvalResult(tasks, [full, fused], "substring", 0, 100.0, agree_tokens=1)
    overall = {r["strategy"]: r for r in result.rows()}
    a3 = overall["a3"]
    assert a3["accuracy"] == 0.5 and (a3["accuracy_low"], a3["accuracy_high"]) == pytest.approx(wilson_interval(2, 4))
    assert a3["agreement_with_full"] == 0.75  # task 1 answered z where full said x
    assert a3["same_first_tokens"] == 0.75  # first token 9 against 1 on task 1
    assert a3["agreement_where_full_right"] == pytest.approx(2 / 3) and a3["n_full_right"] == 3
    assert a3["speedup"] == pytest.approx(3.0) and overall["full"]["agreement_with_full"] == 1.0
    assert result.kinds() == ["a", "b"]
    b = {r["strategy"]: r for r in result.rows("b")}
    assert b["a3"]["n"] == 2 and b["a3"]["accuracy"] == 0.5 and b["a3"]["speedup"] == pytest.approx(4.0)
    assert b["a3"]["agreement_with_full"] == 1.0 and b["full"]["accuracy_high"] == pytest.approx(wilson_interval(1, 2)[1])
    data = result.to_dict()
    assert set(data["by_kind"]) == {"a", "b"} and data["tasks"][2]["kind"] == "b"


def test_same_answer_compares_the_first_line_normalised():
    assert same_answer("The 634.\nAnd then", "the 634")
    assert not same_answer("634", "643")
    assert same_answer("\n\n Vardenholm.", "vardenholm")


def test_fuse_eval_on_the_mixed_suite_reports_every_kind(cli, tmp_path):
    code, out, err = cli("fuse", "eval", "--model", "tiny-llama", "--n", "4", "--chunks", "3", "--chunk-tokens", "160",
                         "--strategies", "reuse", "--rates", "0.2", "-N", "3", "--agree-tokens", "2",
                         "--report", tmp_path / "r.html", "--json", tmp_path / "e.json", "--quiet")
    assert code == 0, err
    data = json.loads((tmp_path / "e.json").read_text())
    assert set(data["by_kind"]) == {"needle", "needles", "twohop", "kvqa"}
    for rows in data["by_kind"].values():
        assert [r["n"] for r in rows] == [1, 1] and rows[0]["agreement_with_full"] == 1.0
        assert rows[0]["accuracy_low"] is not None and rows[1]["agree_tokens"] == 2
    assert "95% CI" in out and "twohop: 1 tasks" in out
    assert "twohop" in (tmp_path / "r.html").read_text()


def test_fuse_tasks_writes_what_fuse_eval_generates(cli, tmp_path):
    from kvlab.fusion.evaluate import make_tasks
    from kvlab.tasks import read_task_file
    from tests.conftest import tiny

    out = tmp_path / "tasks.jsonl"
    code, _, err = cli("fuse", "tasks", "--model", "tiny-llama", "--n", "5", "--chunks", "3", "--chunk-tokens", "200",
                       "--seed", "4", "--out", out)
    assert code == 0, err
    made = make_tasks(tiny("tiny-llama"), "mixed", 5, n_chunks=3, chunk_tokens=200, seed=4)
    assert [t.to_dict() for t in read_task_file(out)] == [t.to_dict() for t in made]
    code, _, err = cli("fuse", "tasks", "--model", "tiny-llama", "--task", "other", "--out", out)
    assert code == 2 and "not one of needle, kvqa, needles, twohop, mixed" in err


def test_a_plot_whose_drawing_fails_leaves_no_open_figure():
    from kvlab.fusion.report import draw_plot, pyplot

    before = set(pyplot().get_fignums())
    with pytest.raises(KeyError):
        draw_plot([{"label": "a3", "strategy": "a3", "rate": 0.15, "accuracy": 0.5}], "no ttft_s in the row")
    assert set(pyplot().get_fignums()) == before
