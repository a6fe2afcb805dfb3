import pytest

from kvlab.compare.diagnosis import change_label, diagnose, run_differences
from kvlab.runspec import RunSpec

GOLDEN = RunSpec.parse("dtype=float32,attn=sdpa,cache=dynamic,tp=1,device=cpu")


@pytest.mark.parametrize("test,kind,clean,diverged", [
    ("dtype=bfloat16", "dtype", "rounding budget", "range overflow"),
    ("attn=eager", "attn", "model code is not the cause", "model code wrong"),
    ("tp=2", "tp", "all-reduce order", "collectives"),
    ("device=cuda", "device", "matches the CPU run", "lowering, compiler, runtime or collectives"),
])
def test_one_changed_key_maps_to_the_decision_table(test, kind, clean, diverged):
    run = RunSpec.parse(test, check_device=False)  # a recorded run, described on any machine
    merged = RunSpec(**{k: getattr(run, k) or getattr(GOLDEN, k) for k in ("dtype", "attn", "cache", "tp", "device")})
    assert run_differences(GOLDEN, merged) == (kind,)
    assert change_label(GOLDEN, merged) == test
    assert diagnose(GOLDEN, merged, diverged=False).kind == kind
    assert clean in diagnose(GOLDEN, merged, diverged=False).text
    verdict = diagnose(GOLDEN, merged, diverged=True, where="first at position 3")
    assert diverged in verdict.text and "first at position 3" in verdict.text


def test_same_several_and_unknown():
    assert diagnose(GOLDEN, RunSpec(), diverged=False).kind == "same"  # unset keys are kvlab's defaults
    assert "nondeterminism" in diagnose(GOLDEN, GOLDEN, diverged=True).text
    several = diagnose(GOLDEN, RunSpec.parse("dtype=float16,attn=eager"), diverged=True)
    assert several.kind == "several" and several.differs_in == ("dtype", "attn")
    assert "one change at a time" in several.text
    assert diagnose(None, GOLDEN, diverged=True).kind == "unknown"


def test_a_lossless_cache_policy_that_changes_the_cache_is_a_bug():
    # dynamic is lossless: a changed cache under a changed-but-lossless policy points at the policy
    class Other:
        lossless = True

        def spec(self):
            return "other"

    test = RunSpec(dtype="float32", attn="sdpa", cache=None, tp=1, device="cpu")
    object.__setattr__(test, "cache", Other())
    verdict = diagnose(GOLDEN, test, diverged=True)
    assert verdict.kind == "cache" and "lossless policy changed the cache" in verdict.text


@pytest.mark.parametrize("evidence,diverged,kind,words", [
    # layer 0 values scrambled: no position, no attention in them -> a layout mistake
    (dict(k_rel_l2=1.2, v_rel_l2=1.3, v_cosine=0.02, first_layer=0), True, "engine:layout", "KV head order"),
    # values clean, keys off -> RoPE
    (dict(k_rel_l2=0.9, v_rel_l2=0.04, v_cosine=0.9999, first_layer=0), True, "engine:rope", "position encoding"),
    (dict(k_rel_l2=0.01, v_rel_l2=0.04, v_cosine=0.9999, first_layer=None), False, "engine:precision", "rounds"),
    # layer 0 clean, a later layer off with a lossless cache -> the attention kernel
    (dict(k_rel_l2=0.01, v_rel_l2=0.04, v_cosine=0.9999, first_layer=7), True, "engine:kernel", "layer 7"),
])
def test_engine_rows_read_layer_0(evidence, diverged, kind, words):
    from kvlab.compare.diagnosis import EngineEvidence

    test = RunSpec.parse("engine=llama.cpp,cache=f16")
    assert run_differences(GOLDEN, test) == ("engine",)
    assert change_label(GOLDEN, test) == "engine=llama.cpp,cache=f16,fa=on"
    verdict = diagnose(GOLDEN, test, diverged, "first at position 4", EngineEvidence(**evidence, tol=0.25))
    assert verdict.kind == kind and words in verdict.text and verdict.differs_in == ("engine",)


def test_a_quantized_engine_cache_diverging_deeper_is_precision_and_two_engine_runs_use_the_key_rows():
    from kvlab.compare.diagnosis import EngineEvidence

    q4 = RunSpec.parse("engine=llama.cpp,cache=q4_0")
    verdict = diagnose(GOLDEN, q4, True, "", EngineEvidence(0.11, 0.11, 0.9966, 25, 0.5))
    assert verdict.kind == "engine:precision" and "q4_0" in verdict.text
    f16 = RunSpec.parse("engine=llama.cpp,cache=f16")
    assert run_differences(f16, q4) == ("cache",) and diagnose(f16, q4, True).kind == "cache"
    assert run_differences(f16, RunSpec.parse("engine=llama.cpp,fa=off")) == ("fa",)
    assert diagnose(f16, RunSpec.parse("engine=llama.cpp,rope_base=1000"), True).kind == "rope_base"
