"""Moving cached keys: a chunk's layer-0 keys moved to a new offset equal keys computed there."""

import pytest
import torch

from kvlab.fusion.fused import prefill
from kvlab.fusion.rope import RopeError, rope_shift
from kvlab.fusion.store import MemoryStore
from kvlab.fusion.strategies import make_strategy
from tests.conftest import tiny
from tests.fusion.helpers import full_run, llama_from_config, tiny_prompt

ROPES = {
    "linear": {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0},
    "llama3": {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 128, "rope_theta": 10000.0},
    "yarn": {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 256, "rope_theta": 10000.0},
}


def _models():
    yield "tiny-llama", tiny("tiny-llama")
    yield "tiny-qwen2", tiny("tiny-qwen2")
    for name, params in ROPES.items():
        yield name, llama_from_config(rope_parameters=params)


@pytest.mark.parametrize("which", ["tiny-llama", "tiny-qwen2", *ROPES])
def test_moved_layer_zero_keys_equal_keys_computed_at_the_new_positions(which):
    loaded = dict(_models())[which]
    prompt = tiny_prompt(loaded, chat=True)  # a prefix, then three chunks that all land after their stored base
    result = prefill(loaded, prompt, make_strategy("reuse"), MemoryStore())
    _, full_cache, _ = full_run(loaded, prompt.ids)
    # Layer 0 keys depend only on the token and its position: moving must reproduce them.
    docs = slice(prompt.n_prefix, prompt.n_prefix + prompt.n_docs)
    moved, exact = result.cache.layers[0].keys[:, :, docs], full_cache.layers[0].keys[:, :, docs]
    assert torch.allclose(moved, exact, rtol=0, atol=1e-5 * float(exact.abs().max()))
    assert rope_shift(loaded.model).rope_type == ("default" if which.startswith("tiny") else which)


def test_shift_by_zero_is_the_identity_and_shifts_compose():
    shift = rope_shift(tiny("tiny-llama").model)
    keys = torch.randn(1, 2, 5, 16)
    assert shift.shift(keys, 0) is keys
    assert torch.allclose(shift.shift(shift.shift(keys, 30), 70), shift.shift(keys, 100), atol=1e-5)


@pytest.mark.parametrize("params", [
    {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0},
    {"rope_type": "longrope", "rope_theta": 10000.0, "short_factor": [1.0] * 4, "long_factor": [2.0] * 4,
     "original_max_position_embeddings": 256},
])
def test_rope_types_that_do_not_compose_are_refused_in_one_line(params):
    loaded = llama_from_config(rope_parameters=params)
    with pytest.raises(RopeError, match=f"rope_type='{params['rope_type']}'") as info:
        rope_shift(loaded.model)
    assert "\n" not in str(info.value)
