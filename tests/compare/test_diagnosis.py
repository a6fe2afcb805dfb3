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
