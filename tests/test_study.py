import json

import pytest

from kvlab.errors import KvlabError
from kvlab.runspec import RunSpec
from kvlab.snapshot import Snapshot
from kvlab.study import resolve_test_runs, run_study

PROMPT = "Keys and values, position by position."

# DESIGN.md, "Machine-readable output", kvlab diff
TEST_KEYS = {"run", "first_divergence", "layers", "logits"}
DIVERGENCE_KEYS = {"position", "layer", "head", "tensor", "error"}
LOGITS_KEYS = {"first_token_mismatch", "kl_mean", "top1_agreement"}
ERROR_KEYS = {"max_abs", "rel_l2", "cosine"}


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    out = tmp_path_factory.mktemp("study")
    return run_study("tiny-llama", PROMPT, golden="dtype=float32",
                     tests=["dtype=bfloat16", "dtype=float16", "attn=eager"], max_new_tokens=10, out=out), out


def test_precision_study_orders_the_runs_and_teacher_forces_them(study):
    result, out = study
    golden = result.golden
    assert [r.label for r in result.results] == ["dtype=bfloat16", "dtype=float16", "attn=eager"]
    assert [r.test_run for r in result.results] == [
        "dtype=bfloat16,attn=sdpa,cache=dynamic,tp=1,device=cpu",
        "dtype=float16,attn=sdpa,cache=dynamic,tp=1,device=cpu",
        "dtype=float32,attn=eager,cache=dynamic,tp=1,device=cpu",
    ]
    saved = sorted(p.name for p in out.iterdir())
    assert saved == ["golden", "test1-dtype-bfloat16", "test2-dtype-float16", "test3-attn-eager"]
    for name in saved[1:]:
        snap = Snapshot.load(out / name)
        assert snap.token_ids == golden.token_ids and snap.meta["teacher_forced"]
    bf16, fp16, eager = (r.cache.total_errors("keys").rel_l2 for r in result.results)
    # bfloat16 has 8 mantissa bits, float16 11: its cache is several times closer; eager is float32
    assert bf16 > 3 * fp16 > 0 and 0 < eager < 1e-5
    for r in result.results:
        assert r.first_divergence is None  # default tolerances: rounding alone is not a divergence
        assert r.logits.top1_agreement == 1.0 and r.logits.first_token_mismatch is None
    assert [r.diagnosis.kind for r in result.results] == ["dtype", "dtype", "attn"]
    assert result.golden_text() and result.golden.n_prompt == len(PROMPT)


def test_json_follows_the_design_contract(study):
    result, _ = study
    data = json.loads(json.dumps(result.to_dict(), allow_nan=False))
    assert data["golden"] == "dtype=float32,attn=sdpa,cache=dynamic,tp=1,device=cpu"
    assert len(data["tests"]) == 3
    for entry in data["tests"]:
        assert TEST_KEYS <= set(entry)
        assert entry["first_divergence"] is None
        assert LOGITS_KEYS <= set(entry["logits"])
        assert isinstance(entry["logits"]["kl_mean"], float) and entry["logits"]["first_token_mismatch"] is None
        assert [layer["layer"] for layer in entry["layers"]] == [0, 1, 2, 3]
        for layer in entry["layers"]:
            assert set(layer) == {"layer", "keys", "values"}
            assert set(layer["keys"]) == set(layer["values"]) == ERROR_KEYS
    tight = run_study("tiny-llama", PROMPT, tests=["dtype=bfloat16"], max_new_tokens=4, tol="1e-4").to_dict()
    first = tight["tests"][0]["first_divergence"]
    assert DIVERGENCE_KEYS <= set(first) and first["tensor"] in ("keys", "values")
    assert first["error"] > 1e-4


def test_test_specs_inherit_the_golden_keys():
    golden = RunSpec.parse("dtype=float16,attn=eager")
    runs = resolve_test_runs(golden, ["attn=sdpa", "dtype=bfloat16,cache=dynamic"])
    assert [str(r) for r in runs] == ["dtype=float16,attn=sdpa", "dtype=bfloat16,attn=eager,cache=dynamic"]


def test_a_tensor_parallel_test_run_is_captured_on_its_ranks_and_diffed():
    study = run_study("tiny-llama", PROMPT, tests=["tp=2"], max_new_tokens=3).to_dict()
    (entry,) = study["tests"]
    assert ",tp=2," in entry["run"] and entry["first_divergence"] is None
    assert entry["logits"]["top1_agreement"] == 1.0
    # all-reduce order is the only difference from tp=1
    assert max(layer["keys"]["max_abs"] for layer in entry["layers"]) < 1e-5


def test_a_golden_run_that_stops_early_says_at_which_step_and_ignore_eos_keeps_going(monkeypatch):
    import sys

    capture_module = sys.modules["kvlab.capture"]  # `kvlab.capture` the attribute is the function
    free = run_study("tiny-llama", PROMPT, tests=["dtype=bfloat16"], max_new_tokens=6)
    generated = free.golden.token_ids[free.golden.n_prompt:]
    stop = next(i for i, t in enumerate(generated) if t not in generated[:i] and i >= 1)
    monkeypatch.setattr(capture_module, "_eos_ids", lambda model: {generated[stop]})

    early = run_study("tiny-llama", PROMPT, tests=["dtype=bfloat16"], max_new_tokens=6)
    assert early.golden.token_ids == free.golden.token_ids[:free.golden.n_prompt + stop + 1]
    assert early.golden_stop == {"step": stop, "steps": stop + 1, "asked": 6, "token": generated[stop]}
    assert f"stopped early at step {stop}" in early.stop_note() and "--ignore-eos" in early.stop_note()
    assert early.to_dict()["golden_stopped_early"]["step"] == stop

    kept = run_study("tiny-llama", PROMPT, tests=["dtype=bfloat16"], max_new_tokens=6, ignore_eos=True)
    assert kept.golden.token_ids == free.golden.token_ids and kept.golden_stop is None
    assert kept.stop_note() is None and kept.to_dict()["golden_stopped_early"] is None


def test_engine_test_specs_take_no_transformers_keys_from_the_golden():
    golden = RunSpec.parse("dtype=float32,attn=eager")
    runs = resolve_test_runs(golden, ["engine=llama.cpp,cache=q8_0", "engine=llama.cpp", "dtype=float16"])
    assert [str(r) for r in runs] == ["engine=llama.cpp,cache=q8_0", "engine=llama.cpp", "dtype=float16,attn=eager"]
    on_engine = resolve_test_runs(RunSpec.parse("engine=llama.cpp,cache=f16,fa=off"), ["cache=f32", "fa=on"])
    assert [str(r) for r in on_engine] == ["engine=llama.cpp,cache=f32,fa=off", "engine=llama.cpp,cache=f16,fa=on"]
