"""Attention taps and routes: they see the real queries, change nothing unless a route does, and nest."""

import torch

from kvlab.caches.taps import attention_taps
from kvlab.intercept import current_attention
from tests.conftest import tiny


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=torch.tensor([[1, 2, 3, 4, 5]])).logits


def test_a_tap_sees_every_call_of_its_layer_and_changes_nothing():
    model = tiny("tiny-llama").model
    before, seen = _logits(model), []
    with attention_taps(model, {0: lambda module, query, key, mask, kwargs: seen.append(query.shape[-2])}):
        during = _logits(model)
    assert seen == [5]
    assert torch.equal(during, before)


def test_nested_blocks_on_one_layer_compose_and_each_puts_back_what_it_found():
    model = tiny("tiny-llama").model
    attention = current_attention(model)
    before, calls = _logits(model), []

    def halve(kernel, module, query, key, value, mask, **kwargs):
        calls.append("outer")
        out, weights = kernel(module, query, key, value, mask, **kwargs)
        return out * 0.5, weights

    def double(kernel, module, query, key, value, mask, **kwargs):
        calls.append("inner")
        out, weights = kernel(module, query, key, value, mask, **kwargs)
        return out * 2.0, weights

    taps = []
    with attention_taps(model, {0: lambda *a: taps.append("outer")}, {0: halve}):
        halved = _logits(model)
        with attention_taps(model, {0: lambda *a: taps.append("inner")}, {0: double}):
            assert torch.allclose(_logits(model), before, atol=1e-5)  # double(halve(kernel)) is the kernel again
        assert torch.equal(_logits(model), halved)  # the outer route is back, not dropped
    assert calls == ["outer", "inner", "outer", "outer"]
    assert taps == ["outer", "outer", "inner", "outer"]
    assert not torch.equal(halved, before)
    assert torch.equal(_logits(model), before)
    assert current_attention(model) == attention
