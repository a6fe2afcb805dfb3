"""`random:FAMILY,k=v` model specs: seeded, sized as asked, clear errors."""

from __future__ import annotations

import pytest

import kvlab
from kvlab.errors import KvlabError
from kvlab.randommodels import parse_random_spec


def test_spec_builds_the_shape_asked_for_and_is_seeded():
    spec = "random:llama-mha,hidden=128,layers=3"
    a, b = kvlab.load_model(spec), kvlab.load_model(spec)
    config = a.config
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads) == (
        128, 3, 1, 1)
    assert config.intermediate_size == 512  # 8/3 x 128 rounded up to 256
    assert a.fingerprint == b.fingerprint
    assert a.fingerprint != kvlab.load_model(spec + ",seed=1").fingerprint
    gqa = kvlab.load_model("random:qwen2,hidden=256,layers=1,heads=8")
    assert gqa.config.num_key_value_heads == 2 and gqa.model.model.layers[0].self_attn.k_proj.bias is not None
    assert gqa.decode(gqa.encode("byte tokens")) == "byte tokens"


@pytest.mark.parametrize("spec, why", [
    ("random:gpt2", "unknown random family"),
    ("random:llama,hidden=96,heads=5", "divide evenly"),
    ("random:llama,depth=3", "unknown parameter 'depth'"),
    ("random:llama,layers=two", "not an integer"),
])
def test_bad_specs_are_one_line_errors(spec, why):
    with pytest.raises(KvlabError, match=why):
        parse_random_spec(spec)[1].config(parse_random_spec(spec)[0])
