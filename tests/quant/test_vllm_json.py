import json

import pytest

from kvlab.quant import vllm_json
from kvlab.quant.scales import ScalesError


def valid(tp=2, layers=3):
    return vllm_json.to_json({r: {i: 0.01 * (i + 1) for i in range(layers)} for r in range(tp)}, "llama")


def test_written_file_is_valid_and_reads_back(tmp_path):
    ranks = {0: {0: 0.5, 1: 0.25}, 1: {0: 0.125, 1: 1.0}}
    path = vllm_json.write(tmp_path / "s.json", ranks, "llama")
    data = json.loads(path.read_text())
    assert data["kv_cache"]["dtype"] == "float8_e4m3fn" and data["model_type"] == "llama"
    assert data["kv_cache"]["scaling_factor"] == {"0": {"0": 0.5, "1": 0.25}, "1": {"0": 0.125, "1": 1.0}}
    assert vllm_json.check(data, tp=2, n_layers=2, model_type="llama") == []
    assert vllm_json.read(path, tp=2, n_layers=2) == ("llama", ranks)


def test_model_type_may_be_null_but_must_be_present():
    data = valid()
    data["model_type"] = None
    assert vllm_json.check(data) == []
    del data["model_type"]
    assert vllm_json.check(data) == ["missing key 'model_type' (it is required; it may be null)"]


def test_every_violation_is_listed():
    data = {
        "model_type": 7,
        "kv_cache": {
            "dtype": "float16",
            "scaling_factor": {
                "rank0": {"0": 1.0},
                "0": {"0": 0.1, "x": 0.2, "2": -1.0, "3": "0.5", "4": float("nan"), "5": True},
                "2": {"0": 0.0},
            },
        },
    }
    problems = vllm_json.check(data, tp=2, n_layers=6)
    expected_fragments = [
        "model_type must be a string or null",
        "kv_cache.dtype is 'float16'",
        "rank keys must be integer strings like \"0\", not 'rank0'",
        "layer keys must be integer strings",
        "rank 0 layer '2': the scale must be finite and positive, got -1.0",
        "rank 0 layer '3': the scale must be a number, not a string",
        "rank 0 layer '4': the scale must be finite and positive, got nan",
        "rank 0 layer '5': the scale must be a number, not a boolean",
        "rank 2 layer '0': the scale must be finite and positive, got 0.0",
        "3 ranks but tp is 2",
        "missing ranks 1",
        "ranks 2 are beyond tp 2",
        "rank 0: missing layers 1 (needs 0..5)",
        "rank 2: missing layers 1..5",
    ]
    for fragment in expected_fragments:
        assert any(fragment in p for p in problems), (fragment, problems)


def test_structure_errors():
    assert vllm_json.check([]) == ["the top level must be a JSON object, not a list"]
    assert vllm_json.check({"model_type": None}) == ["missing key 'kv_cache'"]
    assert "kv_cache.scaling_factor holds no ranks" in vllm_json.check(
        {"model_type": None, "kv_cache": {"dtype": "float8_e4m3fn", "scaling_factor": {}}})
    assert vllm_json.check({"model_type": None, "kv_cache": {"scaling_factor": {"0": {"0": 1}}}}) == [
        "missing key 'kv_cache.dtype' (must be 'float8_e4m3fn')"]


def test_context_mismatches():
    data = valid(tp=2, layers=3)
    assert vllm_json.check(data) == []
    assert vllm_json.check(data, tp=4) == ["2 ranks but tp is 4", "missing ranks 2, 3 (tp 4 needs ranks 0..3)"]
    assert vllm_json.check(data, n_layers=2) == [
        "rank 0: layers 2 are beyond the model's 2 layers", "rank 1: layers 2 are beyond the model's 2 layers"]
    assert vllm_json.check(data, model_type="qwen2") == ["model_type is 'llama' but the model is 'qwen2'"]


def test_duplicate_keys_and_bad_json(tmp_path):
    path = tmp_path / "dup.json"
    path.write_text('{"model_type": null, "kv_cache": {"dtype": "float8_e4m3fn", '
                    '"scaling_factor": {"0": {"0": 0.1, "0": 0.2}}}}')
    _, problems = vllm_json.load_text(path)
    assert problems == ["duplicate key '0' (JSON keeps only the last)"]
    with pytest.raises(ScalesError, match="duplicate key"):
        vllm_json.read(path)
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ScalesError, match="not valid JSON"):
        vllm_json.read(tmp_path / "bad.json")
    with pytest.raises(ScalesError, match="does not exist"):
        vllm_json.read(tmp_path / "none.json")


def test_refuses_to_write_invalid(tmp_path):
    with pytest.raises(ScalesError, match="finite and positive"):
        vllm_json.write(tmp_path / "s.json", {0: {0: float("inf")}}, None)
    assert not (tmp_path / "s.json").exists()


def test_check_cli_lists_each_violation(cli, tmp_path):
    data = valid(tp=2, layers=3)
    data["kv_cache"]["dtype"] = "float16"
    data["kv_cache"]["scaling_factor"]["1"]["2"] = -0.5
    del data["kv_cache"]["scaling_factor"]["0"]["1"]
    path = tmp_path / "s.json"
    path.write_text(json.dumps(data))
    code, out, err = cli("scales", "check", path, "--tp", "4", "--layers", "3", "--json", tmp_path / "r.json")
    expected = vllm_json.check(data, tp=4, n_layers=3)
    assert len(expected) == 5
    assert code == 2 and [line[4:] for line in out.splitlines() if line.startswith("  - ")] == expected
    assert err.strip() == f"error: {path} breaks vLLM's schema (5 violation(s))"
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["ok"] is False and report["violations"] == expected and report["context"] == {"tp": 4, "n_layers": 3}
    code, _, err = cli("scales", "check", path, "--layers", "3", "--model", "tiny-llama")
    assert code == 2 and "--model or --layers" in err
