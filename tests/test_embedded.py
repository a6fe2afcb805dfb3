"""The embedded default model end to end (slow: loads SmolLM2-135M)."""

import pytest
import torch

import kvlab

pytestmark = pytest.mark.slow


def test_chat_capture_is_coherent(smollm2):
    ids = smollm2.encode("What is the capital of France? Answer in one sentence.", chat=True)
    snap = kvlab.capture(smollm2, ids, max_new_tokens=24)
    text = smollm2.decode(snap.token_ids[snap.n_prompt:])
    assert "Paris" in text
    assert snap.model["n_layers"] == 30 and snap.model["n_kv_heads"] == 3 and snap.model["head_dim"] == 64
    assert snap.keys(29).shape == (1, 3, len(snap.token_ids) - 1, 64)


def test_capture_matches_generate_on_the_default_model(smollm2):
    ids = smollm2.encode("The three primary colours are", chat=False)
    snap = kvlab.capture(smollm2, ids, max_new_tokens=16, stop_at_eos=False)
    out = smollm2.model.generate(torch.tensor([ids]), max_new_tokens=16, min_new_tokens=16, do_sample=False,
                                 return_dict_in_generate=True)
    assert snap.token_ids == out.sequences[0].tolist()
    for i in (0, 15, 29):
        assert torch.equal(snap.keys(i), out.past_key_values.layers[i].keys)
        assert torch.equal(snap.values(i), out.past_key_values.layers[i].values)
