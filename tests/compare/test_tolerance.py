import pytest

from kvlab.compare.tolerance import DEFAULT_REL_L2, ToleranceError, ToleranceOverride, tolerance_for


def test_defaults_follow_the_coarser_precision():
    assert tolerance_for(["float32", "float32"], False).rel_l2 == DEFAULT_REL_L2["float32"]
    bf16 = tolerance_for(["float32", "bfloat16"], False)
    assert bf16.rel_l2 == DEFAULT_REL_L2["bfloat16"] and bf16.basis == "default for bfloat16"
    assert tolerance_for(["bfloat16", "float16"], False).rel_l2 == DEFAULT_REL_L2["bfloat16"]
    assert DEFAULT_REL_L2["float32"] < DEFAULT_REL_L2["float16"] < DEFAULT_REL_L2["bfloat16"]
    lossy = tolerance_for(["float32", "float32"], True)
    assert lossy.rel_l2 > DEFAULT_REL_L2["bfloat16"] and "lossy" in lossy.basis
    assert tolerance_for(["float32", "mystery"], False).rel_l2 == DEFAULT_REL_L2["float32"]


def test_overrides():
    one = ToleranceOverride.parse("0.02")
    assert tolerance_for(["float32", "bfloat16"], True, one).rel_l2 == 0.02
    per = ToleranceOverride.parse("bfloat16=0.3, float16=1e-3")
    assert tolerance_for(["float32", "bfloat16"], False, per).rel_l2 == 0.3
    assert tolerance_for(["float32", "float16"], False, per).basis == "--tol for float16"
    assert tolerance_for(["float32", "float32"], False, per).rel_l2 == DEFAULT_REL_L2["float32"]
    assert ToleranceOverride.parse(None) == ToleranceOverride.parse(" ") == ToleranceOverride()


@pytest.mark.parametrize("text,message", [("abc", "not a number"), ("-1", "positive"), ("nan", "positive"),
                                          ("int4=0.1", "KEY one of float32"), ("bfloat16", "not a number"),
                                          ("bfloat16=x", "not a number")])
def test_bad_values_are_one_line_errors(text, message):
    with pytest.raises(ToleranceError, match=message):
        ToleranceOverride.parse(text)
