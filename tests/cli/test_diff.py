import json

import pytest

from tests.compare.helpers import edited_copy, golden_run


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("pair")
    golden = golden_run()
    golden.save(root / "golden")
    row = golden.keys(2)[0, 1, 12] * 1.5
    edited_copy(golden, [(2, "keys", (0, 1, 12), row)]).save(root / "test")
    return root


def test_two_snapshots_summary_json_and_report(cli, pair, tmp_path):
    code, out, err = cli("diff", pair / "golden", pair / "test", "--json", tmp_path / "d.json",
                         "--report", tmp_path / "r.html", "-q")
    assert code == 0, err
    # two snapshot folders hold token ids and the model: its tokenizer (here built in) gives the text
    assert "first divergence: position 12 'l' (prompt token 12), layer 2, KV head 1, keys, rel-L2 0.5" in out
    assert "worst layers" in out and "worst KV heads" in out and "top-1 agreement 100.0%" in out
    data = json.loads((tmp_path / "d.json").read_text())
    assert data["golden_text"] is not None
    page = (tmp_path / "r.html").read_text()
    assert "<pre>The cache holds keys and values.</pre>" in page and "tokens by position (32 prompt" in page
    first = data["tests"][0]["first_divergence"]
    assert (first["position"], first["layer"], first["head"], first["tensor"]) == (12, 2, 1, "keys")
    assert (tmp_path / "r.html").stat().st_size > 10_000


def test_a_report_without_the_tokenizer_shows_token_ids(cli, pair, tmp_path):
    import shutil

    from kvlab.snapshot import Snapshot

    for name in ("golden", "test"):
        shutil.copytree(pair / name, tmp_path / name)
        meta = json.loads((tmp_path / name / "meta.json").read_text())
        meta["model"]["spec"] = str(tmp_path / "gone-model")  # a local folder no longer there
        (tmp_path / name / "meta.json").write_text(json.dumps(meta))
    code, out, err = cli("diff", tmp_path / "golden", tmp_path / "test", "--report", tmp_path / "r.html", "-q")
    assert code == 0, err
    token = Snapshot.load(tmp_path / "golden").token_ids[12]
    assert f"first divergence: position 12 [id {token}] (prompt token 12)" in out
    page = (tmp_path / "r.html").read_text()
    assert "tokens are shown as ids" in page and f">[{token}]<sub>12</sub>" in page


def test_json_to_stdout_is_only_json(cli, pair):
    code, out, _ = cli("diff", pair / "golden", pair / "golden", "--json", "-", "-q")
    assert code == 0
    data = json.loads(out)
    assert data["tests"][0]["first_divergence"] is None
    assert data["tests"][0]["diagnosis"]["kind"] == "same"


def test_capture_mode_writes_snapshots_and_report(cli, tmp_path):
    code, out, err = cli("diff", "--model", "tiny-mistral", "--prompt", "abc abc abc", "--golden", "dtype=float32",
                         "--test", "dtype=bfloat16", "-n", "3", "--out", tmp_path / "run", "-q")
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["golden", "report.html", "test1-dtype-bfloat16"]
    assert "test 1: dtype=bfloat16" in out and f"report written to {tmp_path / 'run' / 'report.html'}" in out


@pytest.mark.parametrize("args,message", [
    (["only-one"], "exactly two snapshots"),
    ([], "give GOLDEN TEST snapshots"),
    (["a", "b", "--test", "dtype=float16"], "not both"),
    (["--model", "tiny-llama", "--test", "dtype=float16"], "--prompt"),
    (["--model", "tiny-llama", "--prompt", "x", "--test", "dtype=int3"], "dtype=int3 is not one of"),
    (["--model", "tiny-llama", "--prompt", "x", "-n", "2", "--test", "tp=3"], "do not split 3 ways"),
    (["--model", "tiny-llama", "--prompt", "x", "--test", "dtype=float16", "--tol", "big"], "--tol"),
    (["missing-a", "missing-b"], "no snapshot at missing-a"),
])
def test_bad_input_is_one_error_line(cli, args, message):
    code, out, err = cli("diff", *args)
    assert code == 2
    assert err.startswith("error: ") and message in err and err.count("\n") == 1


def test_mismatched_models_are_one_error_line(cli, pair, tmp_path):
    golden_run("tiny-qwen2").save(tmp_path / "other")
    code, _, err = cli("diff", pair / "golden", tmp_path / "other")
    assert code == 2 and "different models" in err and err.count("\n") == 1


def test_capture_mode_says_when_the_golden_run_stopped_early_and_ignore_eos_goes_on(cli, tmp_path, monkeypatch):
    import sys

    capture_module = sys.modules["kvlab.capture"]
    code, out, err = cli("diff", "--model", "tiny-llama", "--prompt", "abc abc abc", "--test", "dtype=bfloat16",
                         "-n", "4", "--json", tmp_path / "free.json", "-q")
    assert code == 0, err
    free = json.loads((tmp_path / "free.json").read_text())
    generated = free["golden_text"]
    assert free["golden_stopped_early"] is None and "stopped early" not in out
    n_prompt, n_tokens = free["n_prompt"], free["n_tokens"]

    class EveryToken:  # every token ends the sequence: the golden run stops after its first
        def __contains__(self, token):
            return True

    monkeypatch.setattr(capture_module, "_eos_ids", lambda model: EveryToken())
    code, out, err = cli("diff", "--model", "tiny-llama", "--prompt", "abc abc abc", "--test", "dtype=bfloat16",
                         "-n", "4", "--json", tmp_path / "early.json", "-q")
    assert code == 0, err
    assert "the golden run stopped early at step 0" in out and "--ignore-eos" in out
    assert json.loads((tmp_path / "early.json").read_text())["n_tokens"] == n_prompt + 1
    code, out, err = cli("diff", "--model", "tiny-llama", "--prompt", "abc abc abc", "--test", "dtype=bfloat16",
                         "-n", "4", "--ignore-eos", "--json", tmp_path / "kept.json", "-q")
    assert code == 0, err
    kept = json.loads((tmp_path / "kept.json").read_text())
    assert "stopped early" not in out and kept["n_tokens"] == n_tokens and kept["golden_text"] == generated
