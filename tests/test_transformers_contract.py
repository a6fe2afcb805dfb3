"""The parts of transformers' cache and attention API that kvlab stands on.

The contract moves inside 5.x; when an upgrade breaks one of these, it fails here, in one
place, instead of deep inside a cache policy.
"""

import inspect

import pytest
import torch
import transformers
from packaging.version import Version
from transformers import AttentionInterface, Cache, DynamicCache
from transformers.cache_utils import CacheLayerMixin, DynamicLayer

from tests.conftest import TINY_FAMILIES, tiny


def test_version_is_in_the_pinned_range():
    assert Version("5.23") <= Version(transformers.__version__) < Version("5.24")


def test_layer_mixin_contract():
    abstract = CacheLayerMixin.__abstractmethods__
    assert {"lazy_initialization", "update", "get_mask_sizes", "get_seq_length", "get_max_length"} <= set(abstract)
    layer = DynamicLayer()
    k, v = torch.randn(1, 2, 3, 4), torch.randn(1, 2, 3, 4)
    keys, values = layer.update(k, v)
    assert torch.equal(keys, k) and torch.equal(values, v)
    keys, values = layer.update(k[:, :, :1], v[:, :, :1])
    assert keys.shape[-2] == 4 and layer.get_seq_length() == 4
    assert layer.get_mask_sizes(1) == (5, 0)
    assert layer.get_max_length() == -1
    layer.crop(-2)
    assert layer.get_seq_length() == 2
    with pytest.raises(ValueError):
        layer.crop(1)


def test_cache_from_layers_and_from_tensors():
    cache = Cache(layers=[DynamicLayer(), DynamicLayer()])
    assert len(cache) == 2
    k = torch.randn(1, 2, 5, 4)
    filled = DynamicCache(ddp_cache_data=[(k, k + 1), (k + 2, k + 3)])
    assert filled.get_seq_length() == 5 and torch.equal(filled.layers[1].values, k + 3)
    params = inspect.signature(DynamicCache.__init__).parameters
    assert {"ddp_cache_data", "config", "offloading"} <= set(params)


class _RecordingCache(DynamicCache):
    def __init__(self, config):
        super().__init__(config=config)
        self.calls = []

    def update(self, *args, **kwargs):
        self.calls.append((len(args), tuple(sorted(kwargs))))
        return super().update(*args, **kwargs)


@pytest.mark.parametrize("name", TINY_FAMILIES)
def test_attention_calls_update_with_key_value_and_layer_only(name):
    loaded = tiny(name)
    cache = _RecordingCache(loaded.config)
    loaded.model(torch.tensor([[1, 2, 3]]), past_key_values=cache, use_cache=True)
    assert len(cache.calls) == loaded.config.num_hidden_layers
    assert set(cache.calls) == {(3, ())}
    assert all(type(layer) is DynamicLayer for layer in cache.layers)


@pytest.mark.parametrize("name", TINY_FAMILIES)
def test_cached_keys_are_post_rope_and_not_repeated(name):
    """K in the cache = RoPE(k_proj(normed input)) at the token's position, one per KV head."""
    loaded = tiny(name)
    model = loaded.model
    attn = model.model.layers[1].self_attn
    seen = {}

    def hook(module, args, kwargs):
        seen["hidden"] = kwargs["hidden_states"]
        seen["pos"] = kwargs["position_embeddings"]
        seen["cache"] = kwargs["past_key_values"]

    handle = attn.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        cache = DynamicCache(config=model.config)
        model(torch.tensor([[5, 6, 7, 8]]), past_key_values=cache, use_cache=True)
    finally:
        handle.remove()
    assert seen["cache"] is cache
    module = inspect.getmodule(type(attn))
    cos, sin = seen["pos"]
    k = attn.k_proj(seen["hidden"]).view(1, 4, -1, attn.head_dim).transpose(1, 2)
    _, k_rot = module.apply_rotary_pos_emb(k, k, cos, sin)
    assert k_rot.shape[1] == loaded.config.num_key_value_heads
    assert torch.allclose(cache.layers[1].keys, k_rot, atol=1e-6)
    v = attn.v_proj(seen["hidden"]).view(1, 4, -1, attn.head_dim).transpose(1, 2)
    assert torch.allclose(cache.layers[1].values, v, atol=1e-6)


def test_attention_interface_registration():
    calls = []

    def spy_attention(module, query, key, value, attention_mask, **kwargs):
        calls.append((query.shape, key.shape))
        return AttentionInterface._global_mapping["sdpa"](module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register("kvlab_contract_spy", spy_attention)
    loaded = tiny("tiny-llama")
    ids = torch.tensor([[1, 2, 3, 4]])
    expected = loaded.model(ids).logits
    loaded.model.set_attn_implementation("kvlab_contract_spy")
    try:
        got = loaded.model(ids).logits
    finally:
        loaded.model.set_attn_implementation("sdpa")
    assert torch.equal(got, expected)
    cfg = loaded.config
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    assert calls[0] == ((1, cfg.num_attention_heads, 4, head_dim), (1, cfg.num_key_value_heads, 4, head_dim))


def test_builtin_caches_kvlab_compares_against():
    from transformers import QuantizedCache, StaticCache

    config = tiny("tiny-llama").config
    quantized = QuantizedCache(backend="fp8", config=config)
    assert len(quantized.layers) == config.num_hidden_layers
    static = StaticCache(config=config, max_cache_len=16, offloading=False)
    assert static.get_max_length() == 16
    assert "offloading" in inspect.signature(StaticCache.__init__).parameters


def test_logits_to_keep_returns_only_the_last_position():
    out = tiny("tiny-llama").model(torch.tensor([[1, 2, 3, 4]]), logits_to_keep=1)
    assert out.logits.shape[1] == 1
