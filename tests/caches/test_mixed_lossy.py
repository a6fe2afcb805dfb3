"""What the mixed cache costs in logits against the exact cache (DynamicCache), teacher-forced.

Bounds are the largest |logit difference| over all steps, set at about twice what was measured
(tiny models: 64-token prompt, 24 steps, hot=8, group=8; smollm2: see the slow test), so a
regression in quantization or attention shows while rounding noise does not.
"""

from __future__ import annotations

import pytest

import kvlab
from tests.conftest import TINY_FAMILIES, tiny

# measured maxima over the four tiny families: kivi2 0.54, kivi4 0.17, kivi8 0.0071, q8_0 0.014,
# q4_0 0.29, fp8 0.075
TINY_BOUNDS = {
    "scheme=kivi,bits=2": 1.2,
    "scheme=kivi,bits=4": 0.4,
    "scheme=kivi,bits=8": 0.02,
    "scheme=q8_0": 0.03,
    "scheme=q4_0": 0.6,
    "scheme=fp8": 0.15,
}
PROMPT = [(i * 37) % 256 for i in range(64)]


def _logit_error(loaded, golden, run):
    test = kvlab.capture(loaded, None, run, force=golden)
    agree = sum(a == b for a, b in zip(test.meta["greedy_ids"], golden.meta["greedy_ids"]))
    return (test.logits() - golden.logits()).abs().max().item(), agree, golden.logits().shape[0]


@pytest.mark.parametrize("name", TINY_FAMILIES)
def test_tiny_models_stay_within_the_stated_bounds(name):
    loaded = tiny(name)
    golden = kvlab.capture(loaded, PROMPT, max_new_tokens=24, stop_at_eos=False)
    errors = {}
    for scheme, bound in TINY_BOUNDS.items():
        error, _, _ = _logit_error(loaded, golden, f"cache=mixed:{scheme},hot=8,group=8")
        assert 0 < error <= bound, (scheme, error)
        errors[scheme] = error
    # more bits, less error: the bounds are not all loose enough to hide a mix-up of formats
    assert errors["scheme=kivi,bits=8"] < errors["scheme=kivi,bits=4"] < errors["scheme=kivi,bits=2"]
    assert errors["scheme=q8_0"] < errors["scheme=q4_0"]


# measured on smollm2 (196-token chat prompt, 8 steps, hot=32, group=32): kivi2 7.5 (6/8 greedy
# tokens agree), kivi4 1.9, kivi8 0.076, q8_0 0.13, q4_0 2.7, fp8 0.62; bounds about 2x
SMOLLM2_BOUNDS = {
    "scheme=kivi,bits=4": 4.0,
    "scheme=kivi,bits=8": 0.3,
    "scheme=q8_0": 0.4,
    "scheme=fp8": 1.5,
}


@pytest.mark.slow
def test_smollm2_stays_within_the_stated_bounds(smollm2):
    from kvlab.tasks.needle import haystack

    text = " ".join(haystack(smollm2.tokenizer, 150))
    prompt = smollm2.encode("Summarise this in one sentence.\n\n" + text, chat=True)
    golden = kvlab.capture(smollm2, prompt, max_new_tokens=8, stop_at_eos=False)
    for scheme, bound in SMOLLM2_BOUNDS.items():
        error, agree, steps = _logit_error(smollm2, golden, f"cache=mixed:{scheme},hot=32,group=32")
        assert 0 < error <= bound, (scheme, error)
        assert agree >= steps - 1, (scheme, agree)
