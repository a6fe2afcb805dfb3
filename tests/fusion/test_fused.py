"""Fused prefill against its oracles: full prefill at rate 1.0, the exact cache for one chunk at base 0."""

import pytest
import torch
from transformers import DynamicCache

from kvlab.errors import KvlabError
from kvlab.fusion.fused import answer, prefill
from kvlab.fusion.prompt import FusionPrompt
from kvlab.fusion.store import MemoryStore, open_store
from kvlab.fusion.strategies import make_strategy
from kvlab.model_facts import decoder_layers
from tests.conftest import tiny
from tests.fusion.helpers import QUESTION, full_run, llama_from_config, tiny_prompt

REUSING = ["last", "cacheblend", "a3", "a3:check_layer=1", "a3:check_layer=1,scout=true", "epic", "surprisal"]


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-qwen2", "tiny-mistral", "tiny-llama-32l"])
def test_rate_one_gives_full_prefill_logits_for_every_strategy(name):
    loaded = tiny(name)
    prompt = tiny_prompt(loaded)
    expected, _, _ = full_run(loaded, prompt.ids)
    store = open_store("memory://")
    strategies = ["full", *REUSING] if name != "tiny-llama-32l" else ["full", "cacheblend", "a3", "epic"]
    for strategy in strategies:
        result = prefill(loaded, prompt, make_strategy(strategy, 1.0), store)
        assert result.recomputed == prompt.n_docs
        assert (result.logits - expected).abs().max() < 1e-4, strategy
        assert len(result.cache.layers) == loaded.config.num_hidden_layers
    # something is reused below rate 1: the logits move (the test could not pass by recomputing everything)
    result = prefill(loaded, prompt, make_strategy("a3", 0.2), store)
    assert result.recomputed == round(0.2 * prompt.n_docs) and (result.logits - expected).abs().max() > 1e-3


def test_one_chunk_at_base_zero_with_reuse_gives_the_full_prefill_cache():
    loaded = tiny("tiny-llama")
    chunk = tuple(loaded.tokenizer("The cat sat on the mat.\n\n", add_special_tokens=False)["input_ids"])
    question = tuple(loaded.tokenizer("Where is the cat?\nAnswer:", add_special_tokens=False)["input_ids"])
    prompt = FusionPrompt((), (chunk,), question)
    logits, full_cache, _ = full_run(loaded, prompt.ids)
    result = prefill(loaded, prompt, make_strategy("reuse"), MemoryStore())
    assert result.recomputed == 0 and result.load.misses == 1
    # The stored chunk ran as n tokens, the full prefill as n + question tokens: the kernels round
    # differently past layer 0 (about 1e-6), so the cache matches to float32 rounding.
    first = result.cache.layers[0], full_cache.layers[0]
    assert torch.equal(first[0].keys, first[1].keys) and torch.equal(first[0].values, first[1].values)
    for fused, exact in zip(result.cache.layers, full_cache.layers):
        assert fused.keys.shape == exact.keys.shape
        assert torch.allclose(fused.keys, exact.keys, rtol=0, atol=1e-5)
        assert torch.allclose(fused.values, exact.values, rtol=0, atol=1e-5)
    assert (result.logits - logits).abs().max() < 1e-4


def test_decoding_continues_from_the_fused_cache_like_from_a_full_prefill():
    loaded = tiny("tiny-qwen2")
    prompt = tiny_prompt(loaded)
    _, _, expected = full_run(loaded, prompt.ids, steps=6)
    got = answer(loaded, prompt, make_strategy("cacheblend", 1.0), MemoryStore(), max_new_tokens=7)
    assert got.tokens == expected
    assert got.prefill.cache.get_seq_length() == prompt.n_tokens + 6
    assert got.ttft_s > 0 and got.tpot_s > 0


def test_store_is_filled_on_a_miss_and_read_on_a_hit():
    loaded = tiny("tiny-llama")
    prompt = tiny_prompt(loaded)
    store = MemoryStore()
    first = prefill(loaded, prompt, make_strategy("epic", 0.3), store)
    again = prefill(loaded, prompt, make_strategy("epic", 0.3), store)
    n_parts = len(prompt.chunks) + (1 if prompt.prefix else 0)
    assert (first.load.misses, first.load.hits) == (n_parts, 0)
    assert (again.load.misses, again.load.hits) == (0, n_parts)
    assert torch.equal(first.logits, again.logits)
    assert store.stats()["entries"] == n_parts


def test_a_cold_store_runs_the_prefix_once_for_every_missing_chunk_surprisal():
    from kvlab.fusion.chunks import compute_chunk_kv

    loaded = tiny("tiny-llama")
    prompt = tiny_prompt(loaded, chat=True)  # a real prefix before three chunks
    assert prompt.prefix and len(prompt.chunks) > 1
    prefix_runs = []

    def count(module, args, kwargs):
        ids = args[0] if args else kwargs.get("input_ids")
        if ids is not None and ids.shape[-1] == len(prompt.prefix):
            prefix_runs.append(1)

    handle = loaded.model.register_forward_pre_hook(count, with_kwargs=True)
    try:
        store = MemoryStore()
        prefill(loaded, prompt, make_strategy("surprisal", 0.3), store)
    finally:
        handle.remove()
    assert len(prefix_runs) == 2  # the prefix's own cache, then its logits once (not once per chunk)
    for ids in prompt.chunks:  # and every chunk's surprisal is what a chunk computed on its own has
        key, alone = compute_chunk_kv(loaded, list(ids), list(prompt.prefix), surprisal=True)
        assert torch.allclose(store.get(key).surprisal, alone.surprisal, atol=1e-5)


def test_a_damaged_chunk_is_recomputed_and_replaced():
    loaded = tiny("tiny-llama")
    prompt = tiny_prompt(loaded)
    store = MemoryStore()
    clean = prefill(loaded, prompt, make_strategy("a3", 0.3), store)
    digest = next(iter(store._data))
    store._data[digest][1].keys[0].view(-1)[0] += 1.0
    repaired = prefill(loaded, prompt, make_strategy("a3", 0.3), store)
    assert repaired.load.repaired == 1 and repaired.load.misses == 1
    assert torch.equal(clean.logits, repaired.logits)


def test_tiny_rate_never_selects_zero_tokens():
    loaded = tiny("tiny-llama")
    prompt = tiny_prompt(loaded)
    store = MemoryStore()
    for strategy in REUSING:
        for rate in (0.0, 1e-6):
            result = prefill(loaded, prompt, make_strategy(strategy, rate), store)
            assert result.recomputed == 1, strategy


def test_check_layer_follows_the_model_not_a_fixed_layer_count():
    deep, shallow = tiny("tiny-llama-32l"), tiny("tiny-llama")
    prompt = tiny_prompt(deep)
    expected, _, _ = full_run(deep, prompt.ids)
    late = prefill(deep, prompt, make_strategy("cacheblend:check_layer=30", 1.0), MemoryStore())
    assert (late.logits - expected).abs().max() < 1e-4
    with pytest.raises(KvlabError, match="check_layer=30 but the model has 4 layers"):
        prefill(shallow, tiny_prompt(shallow), make_strategy("cacheblend:check_layer=30", 0.5), MemoryStore())


def test_cacheblend_picks_the_largest_value_deviation_at_the_check_layer():
    loaded = tiny("tiny-llama")
    prompt = tiny_prompt(loaded)
    store = MemoryStore()
    result = prefill(loaded, prompt, make_strategy("cacheblend:check_layer=2", 0.25), store)
    _, full_cache, _ = full_run(loaded, prompt.ids)
    from kvlab.fusion.fused import load_chunks

    _, chunks, _ = load_chunks(loaded, store, prompt)
    cached = torch.cat([c.values[2] for c in chunks], dim=-2)
    p = prompt.n_prefix
    fresh = full_cache.layers[2].values[:, :, p: p + prompt.n_docs]
    deviation = (fresh - cached).pow(2).sum(dim=(0, 1, 3))
    expected = torch.topk(deviation, round(0.25 * prompt.n_docs)).indices.sort().values
    assert torch.equal(result.selected, expected)


@pytest.mark.parametrize("check_layer", [0, 1])
def test_a3_picks_the_documents_the_question_attends_to(check_layer):
    # at layer 0 only the question runs before selecting (the stored keys are the fresh ones there);
    # at layer 1 every token does: both must pick what the question attends to in a full pass
    loaded = tiny("tiny-mha", "attn=eager")
    prompt = tiny_prompt(loaded)
    result = prefill(loaded, prompt, make_strategy(f"a3:pool=1,check_layer={check_layer}", 0.2), MemoryStore())
    with torch.no_grad():
        out = loaded.model(torch.tensor([prompt.ids]), output_attentions=True)
    probs = out.attentions[check_layer][0]  # [heads, query, key]
    p, question = prompt.n_prefix, prompt.n_prefix + prompt.n_docs  # the question part starts here
    start, end = prompt.query_span  # the user's question within it (not the instruction or template)
    assert loaded.decode(list(prompt.question[start:end])) == QUESTION
    scores = probs[:, question + start: question + end, p: p + prompt.n_docs].sum(dim=(0, 1))
    expected = torch.topk(scores, round(0.2 * prompt.n_docs)).indices.sort().values
    assert torch.equal(result.selected, expected)


def test_a3_scout_scores_the_question_attention_over_the_stored_cache():
    loaded = tiny("tiny-mha", "attn=eager")
    prompt = tiny_prompt(loaded)
    store = MemoryStore()
    result = prefill(loaded, prompt, make_strategy("a3:pool=1,check_layer=1,scout=true", 0.2), store)
    stored = prefill(loaded, prompt, make_strategy("reuse"), store).cache  # prefix and documents as loaded
    m = prompt.n_prefix + prompt.n_docs
    past = DynamicCache(ddp_cache_data=[(layer.keys[:, :, :m], layer.values[:, :, :m]) for layer in stored.layers])
    with torch.no_grad():
        out = loaded.model(torch.tensor([prompt.question]), position_ids=torch.arange(m, prompt.n_tokens)[None],
                           past_key_values=past, output_attentions=True)
    start, end = prompt.query_span
    scores = out.attentions[1][0][:, start:end, prompt.n_prefix: m].sum(dim=(0, 1))
    expected = torch.topk(scores, round(0.2 * prompt.n_docs)).indices.sort().values
    assert torch.equal(result.selected, expected)
    fresh = prefill(loaded, prompt, make_strategy("a3:pool=1,check_layer=1", 0.2), store)
    assert not torch.equal(fresh.selected, expected)  # the stored cache scores differently from a full pass


def test_minimal_config_without_optional_keys_works():
    loaded = llama_from_config()  # no head_dim, KV heads or rope settings given
    prompt = tiny_prompt(loaded)
    expected, _, _ = full_run(loaded, prompt.ids)
    result = prefill(loaded, prompt, make_strategy("a3", 1.0), MemoryStore())
    assert (result.logits - expected).abs().max() < 1e-4


def test_rope_whose_frequencies_depend_on_length_is_refused():
    loaded = llama_from_config(rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0})
    with pytest.raises(KvlabError, match="rope_type='dynamic' changes its frequencies") as info:
        prefill(loaded, tiny_prompt(loaded), make_strategy("a3", 0.2), MemoryStore())
    assert "\n" not in str(info.value)


def test_full_prefill_needs_no_store_and_fused_needs_one():
    loaded = tiny("tiny-llama")
    prompt = tiny_prompt(loaded)
    assert prefill(loaded, prompt, make_strategy("full")).recomputed == prompt.n_docs
    with pytest.raises(KvlabError, match="give a store"):
        prefill(loaded, prompt, make_strategy("reuse"))


@pytest.mark.parametrize("spec", ["a3", "a3:check_layer=1"])
def test_hooks_and_attention_are_restored_even_when_a_strategy_fails(monkeypatch, spec):
    from kvlab.fusion.strategies import A3

    loaded = tiny("tiny-llama")
    prompt = tiny_prompt(loaded)

    def broken(self, inputs):
        raise RuntimeError("selection failed")

    monkeypatch.setattr(A3, "select", broken)
    with pytest.raises(RuntimeError, match="selection failed"):
        prefill(loaded, prompt, make_strategy(spec, 0.2), MemoryStore())
    assert loaded.model.config._attn_implementation == "sdpa"
    assert not any(layer._forward_pre_hooks or layer._forward_hooks for layer in decoder_layers(loaded.model))


@pytest.mark.slow
def test_smollm2_fused_prefill_matches_full_prefill_at_rate_one(smollm2):
    prompt = tiny_prompt(smollm2)  # chat template: a real prefix, three chunks, the question
    expected, _, _ = full_run(smollm2, prompt.ids)
    store = MemoryStore()
    for strategy in ("a3", "cacheblend"):
        result = prefill(smollm2, prompt, make_strategy(strategy, 1.0), store)
        assert (result.logits - expected).abs().max() < 1e-4, strategy
    reused = prefill(smollm2, prompt, make_strategy("a3", 0.15), store)
    assert reused.load.hits == len(prompt.chunks) + 1 and reused.recomputed == round(0.15 * prompt.n_docs)
