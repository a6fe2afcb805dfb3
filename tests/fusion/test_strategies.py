"""Strategy selection rules on hand-made scores (no model)."""

import math

import pytest
import torch

from kvlab.fusion.strategies import (SelectionInputs, StrategyError, make_strategy, split_budget, split_strategies,
                                     strategy_names)

SPANS = [(0, 10), (10, 14), (14, 30)]  # three chunks of 10, 4 and 16 tokens


def _inputs(**scores):
    return SelectionInputs(SPANS, **scores)


def test_registry_names_every_strategy():
    assert strategy_names() == ["full", "reuse", "last", "cacheblend", "a3", "epic", "surprisal"]


@pytest.mark.parametrize("rate, expected", [(0.0, 1), (1e-9, 1), (0.15, 4), (0.5, 15), (1.0, 30)])
def test_count_is_the_rate_clamped_to_one_and_the_candidates(rate, expected):
    assert make_strategy("last", rate).budget(30) == expected
    assert make_strategy("last", rate).budget(0) == 0


def test_split_budget_floors_then_largest_remainders():
    assert split_budget(10, [10, 4, 16]) == [4, 1, 5]  # quotas 3.33, 1.33, 5.33: floors 3, 1, 5, a tie -> the first
    assert split_budget(3, [10, 4, 16]) == [1, 0, 2]  # quotas 1.0, 0.4, 1.6: the one left goes to remainder .6
    assert split_budget(6, [10, 4, 16]) == [2, 1, 3]  # quotas 2.0, 0.8, 3.2
    assert sum(split_budget(7, [1, 1, 1, 50])) == 7
    assert split_budget(30, [10, 4, 16]) == [10, 4, 16]


def test_reuse_last_and_epic_rows():
    assert make_strategy("reuse").select(_inputs()).tolist() == []
    assert make_strategy("last", 0.1).select(_inputs()).tolist() == [27, 28, 29]
    assert make_strategy("epic", 0.34).select(_inputs()).tolist() == [0, 1, 2, 3, 10, 14, 15, 16, 17, 18]
    assert make_strategy("epic:k=2").select(_inputs()).tolist() == [0, 1, 10, 11, 14, 15]


def test_cacheblend_takes_the_largest_deviations_globally_or_per_chunk():
    deviation = torch.zeros(30)
    deviation[[3, 5, 20, 21, 22]] = torch.tensor([5.0, 4.0, 3.0, 2.0, 1.0])
    assert make_strategy("cacheblend", 0.1).select(_inputs(deviation=deviation)).tolist() == [3, 5, 20]
    per_chunk = make_strategy("cacheblend:per_chunk=true", 0.1).select(_inputs(deviation=deviation)).tolist()
    assert per_chunk == [3, 20, 21]  # budget 3 split 1/0/2 (floors 1, 0, 1 + the largest remainder: chunk 3)


def test_a_false_string_is_false():
    """The seed code tested a mode string as a bool ("false" is truthy); parameters are typed here."""
    for text in ("false", "False", "0", "no", "off"):
        assert make_strategy(f"a3:per_chunk={text}").per_chunk is False
    assert make_strategy("a3:per_chunk").per_chunk is True
    with pytest.raises(StrategyError, match="per_chunk=maybe is not true or false"):
        make_strategy("a3:per_chunk=maybe")


def test_a3_pools_question_attention_before_ranking():
    attention = torch.zeros(30)
    attention[12] = 10.0  # one spike...
    attention[[24, 25, 26, 27, 28]] = 3.0  # ...loses to a broad region once pooled over 5 tokens
    assert make_strategy("a3:pool=1", 0.04).select(_inputs(attention=attention)).tolist() == [12]
    assert make_strategy("a3", 0.04).select(_inputs(attention=attention)).tolist() == [26]


def test_surprisal_ranks_within_each_chunk_and_unknown_first_tokens_first():
    surprisal = torch.arange(30, dtype=torch.float32)
    surprisal[0] = math.nan
    rows = make_strategy("surprisal", 0.2).select(_inputs(surprisal=surprisal)).tolist()
    assert rows == [0, 9, 13, 27, 28, 29]  # 2 + 1 + 3 tokens; row 0's NaN (nothing before it) ranks first


def test_check_layer_starts_the_selective_layers():
    assert make_strategy("a3:check_layer=1").first_selective_layer() == 2
    assert make_strategy("cacheblend:check_layer=0").first_selective_layer() == 1
    assert make_strategy("epic").first_selective_layer() == 0
    # a3 at layer 0 (its default) scores over the stored cache, so its first layer is already selective
    assert make_strategy("a3").first_selective_layer() == 0 and make_strategy("a3").scout_layer == 0
    assert make_strategy("a3:check_layer=0,scout=false").first_selective_layer() == 1
    assert make_strategy("a3:scout=true,check_layer=3").scout_layer == 3
    assert make_strategy("a3:check_layer=3").scout_layer is None
    assert make_strategy("a3:check_layer=3", 0.3).spec() == "a3:check_layer=3,per_chunk=false,pool=5"


@pytest.mark.parametrize("text, fragment", [
    ("nope", "unknown strategy 'nope'; allowed: full, reuse, last"),
    ("a3:depth=2", "unknown parameter 'depth'"),
    ("a3:rate=1.5", "rate must be within [0, 1]"),
    ("a3:check_layer=-1", "check_layer must be at least 0"),
    ("a3:pool=4", "pool must be an odd width"),
    ("epic:k=0", "k must be at least 1"),
])
def test_bad_specs_are_one_line_errors(text, fragment):
    with pytest.raises(StrategyError, match=fragment.replace("[", r"\[").replace("]", r"\]")) as info:
        make_strategy(text)
    assert "\n" not in str(info.value)


def test_a_strategy_list_keeps_each_strategy_with_its_parameters():
    assert split_strategies("a3:check_layer=0,scout=true,cacheblend, epic:k=4,") == [
        "a3:check_layer=0,scout=true", "cacheblend", "epic:k=4"]
    assert split_strategies("reuse,a3") == ["reuse", "a3"]
    # a parameter with nothing before it is left alone, for make_strategy to refuse by name
    assert split_strategies("pool=3,a3") == ["pool=3", "a3"]
    assert split_strategies("reuse,pool=3") == ["reuse", "pool=3"]  # reuse has no parameters to extend
