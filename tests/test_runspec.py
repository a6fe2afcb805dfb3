from dataclasses import dataclass
from typing import Literal

import pytest

from kvlab.caches import CachePolicy, register
from kvlab.runspec import RunSpec, RunSpecError


@register("test-params")
@dataclass(frozen=True)
class _ParamsPolicy(CachePolicy):
    """A policy used only here, to exercise every parameter type."""

    bits: Literal[2, 4, 8] = 4
    hot: int = 128
    ratio: float | None = None
    scheme: Literal["kivi", "q8_0"] = "kivi"
    auto: bool = False
    length: int | Literal["auto"] = 0

    def validate(self) -> None:
        if self.ratio is not None and not 0 <= self.ratio <= 1:
            raise ValueError(f"ratio={self.ratio} must be within [0, 1]")


def test_empty_spec_has_defaults():
    spec = RunSpec.parse("").with_defaults()
    assert str(spec) == "dtype=float32,attn=sdpa,cache=dynamic,tp=1,device=cpu"
    assert spec.torch_dtype.is_floating_point


def test_only_given_keys_are_set():
    spec = RunSpec.parse("dtype=bfloat16")
    assert spec.dtype == "bfloat16" and spec.cache is None and spec.tp is None
    assert str(spec) == "dtype=bfloat16"


def test_cache_parameters_follow_the_policy_until_the_next_key():
    spec = RunSpec.parse("cache=test-params:bits=2,hot=64,scheme=q8_0,auto,tp=2,dtype=float16")
    policy = spec.cache
    assert (policy.bits, policy.hot, policy.scheme, policy.auto) == (2, 64, "q8_0", True)
    assert spec.tp == 2 and spec.dtype == "float16"


def test_round_trip_through_the_canonical_string():
    text = "dtype=bfloat16,attn=eager,cache=test-params:bits=8,hot=16,ratio=0.25,length=auto,tp=3,device=cpu"
    spec = RunSpec.parse(text)
    again = RunSpec.parse(str(spec))
    assert again == spec
    assert again.cache.length == "auto" and again.cache.ratio == 0.25


def test_union_of_int_and_literal():
    assert RunSpec.parse("cache=test-params:length=12").cache.length == 12


@pytest.mark.parametrize(
    "text, fragments",
    [
        ("dtyp=float32", ["unknown key 'dtyp'", "dtype, attn, cache, tp, device"]),
        ("dtype=float8", ["dtype=float8", "float32, float16, bfloat16"]),
        ("attn=magic", ["attn=magic", "sdpa", "eager"]),
        ("tp=0", ["tp=0"]),
        ("tp=two", ["tp=two"]),
        ("device=tpu", ["device=tpu"]),
        ("cache=nope", ["unknown cache policy", "dynamic"]),
        ("cache=dynamic:bits=4", ["unknown parameter 'bits'", "allowed: none"]),
        ("cache=test-params:bits=3", ["bits=3", "one of 2, 4, 8"]),
        ("cache=test-params:bit=2", ["unknown parameter 'bit'", "bits, hot, ratio, scheme, auto, length"]),
        ("cache=test-params:hot=many", ["hot=many", "an integer"]),
        ("cache=test-params:hot", ["'hot' needs a value"]),
        ("cache=test-params:ratio=2", ["ratio=2.0 must be within [0, 1]"]),
        ("cache=test-params:bits=2,bits=4", ["given twice"]),
        ("dtype=float32,dtype=float16", ["given twice"]),
    ],
)
def test_errors_name_the_problem_and_what_is_allowed(text, fragments):
    with pytest.raises(RunSpecError) as info:
        RunSpec.parse(text)
    message = str(info.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message


def test_resolve_takes_unset_keys_from_the_model_and_rejects_contradictions():
    from tests.conftest import tiny

    model = tiny("tiny-llama").model
    resolved = RunSpec.parse("cache=dynamic").resolve(model)
    assert resolved.dtype == "float32" and resolved.device == "cpu" and resolved.attn == "sdpa"
    with pytest.raises(RunSpecError, match="dtype=bfloat16"):
        RunSpec.parse("dtype=bfloat16").resolve(model)


def test_engine_run_specs_take_their_own_keys_only():
    spec = RunSpec.parse("engine=llama.cpp,cache=q8_0,fa=off,rope_base=20000")
    assert spec.is_engine and spec.policy.spec() == "q8_0" and spec.fa is False and spec.rope_base == 20000
    assert str(spec) == "engine=llama.cpp,cache=q8_0,fa=off,rope_base=20000"
    assert str(RunSpec.parse("engine=llama.cpp").with_defaults()) == "engine=llama.cpp,cache=f16,fa=on"
    assert str(RunSpec.parse("engine=transformers,dtype=float16")) == "dtype=float16"  # the default engine
    assert not RunSpec.parse("engine=llama.cpp,cache=q4_0").policy.lossless
    assert RunSpec.parse("engine=llama.cpp,cache=f16").policy.lossless


@pytest.mark.parametrize("text,message", [
    ("engine=llama.cpp,dtype=float16", "dtype= does not apply to engine=llama.cpp"),
    ("engine=llama.cpp,cache=mixed", "not a llama.cpp cache type"),
    ("engine=llama.cpp,cache=q8_0:bits=4", "take no parameters"),
    ("engine=llama.cpp,fa=maybe", "fa=maybe is not on or off"),
    ("engine=llama.cpp,rope_base=-1", "not a positive number"),
    ("engine=sglang", "not one of transformers, llama.cpp, vllm"),
    ("dtype=float16,fa=on", "engine setting"),
])
def test_bad_engine_specs_are_one_line(text, message):
    with pytest.raises(RunSpecError, match=message):
        RunSpec.parse(text)
