"""`kvlab fuse run` and `kvlab fuse eval` on tiny models: outputs, files and one-line errors."""

import json

import pytest

from kvlab.model_facts import quiet_transformers
from kvlab.tasks import Task, write_task_file
from tests.conftest import tiny
from tests.fusion.helpers import llama_from_config

DESIGN_KEYS = {"strategy", "rate", "accuracy", "ttft_s", "tpot_s", "speedup", "recomputed_fraction", "n"}


def test_fuse_run_answers_from_a_chunks_file(cli, tmp_path):
    chunks = tmp_path / "chunks.json"
    chunks.write_text(json.dumps(["The cat sat on the mat.", "Water boils at 100 degrees."]))
    code, out, err = cli("fuse", "run", "--model", "tiny-llama", "--chunks-file", chunks, "--question", "Where?",
                         "--strategy", "cacheblend", "--rate", "0.3", "--evict", "streaming:window=16", "-n", "4",
                         "--json", "-")
    assert code == 0, err
    data = json.loads(out)
    assert data["strategy"].startswith("cacheblend") and data["rate"] == 0.3 and data["ttft_s"] > 0
    assert data["store"]["misses"] == 3 and data["recomputed"] == round(0.3 * data["n_docs"])
    assert data["evict"] == "streaming:sink=4,window=16"


def test_fuse_run_on_a_task_file_prints_ttft(cli, tmp_path):
    path = write_task_file(tmp_path / "t.jsonl", [Task("q1", ["Blue is a colour.", "Seven is a number."],
                                                       "What is seven?", ["number"])])
    code, out, err = cli("fuse", "run", "--model", "tiny-qwen2", "--task-file", path, "--id", "q1",
                         "--strategy", "full", "-n", "3")
    assert code == 0, err
    assert "TTFT" in out and "strategy full" in out


def test_fuse_eval_writes_json_table_and_report(cli, tmp_path):
    report = tmp_path / "report.html"
    code, out, err = cli("fuse", "eval", "--model", "tiny-llama", "--task", "kvqa", "--n", "2", "--chunks", "2",
                         "--chunk-tokens", "48", "--strategies", "reuse,a3", "--rates", "0.1,0.5",
                         "--max-new-tokens", "3", "--report", report, "--json", tmp_path / "eval.json", "--quiet")
    assert code == 0, err
    rows = json.loads((tmp_path / "eval.json").read_text())["results"]
    assert [(r["strategy"], r["rate"]) for r in rows] == [
        ("full", None), ("reuse", None), ("a3", 0.1), ("a3", 0.5)]
    assert all(DESIGN_KEYS <= set(r) for r in rows) and all(r["n"] == 2 for r in rows)
    assert rows[0]["speedup"] == 1.0 and rows[0]["recomputed_fraction"] == 1.0 and rows[1]["recomputed_fraction"] == 0
    assert rows[3]["recomputed_fraction"] == pytest.approx(0.5, abs=0.02)
    assert "a3" in out and "speedup" in out
    assert (tmp_path / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "data:image/png;base64," in report.read_text()


@pytest.mark.parametrize("args, fragment", [
    (["run", "--chunks-file", "x.txt"], "needs --question"),
    (["run", "--chunks-file", "missing.txt", "--question", "Q?"], "chunks file missing.txt does not exist"),
    (["run", "--chunks-file", "x.txt", "--question", "Q?", "--strategy", "magic"], "unknown strategy 'magic'"),
    (["run", "--chunks-file", "x.txt", "--question", "Q?", "--evict", "dynamic"], "--evict dynamic: not an eviction policy"),
    (["run", "--chunks-file", "x.txt", "--question", "Q?", "--evict", "snapkv:pool=mean"], "pool=mean is not one of avg, max"),
    (["eval", "--task", "nothing", "--n", "1"], "not one of needle, kvqa"),
    (["eval", "--rates", "0.1,abc"], "not a comma-separated list"),
    (["eval", "--strategies", "a3:check_layer=9", "--task", "kvqa", "--n", "1", "--chunks", "1",
      "--chunk-tokens", "32"], "check_layer=9 but the model has 4 layers"),
])
def test_fuse_errors_are_one_line(cli, tmp_path, monkeypatch, args, fragment):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "x.txt").write_text("Some text.\n\nMore text.\n")
    code, out, err = cli("fuse", *args[:1], "--model", "tiny-llama", *args[1:])
    assert code == 2
    assert err.startswith("error: ") and fragment in err and err.count("\n") == 1


def test_fuse_run_refuses_a_model_whose_rope_does_not_compose(cli, tmp_path):
    loaded = llama_from_config(rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0})
    with quiet_transformers():
        loaded.model.save_pretrained(tmp_path / "model")
    tiny("tiny-llama").tokenizer.save_pretrained(tmp_path / "model")
    (tmp_path / "c.txt").write_text("Some text.\n")
    code, _, err = cli("fuse", "run", "--model", tmp_path / "model", "--chunks-file", tmp_path / "c.txt", "--question", "Q?")
    assert code == 2 and "rope_type='dynamic' changes its frequencies with the sequence length" in err
    assert err.count("\n") == 1


def test_a_prefix_text_replaces_the_chat_opening_and_is_encoded_like_precompute_does():
    from kvlab.fusion.prompt import build_prompt

    loaded = tiny("tiny-llama")
    chat = build_prompt(loaded, ["Doc."], "Q?")
    assert loaded.decode(list(chat.prefix)) == "<|user|>" and loaded.decode(list(chat.question)).endswith("<|assistant|>")
    given = build_prompt(loaded, ["Doc."], "Q?", prefix="System: be brief. ")
    assert list(given.prefix) == loaded.encode("System: be brief. ")
    plain = build_prompt(loaded, ["Doc."], "Q?", chat=False)
    assert plain.prefix == () and loaded.decode(list(plain.question)).endswith("\nAnswer:")


@pytest.mark.parametrize("extra", [[], ["--prefix", "System: answer briefly."], ["--chat"]])
def test_fuse_run_hits_every_chunk_precompute_stored(cli, tmp_path, extra):
    long_doc = " ".join(f"Fact {i}: the code of box {i} is {i * 7}." for i in range(30))  # cut into several chunks
    path = write_task_file(tmp_path / "t.jsonl", [Task("q1", ["Blue is a colour.", long_doc], "Code of box 3?", ["21"])])
    store = tmp_path / "store"
    code, _, err = cli("fuse", "precompute", "--model", "tiny-llama", "--tasks", path, "--store", store,
                       "--chunk-tokens", "64", *extra, "--quiet", "--json", tmp_path / "pre.json")
    assert code == 0, err
    stored = json.loads((tmp_path / "pre.json").read_text())["chunks"]
    assert stored >= 5  # the prefix, the short document, the long one in pieces of at most 64 tokens
    code, out, err = cli("fuse", "run", "--model", "tiny-llama", "--store", store, "--task-file", path, "--id", "q1",
                         "--chunk-tokens", "64", "--strategy", "a3", "--rate", "0.2", "-n", "2", *extra, "--json", "-")
    assert code == 0, err
    got = json.loads(out)["store"]
    assert (got["hits"], got["misses"]) == (stored, 0)


def test_fuse_eval_plot_rate_labels_do_not_overlap():
    import matplotlib.pyplot as plt

    from kvlab.fusion.report import draw_plot

    rows = [{"label": "full", "strategy": "full", "rate": None, "ttft_s": 0.30, "accuracy": 1.0, "metric": "substring"}]
    for name, shift in (("a3", 0.0), ("cacheblend", 0.0005), ("epic", 0.001)):  # three strategies at one spot
        for rate in (0.05, 0.1, 0.15, 0.3):
            rows.append({"label": name, "strategy": name, "rate": rate, "ttft_s": 0.1 + shift + rate * 0.001,
                         "accuracy": 1.0, "metric": "substring"})
    figure, labels = draw_plot(rows, "labels")
    try:
        renderer = figure.canvas.get_renderer()
        boxes = [label.get_window_extent(renderer) for label in labels]
        assert len(boxes) == 12 and sorted(label.get_text() for label in labels)[:3] == ["0.05"] * 3
        assert not [(i, j) for i in range(len(boxes)) for j in range(i) if boxes[i].overlaps(boxes[j])]
    finally:
        plt.close(figure)
