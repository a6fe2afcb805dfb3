"""flexgen, kvpr and offload against the exact cache: same greedy tokens, logits within 1e-5
in float32, the same K/V, through `model(...)` (capture) and `model.generate`."""

from __future__ import annotations

import functools
import os

import pytest
import torch
from transformers import DynamicCache

import kvlab
from kvlab.errors import KvlabError
from kvlab.runspec import RunSpec, RunSpecError
from tests.conftest import TINY_FAMILIES, tiny

PROMPT = "Offloaded caches must match the exact one."  # 43 byte tokens (+ BOS)
STEPS = 6
TOL = 1e-5

# splits include 0 (everything offloaded / kept as K/V) and "all" (everything near)
SPECS = [
    "cache=offload",
    "cache=flexgen:gpu_len=0",
    "cache=flexgen:gpu_ratio=0.5",
    "cache=flexgen:gpu_len=100000",
    "cache=flexgen:gpu_len=0,tier=disk",
    "cache=flexgen:gpu_len=17,tier=disk",
    "cache=flexgen:gpu_ratio=1.0,tier=disk",
    "cache=kvpr:recompute_len=0",
    "cache=kvpr:recompute_len=9",
    "cache=kvpr:ratio=1.0",
    "cache=kvpr:ratio=0.5,tier=disk",
]
GENERATE_SPECS = ["cache=offload", "cache=flexgen:gpu_len=0", "cache=flexgen:gpu_ratio=0.3,tier=disk",
                  "cache=kvpr:recompute_len=0", "cache=kvpr:ratio=0.4",
                  "cache=kvpr:ratio=1.0,tier=disk"]


@functools.lru_cache(maxsize=None)
def _golden(name: str):
    loaded = tiny(name)
    return loaded, kvlab.capture(loaded, loaded.encode(PROMPT), max_new_tokens=STEPS)


def _assert_same(snap, golden, tol: float = TOL) -> None:
    assert snap.token_ids == golden.token_ids
    assert float((snap.logits() - golden.logits()).abs().max()) <= tol
    for i in range(golden.n_layers):
        assert snap.keys(i).shape == golden.keys(i).shape
        assert float((snap.keys(i) - golden.keys(i)).abs().max()) <= tol
        assert float((snap.values(i) - golden.values(i)).abs().max()) <= tol


@pytest.mark.parametrize("name", TINY_FAMILIES)
@pytest.mark.parametrize("run", SPECS)
def test_forward_loop_matches_dynamic(name, run):
    loaded, golden = _golden(name)
    snap = kvlab.capture(loaded, loaded.encode(PROMPT), run, max_new_tokens=STEPS)
    _assert_same(snap, golden)


def _generate(loaded, ids: torch.Tensor, run: str | None, mask: torch.Tensor | None = None):
    kwargs = dict(max_new_tokens=STEPS, do_sample=False, return_dict_in_generate=True, output_logits=True,
                  attention_mask=mask if mask is not None else torch.ones_like(ids))
    if run is None:
        return loaded.model.generate(ids, **kwargs)
    policy = RunSpec.parse(run).policy
    cache = policy.build(loaded.model, batch_size=ids.shape[0], max_length=ids.shape[1] + STEPS)
    with policy.session(loaded.model):
        return loaded.model.generate(ids, past_key_values=cache, **kwargs)


def _assert_same_generation(got, want) -> None:
    assert torch.equal(got.sequences, want.sequences)
    diff = max(float((a - b).abs().max()) for a, b in zip(got.logits, want.logits))
    assert diff <= TOL


@functools.lru_cache(maxsize=None)
def _reference_generation(name: str):
    loaded = tiny(name)
    return _generate(loaded, torch.tensor([loaded.encode(PROMPT)]), None)


@pytest.mark.parametrize("name", TINY_FAMILIES)
@pytest.mark.parametrize("run", GENERATE_SPECS)
def test_generate_matches_dynamic(name, run):
    loaded = tiny(name)
    ids = torch.tensor([loaded.encode(PROMPT)])
    _assert_same_generation(_generate(loaded, ids, run), _reference_generation(name))


@pytest.mark.parametrize("run", ["cache=flexgen:gpu_len=12,tier=disk", "cache=kvpr:recompute_len=12"])
def test_generate_batch_with_left_padding(run):
    """Two prompts of different lengths: padding rows, per-row positions, one cache."""
    loaded = tiny("tiny-qwen2")
    short, long = loaded.encode("Short one."), loaded.encode(PROMPT)
    pad = loaded.config.pad_token_id
    ids = torch.tensor([[pad] * (len(long) - len(short)) + short, long])
    mask = (ids != pad).long()
    _assert_same_generation(_generate(loaded, ids, run, mask), _generate(loaded, ids, None, mask))


def _prefilled(run: str, name: str = "tiny-mha"):
    loaded = tiny(name)
    ids = torch.tensor([loaded.encode(PROMPT)])
    policy = RunSpec.parse(run).policy
    cache = policy.build(loaded.model, batch_size=1, max_length=ids.shape[1] + STEPS)
    return loaded, ids, policy, cache


def _next_logits(loaded, policy, cache, token: int = 65) -> torch.Tensor:
    with policy.session(loaded.model), torch.no_grad():
        return loaded.model(torch.tensor([[token]]), past_key_values=cache, use_cache=True).logits[0, -1]


def _prefill(loaded, ids, policy, cache):
    with policy.session(loaded.model), torch.no_grad():
        loaded.model(ids, past_key_values=cache, use_cache=True)


def test_kvpr_keeps_activations_for_the_first_positions_and_recomputes_from_them():
    loaded, ids, policy, cache = _prefilled("cache=kvpr:recompute_len=10")
    _prefill(loaded, ids, policy, cache)
    n = ids.shape[1]
    assert cache.split == 10
    for layer in cache.layers:
        assert len(layer.acts) == 10 and len(layer.far) == n - 10
        assert layer.acts.row_shape == (1, loaded.config.hidden_size)
    exact = _next_logits(*_golden_cache(loaded, ids))
    # the recomputed part is what attention reads: spoiling the stored activations changes the logits
    cache.layers[2].acts.rows(0, 10).mul_(-1.0)
    spoiled = _next_logits(loaded, policy, cache)
    assert float((spoiled - exact).abs().max()) > 1e-3


def _golden_cache(loaded, ids):
    policy = RunSpec.parse("cache=dynamic").policy
    cache = policy.build(loaded.model)
    _prefill(loaded, ids, policy, cache)
    return loaded, policy, cache


def test_flexgen_reads_its_far_part_from_the_store():
    loaded, ids, policy, cache = _prefilled("cache=flexgen:gpu_len=10,tier=disk")
    _prefill(loaded, ids, policy, cache)
    assert all(layer.resident[0].shape[-2] == 10 and len(layer.far) == ids.shape[1] - 10 for layer in cache.layers)
    exact = _next_logits(*_golden_cache(loaded, ids))
    assert float((_next_logits(loaded, policy, cache) - exact).abs().max()) <= TOL
    cache.layers[1].far.rows(0, 5).zero_()
    assert float((_next_logits(loaded, policy, cache, token=66) - exact).abs().max()) > 1e-3


@pytest.mark.parametrize("run", ["cache=flexgen:gpu_len=20", "cache=kvpr:recompute_len=20"])
def test_crop_then_continue_matches_dynamic(run):
    """Dropping the last tokens (as speculative decoding does), also below the split."""
    loaded, ids, policy, cache = _prefilled(run)
    _, dyn_policy, dyn = _golden_cache(loaded, ids)
    _prefill(loaded, ids, policy, cache)
    for crop in (-3, -30):  # the second goes below the split
        cache.crop(crop)
        dyn.crop(crop)
        assert cache.get_seq_length() == dyn.get_seq_length()
        with policy.session(loaded.model), torch.no_grad():
            tail = ids[:, cache.get_seq_length():cache.get_seq_length() + 4]
            got = loaded.model(tail, past_key_values=cache, use_cache=True).logits
            want = loaded.model(tail, past_key_values=dyn, use_cache=True).logits
        assert float((got - want).abs().max()) <= TOL


def test_kvpr_without_its_session_is_one_clear_error():
    loaded, ids, policy, cache = _prefilled("cache=kvpr:recompute_len=4")
    with pytest.raises(KvlabError, match="session"), torch.no_grad():
        loaded.model(ids, past_key_values=cache, use_cache=True)


def test_kvpr_with_nothing_to_recompute_needs_no_session():
    loaded, ids, policy, cache = _prefilled("cache=kvpr:recompute_len=0")
    exact = DynamicCache(config=loaded.config)
    with torch.no_grad():
        got = loaded.model(ids, past_key_values=cache, use_cache=True).logits
        want = loaded.model(ids, past_key_values=exact, use_cache=True).logits
        assert float((got - want).abs().max()) <= TOL
        got = loaded.model(torch.tensor([[65]]), past_key_values=cache, use_cache=True).logits
        want = loaded.model(torch.tensor([[65]]), past_key_values=exact, use_cache=True).logits
    assert cache.get_seq_length() == ids.shape[1] + 1
    assert float((got - want).abs().max()) <= TOL  # the decode step reads the whole offloaded K/V back


def test_session_removes_its_hooks_even_on_error():
    from kvlab.model_facts import attention_modules

    loaded, ids, policy, cache = _prefilled("cache=kvpr:ratio=0.5")
    modules = attention_modules(loaded.model)
    with pytest.raises(RuntimeError, match="boom"), policy.session(loaded.model):
        assert all(len(m._forward_pre_hooks) == 1 for m in modules)
        raise RuntimeError("boom")
    assert all(len(m._forward_pre_hooks) == 0 for m in modules)


def test_kvpr_refuses_attention_that_is_not_kproj_plus_rope():
    """Qwen3 normalises K after k_proj: the check on the first rows refuses it instead of going wrong."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    config = AutoConfig.for_model("qwen3", vocab_size=261, hidden_size=64, intermediate_size=128,
                                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    model = AutoModelForCausalLM.from_config(config).eval()
    policy = RunSpec.parse("cache=kvpr:recompute_len=4").policy
    cache = policy.build(model)
    with pytest.raises(KvlabError, match="not supported"), policy.session(model), torch.no_grad():
        model(torch.tensor([[1, 2, 3, 4, 5, 6]]), past_key_values=cache, use_cache=True)


def test_disk_tier_leaves_no_files(tmp_path):
    loaded, golden = _golden("tiny-llama")
    for run in (f"cache=flexgen:gpu_len=5,tier=disk,dir={tmp_path}", f"cache=kvpr:ratio=0.5,tier=disk,dir={tmp_path}"):
        snap = kvlab.capture(loaded, loaded.encode(PROMPT), run, max_new_tokens=STEPS)
        assert os.listdir(tmp_path) == []
        _assert_same(snap, golden)  # and what went through the folder came back exactly


def test_disk_tier_in_a_missing_folder_is_one_clear_error(tmp_path):
    loaded = tiny("tiny-llama")
    with pytest.raises(KvlabError, match="does not exist"):
        kvlab.capture(loaded, loaded.encode(PROMPT), f"cache=flexgen:gpu_len=5,tier=disk,dir={tmp_path}/nope",
                      max_new_tokens=2)


def test_offload_on_cpu_runs_transformers_schedule_as_copies():
    from kvlab.caches.offload import HostOffloadedCache

    loaded = tiny("tiny-llama")
    cache = RunSpec.parse("cache=offload").policy.build(loaded.model)
    exact = DynamicCache(config=loaded.config)
    assert isinstance(cache, HostOffloadedCache) and not cache.offloading
    with torch.no_grad():
        for feed in ([[1, 2, 3]], [[4]]):
            got = loaded.model(torch.tensor(feed), past_key_values=cache, use_cache=True).logits
            want = loaded.model(torch.tensor(feed), past_key_values=exact, use_cache=True).logits
            assert float((got - want).abs().max()) <= TOL
    for layer, reference in zip(cache.layers, exact.layers):
        assert torch.equal(layer.keys, reference.keys) and torch.equal(layer.values, reference.values)
    kv_bytes = sum(2 * layer.keys.nbytes for layer in cache.layers)
    assert cache.bytes_moved() > kv_bytes  # in and out, every layer, every call
    if not torch.cuda.is_available():  # why the policy does not hand over transformers' own cache here
        with pytest.raises((AssertionError, RuntimeError)):
            loaded.model(torch.tensor([[1, 2]]), past_key_values=DynamicCache(config=loaded.config, offloading=True))


@pytest.mark.parametrize("text, why", [
    ("cache=flexgen", "exactly one of"),
    ("cache=flexgen:gpu_len=3,gpu_ratio=0.5", "exactly one of"),
    ("cache=flexgen:gpu_ratio=1.5", "between 0 and 1"),
    ("cache=flexgen:gpu_len=3,dir=/tmp", "tier=disk"),
    ("cache=flexgen:gpu_len=3,budget_gb=4", "auto"),
    ("cache=flexgen:gpu_len=3,tier=nvme", "one of host, disk"),
    ("cache=kvpr", "exactly one of"),
    ("cache=kvpr:recompute_len=-1", "negative"),
    ("cache=kvpr:recompute_len=auto,ratio=0.2", "exactly one of"),
])
def test_bad_specs_are_one_line_errors(text, why):
    with pytest.raises(RunSpecError, match=why):
        RunSpec.parse(text)


def test_specs_round_trip_without_defaults():
    for text in ("cache=flexgen:gpu_ratio=0.25,tier=disk", "cache=kvpr:recompute_len=auto", "cache=kvpr:auto",
                 "cache=flexgen:auto,budget_gb=2.0"):
        run = RunSpec.parse(text)
        assert str(run) == text and str(RunSpec.parse(str(run))) == text
