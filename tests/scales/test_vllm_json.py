import json

import pytest

from kvlab.model_facts import model_shape
from kvlab.scales import vllm_json
from kvlab.scales.scales import ScalesError


def valid(tp=2, layers=3):
    return vllm_json.schema_object({r: {i: 0.01 * (i + 1) for i in range(layers)} for r in range(tp)}, "llama")


def test_written_file_is_valid_and_reads_back(tmp_path):
    ranks = {0: {0: 0.5, 1: 0.25}, 1: {0: 0.125, 1: 1.0}}
    path = vllm_json.write(tmp_path / "s.json", ranks, "llama")
    data = json.loads(path.read_text())
    assert data["kv_cache"]["dtype"] == "float8_e4m3fn" and data["model_type"] == "llama"
    assert data["kv_cache"]["scaling_factor"] == {"0": {"0": 0.5, "1": 0.25}, "1": {"0": 0.125, "1": 1.0}}
    assert vllm_json.check(data, tp=2, n_layers=2, model_type="llama") == []
    assert vllm_json.read(path, tp=2, n_layers=2) == ("llama", ranks)


def test_model_type_null_is_flagged_unless_no_model_type_is_expected():
    data = valid()
    data["model_type"] = None
    # vLLM and SGLang validate with the model's type in the context: null != "llama" is rejected
    assert [(p.text, p.vllm) for p in vllm_json.problems(data)] == [
        ("model_type is null: vLLM and SGLang pass the model's type and reject null "
         "(if no model type is expected, say so: --no-model-type)", True)]
    assert vllm_json.check(data, model_type="llama") == ["model_type is null but the model is 'llama'"]
    assert vllm_json.check(data, expect_model_type=False) == []
    del data["model_type"]
    assert vllm_json.check(data, expect_model_type=False) == ["missing key 'model_type' (it is required)"]


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


def test_each_problem_says_whether_vllms_schema_or_kvlabs_rules_reject_it():
    """vLLM's pydantic schema reads "07", "+7", numeric strings, NaN, zero and negative scales (REFERENCE.md,
    vLLM section): kvlab keeps refusing them, as its own rules; the rest is what vLLM itself rejects."""
    data = {
        "model_type": "llama",
        "kv_cache": {
            "dtype": "float8_e4m3fn",
            "scaling_factor": {
                "rank0": {"0": 1.0},
                "0": {"0": 0.1, "01": 0.2, "+2": 0.3, "x": 0.3, "3": "0.5", "4": "half", "5": float("nan"),
                      "6": -1.0, "7": 0.0, "8": None, "9": [1.0], "10": float("inf"), "11": 10 ** 400},
            },
        },
    }
    found = {p.text: p.vllm for p in vllm_json.problems(data, tp=1, n_layers=12, model_type="llama")}
    whose = {fragment: [v for text, v in found.items() if fragment in text] for fragment in [
        "not 'rank0'", "not '01'", "not '+2'", "not 'x'", "layer '3': the scale must be a number, not a string",
        "layer '4': the scale must be a number, not a string", "layer '5'", "layer '6'", "layer '7'",
        "layer '8'", "layer '9'", "layer '10'", "layer '11': the scale is an integer of 401 digits",
        "missing layers 1, 2"]}
    assert all(len(v) == 1 for v in whose.values()), whose
    assert {k for k, v in whose.items() if v == [True]} == {
        "not 'rank0'", "not 'x'", "layer '4': the scale must be a number, not a string", "layer '8'", "layer '9'",
        "missing layers 1, 2"}


def test_a_huge_integer_scale_is_a_violation_not_a_crash(cli, tmp_path):
    path = tmp_path / "huge.json"
    path.write_text('{"model_type": "llama", "kv_cache": {"dtype": "float8_e4m3fn", "scaling_factor": '
                    '{"0": {"0": 1' + "0" * 400 + ', "1": -1' + "0" * 400 + '}}}}')
    code, out, err = cli("scales", "check", path)
    assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert out.count("too large for a float") == 2
    path.write_text('{"model_type": null, "kv_cache": {"scaling_factor": {"0": {"0": 1' + "0" * 5000 + '}}}}')
    code, _, err = cli("scales", "check", path)
    assert code == 2 and "Traceback" not in err and err.startswith("error: ") and "not valid JSON" in err

def test_structure_errors():
    assert vllm_json.check([]) == ["the top level must be a JSON object, not a list"]
    assert vllm_json.check({"model_type": "x"}) == ["missing key 'kv_cache'"]
    assert "kv_cache.scaling_factor holds no ranks" in vllm_json.check(
        {"model_type": "x", "kv_cache": {"dtype": "float8_e4m3fn", "scaling_factor": {}}})
    assert vllm_json.check({"model_type": "x", "kv_cache": {"scaling_factor": {"0": {"0": 1}}}}) == [
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
    found = vllm_json.problems(data, tp=4, n_layers=3)
    schema, own = [p.text for p in found if p.vllm], [p.text for p in found if not p.vllm]
    assert len(schema) == 4 and own == ["rank 1 layer '2': the scale must be finite and positive, got -0.5"]
    lines = out.splitlines()
    assert lines[1] == " vLLM's schema rejects:" and [line[4:] for line in lines[2:6]] == schema
    assert lines[6] == " kvlab's own rules:" and [line[4:] for line in lines[7:]] == own
    assert err.strip() == f"error: {path}: 5 violation(s): 4 that vLLM's schema rejects, 1 of kvlab's own rules"
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["ok"] is False and report["violations"] == schema + own
    assert report["context"] == {"tp": 4, "n_layers": 3}
    assert report["vllm_violations"] == schema and report["kvlab_violations"] == own
    code, _, err = cli("scales", "check", path, "--layers", "3", "--model", "tiny-llama")
    assert code == 2 and "--model or --layers" in err


def test_check_cli_null_model_type_and_no_model_type(cli, tmp_path):
    data = valid(tp=1, layers=2)
    data["model_type"] = None
    path = tmp_path / "s.json"
    path.write_text(json.dumps(data))
    code, out, err = cli("scales", "check", path)
    assert code == 2 and "model_type is null" in out and "1 that vLLM's schema rejects" in err
    code, out, err = cli("scales", "check", path, "--no-model-type")
    assert code == 0 and "valid" in out, err
    code, _, err = cli("scales", "check", path, "--no-model-type", "--model-type", "llama")
    assert code == 2 and "not both" in err


def test_check_cli_with_a_model_flags_a_tp_vllm_cannot_run(cli, tmp_path):
    from kvlab.models import load_model

    shape = model_shape(load_model("tiny-llama").config)  # 4 heads, 2 KV heads, 2 layers
    assert (shape["n_heads"], shape["n_kv_heads"]) == (4, 2)
    for tp, ok in ((2, True), (4, True), (3, False)):
        path = tmp_path / f"tp{tp}.json"
        vllm_json.write(path, {r: {i: 0.1 for i in range(shape["n_layers"])} for r in range(tp)}, "llama")
        code, out, err = cli("scales", "check", path, "--model", "tiny-llama")
        assert (code == 0) == ok, (out, err)
        assert ("vLLM refuses tp 3 for this model: tp must divide the 4 attention heads" in out) == (not ok)
