"""`intercept`: hooks and a swapped attention function live exactly as long as the `with` block."""

import pytest
import torch

from kvlab.errors import KvlabError
from kvlab.intercept import current_attention, intercept, register_attention
from kvlab.model_facts import attention_modules, decoder_layers
from tests.conftest import tiny

SPY = "kvlab_test_spy"


def _spy(module, query, key, value, attention_mask, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    _spy.calls += 1
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


_spy.calls = 0


def _n_hooks(model) -> int:
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())


def _forward(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=torch.tensor([[1, 2, 3, 4]])).logits


@pytest.fixture
def model():
    from transformers.masking_utils import sdpa_mask

    register_attention(SPY, _spy, sdpa_mask)
    model = tiny("tiny-llama").model
    before = current_attention(model)
    yield model
    assert current_attention(model) == before and _n_hooks(model) == 0


def test_hooks_run_and_the_attention_is_swapped_inside_the_block(model):
    seen: list[str] = []
    layers = decoder_layers(model)
    pre = [(layer, lambda module, args, kwargs: seen.append("pre")) for layer in layers]
    post = [(layer, lambda module, args, kwargs, output: seen.append("post")) for layer in layers]
    calls = _spy.calls
    with intercept(model, attention=SPY, pre=pre, post=post):
        assert current_attention(model) == SPY
        _forward(model)
    assert seen == ["pre", "post"] * len(layers)
    assert _spy.calls - calls == len(layers)
    seen.clear()
    _forward(model)
    assert seen == [] and _spy.calls - calls == len(layers)


def test_an_exception_inside_removes_the_hooks_and_restores_the_attention(model):
    before = current_attention(model)
    modules = attention_modules(model)
    with pytest.raises(RuntimeError, match="inside"):
        with intercept(model, attention=SPY, pre=[(m, lambda *a: None) for m in modules],
                       post=[(m, lambda *a: None) for m in modules]):
            assert _n_hooks(model) == 2 * len(modules)
            raise RuntimeError("inside")
    assert current_attention(model) == before and _n_hooks(model) == 0


def test_a_hook_that_raises_in_the_forward_pass_leaves_nothing_behind(model):
    def refuse(module, args, kwargs):
        raise KvlabError("refused")

    before = current_attention(model)
    with pytest.raises(KvlabError, match="refused"):
        with intercept(model, attention=SPY, pre=[(decoder_layers(model)[0], refuse)]):
            _forward(model)
    assert current_attention(model) == before and _n_hooks(model) == 0


def test_post_hooks_run_even_on_an_error_with_always_call(model):
    seen: list[str] = []

    def refuse(module, args, kwargs):
        raise KvlabError("refused")

    attention = attention_modules(model)[0]
    with pytest.raises(KvlabError):
        with intercept(model, pre=[(attention, refuse)],
                       post=[(attention, lambda module, args, kwargs, output: seen.append("post"))],
                       always_call=True):
            _forward(model)
    assert seen == ["post"]


def test_an_unknown_attention_is_one_error_and_changes_nothing(model):
    before = current_attention(model)
    with pytest.raises(KvlabError, match="attn=no_such_kernel"):
        with intercept(model, attention="no_such_kernel", pre=[(model, lambda *a: None)]):
            pass
    assert current_attention(model) == before and _n_hooks(model) == 0


def test_nested_blocks_each_put_back_what_they_found(model):
    before = current_attention(model)
    outer_hook = [(model, lambda *a: None)]
    inner_hooks = [(layer, lambda *a: None) for layer in decoder_layers(model)]
    with intercept(model, attention=SPY, pre=outer_hook):
        with intercept(model, attention="eager", pre=inner_hooks):
            assert current_attention(model) == "eager"
            assert _n_hooks(model) == 1 + len(inner_hooks)
        assert current_attention(model) == SPY and _n_hooks(model) == 1
        with pytest.raises(ValueError):
            with intercept(model, attention=before, pre=inner_hooks):
                raise ValueError
        assert current_attention(model) == SPY and _n_hooks(model) == 1
        with intercept(model, pre=inner_hooks):  # hooks only: the attention stays as it is
            assert current_attention(model) == SPY
    assert current_attention(model) == before and _n_hooks(model) == 0


def test_registering_again_is_harmless():
    from transformers import AttentionInterface

    register_attention(SPY, _spy)
    register_attention(SPY, _spy)
    assert AttentionInterface._global_mapping[SPY] is _spy

