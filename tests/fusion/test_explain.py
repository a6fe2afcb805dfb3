"""`kvlab fuse explain`: a planted bad chunk is where the fused cache first leaves full prefill's."""

import json

import pytest

from kvlab.fusion.chunks import compute_chunk_kv
from kvlab.fusion.explain import explain
from kvlab.fusion.fused import load_chunks
from kvlab.fusion.prompt import task_prompt
from kvlab.fusion.store import open_store
from kvlab.fusion.strategies import make_strategy
from kvlab.tasks import Task, write_task_file
from tests.conftest import tiny

DOCS = ["The lighthouse keeper wrote letters every night by the sea. The code of the blue gate is 4471.",
        "Rivers bend around old stones and carry the sand down to the harbour slowly.",
        "Winter markets sell roasted nuts, warm cider and wool hats to the whole town."]
TASK = Task("gate", DOCS, "What is the code of the blue gate?", ["4471"],
            meta={"facts": ["The code of the blue gate is 4471."]})


def planted(loaded, store, prompt, chunk: int) -> None:
    """Store, under chunk `chunk`'s key, the cache of other tokens of the same length: a chunk that
    passes every store check (checksum, model, dtype, length, prefix) but holds the wrong context."""
    load_chunks(loaded, store, prompt)
    ids = list(prompt.chunks[chunk])
    key, _ = compute_chunk_kv(loaded, ids, list(prompt.prefix))
    _, wrong = compute_chunk_kv(loaded, ids[::-1], list(prompt.prefix))
    store.delete(key)
    store.put(key, wrong)


@pytest.mark.parametrize("bad", [None, 0])
def test_a_planted_bad_chunk_is_the_first_divergence(bad):
    loaded = tiny("tiny-llama")
    prompt = task_prompt(loaded, TASK)
    strategy = make_strategy("a3", 0.1)
    with open_store("memory://") as store:
        if bad is not None:
            planted(loaded, store, prompt, bad)
        result = explain(loaded, prompt, TASK, strategy, store, max_new_tokens=2)
    first = result.first_divergence
    spans = [(prompt.n_prefix + a, prompt.n_prefix + b) for a, b in prompt.spans]
    errors = result.chunk_errors()
    if bad is None:  # chunk 0 follows only the prefix in both prefills: the same cache there
        assert first is not None and first.position >= spans[1][0]
        assert max(errors[0].values()) < 1e-4
    else:
        assert spans[bad][0] <= first.position < spans[bad][1]
        assert result.where(first.position) == {"part": "chunk", "chunk": bad, "offset": first.position - spans[bad][0]}
        assert first.layer >= strategy.first_selective_layer()  # the layers before recompute every token
        assert max(errors[bad].values()) > 0.1


def test_evidence_is_located_and_attention_agrees_where_every_token_is_recomputed():
    loaded = tiny("tiny-llama")
    prompt = task_prompt(loaded, TASK)
    strategy = make_strategy("cacheblend:check_layer=1", 0.2)
    with open_store("memory://") as store:
        result = explain(loaded, prompt, TASK, strategy, store, max_new_tokens=2)
    (evidence,) = result.evidence
    assert evidence.chunk == 0
    assert "".join(result.token_texts[p] for p in evidence.positions).strip() == TASK.meta["facts"][0]
    first_selective = strategy.first_selective_layer()
    assert first_selective == 2
    for layer in range(first_selective):  # layers 0-1 are computed in full by both prefills
        assert result.attention_fused[layer] == pytest.approx(result.attention_full[layer], abs=1e-5)
    assert 0 < result.attention_full[0] < 1
    assert len(result.selected_positions()) == result.fused.recomputed == round(0.2 * prompt.n_docs)


def test_fuse_explain_cli_writes_json_and_report(cli, tmp_path):
    path = write_task_file(tmp_path / "t.jsonl", [TASK])
    report = tmp_path / "explain.html"
    code, out, err = cli("fuse", "explain", "--model", "tiny-llama", "--task-file", path, "--id", "gate",
                         "--strategy", "a3", "--rate", "0.1", "-N", "2", "--report", report, "--json", "-", "--quiet")
    assert code == 0, err
    data = json.loads(out)
    assert data["task"] == "gate" and data["first_divergence"]["part"] == "chunk"
    assert data["evidence"][0]["chunk"] == 0 and len(data["attention_on_evidence"]["fused"]) == 4
    page = report.read_text()
    assert "class='sel'" in page or "class='sel ev'" in page
    assert "First divergence" in page and "data:image/png;base64," in page
    code, out, err = cli("fuse", "explain", "--model", "tiny-llama", "--task-file", path, "--id", "gate")
    assert code == 0 and "first divergence: position" in out and "question's attention" in out


@pytest.mark.parametrize("args, fragment", [
    (["--id", "nope"], "has no task with id 'nope'"),
    (["--id", "gate", "--strategy", "full"], "explain a fused strategy"),
])
def test_fuse_explain_errors_are_one_line(cli, tmp_path, args, fragment):
    path = write_task_file(tmp_path / "t.jsonl", [TASK])
    code, out, err = cli("fuse", "explain", "--model", "tiny-llama", "--task-file", path, *args)
    assert code == 2 and err.startswith("error: ") and fragment in err and err.count("\n") == 1
