"""The offloaded caches on the default model (SmolLM2, 30 layers, GQA 9/3): short runs."""

from __future__ import annotations

import pytest
import torch

import kvlab
from kvlab.offload import costmodel as cm
from kvlab.runspec import RunSpec

pytestmark = pytest.mark.slow
PROMPT = "The capital of France is"
STEPS = 4
RUNS = ["cache=offload", "cache=flexgen:gpu_ratio=0.5", "cache=flexgen:gpu_len=0,tier=disk",
        "cache=kvpr:ratio=0.5", "cache=kvpr:ratio=1.0,tier=disk"]


@pytest.fixture(scope="module")
def golden(smollm2):
    return kvlab.capture(smollm2, smollm2.encode(PROMPT, chat=True), max_new_tokens=STEPS)


@pytest.mark.parametrize("run", RUNS)
def test_forward_loop_matches_dynamic(smollm2, golden, run):
    snap = kvlab.capture(smollm2, golden.token_ids[:golden.n_prompt], run, max_new_tokens=STEPS)
    assert snap.token_ids == golden.token_ids
    assert float((snap.logits() - golden.logits()).abs().max()) <= 1e-5
    for i in (0, 29):
        assert float((snap.keys(i) - golden.keys(i)).abs().max()) <= 1e-5


def test_generate_with_kvpr_matches_dynamic(smollm2, golden):
    model = smollm2.model
    ids = torch.tensor([golden.token_ids[:golden.n_prompt]])
    kwargs = dict(max_new_tokens=STEPS, do_sample=False, return_dict_in_generate=True, output_logits=True)
    want = model.generate(ids, **kwargs)
    policy = RunSpec.parse("cache=kvpr:recompute_len=16").policy
    cache = policy.build(model, max_length=ids.shape[1] + STEPS)
    with policy.session(model):
        got = model.generate(ids, past_key_values=cache, **kwargs)
    assert torch.equal(got.sequences, want.sequences)
    assert max(float((a - b).abs().max()) for a, b in zip(got.logits, want.logits)) <= 1e-5
    assert len(cache.layers[0].acts) == 16


def test_cost_model_recomputes_nothing_for_smollm2(smollm2):
    shape = cm.ModelShape.from_model(smollm2.model)
    fast_gpu = cm.Hardware(1e14, 25e9, 25e9, 2e12, overlap=True)
    split = cm.kvpr_split(4096, shape, fast_gpu)
    assert split.recompute_len == 0 and "576 values" in split.reason and "larger than" in split.reason
