"""Eviction policies against oracles: keeping everything is the exact cache; evicting equals masking.

The oracle for an evicting cache is the exact cache with the evicted positions masked out of
each decode step's attention (per layer and KV head), every token at its true position.
"""

import pytest
import torch
from transformers import DynamicCache

from kvlab.caches import parse_policy
from kvlab.caches.eviction import EvictingLayer, SnapKVPolicy, StreamingPolicy
from kvlab.errors import KvlabError
from kvlab.fusion.fused import prefill
from kvlab.fusion.store import MemoryStore
from kvlab.fusion.strategies import make_strategy
from kvlab.model_facts import decoder_layers
from kvlab.runspec import RunSpec
from tests.conftest import tiny
from tests.fusion.helpers import decode, tiny_prompt

TEXT = "The quick brown fox jumps over the lazy dog while the cat sleeps in the warm afternoon sun by the door."


def _run(loaded, ids, policy=None, steps=6):
    """Prefill then greedy steps with the policy's cache (or the exact one): (cache, tokens, step logits)."""
    model = loaded.model
    cache = policy.build(model) if policy is not None else DynamicCache(config=model.config)
    session = policy.session(model) if policy is not None else torch.no_grad()
    with session, torch.no_grad():
        out = model(torch.tensor([ids]), past_key_values=cache, use_cache=True)
        first = out.logits[0, -1].float()
        tokens, rows = decode(model, cache, int(torch.argmax(first)), steps)
    return cache, tokens, [first, *rows]


def _masked_oracle(loaded, ids, tokens, visible):
    """Exact cache, decode steps masked by `visible(layer, position) -> bool [heads, position + 1]`."""
    model = loaded.model
    cache = DynamicCache(config=model.config)
    state = {"t": None}

    def hook(module, args, kwargs):
        if state["t"] is not None:
            layer = list(decoder_layers(model)).index(module)
            mask = visible(layer, state["t"])[None, :, None, :]
            if model.config._attn_implementation == "eager":  # eager adds its mask to the scores
                mask = torch.zeros(mask.shape).masked_fill(~mask, torch.finfo(torch.float32).min)
            kwargs["attention_mask"] = mask
        return args, kwargs

    handles = [layer.register_forward_pre_hook(hook, with_kwargs=True) for layer in decoder_layers(model)]
    rows = []
    try:
        with torch.no_grad():
            model(torch.tensor([ids]), past_key_values=cache, use_cache=True)
            for position, token in enumerate(tokens[:-1], start=len(ids)):
                state["t"] = position
                out = model(torch.tensor([[token]]), past_key_values=cache, use_cache=True)
                rows.append(out.logits[0, -1].float())
    finally:
        for handle in handles:
            handle.remove()
    return rows


def _heads(loaded) -> int:
    return loaded.config.num_attention_heads


@pytest.mark.parametrize("spec", ["streaming:sink=4,window=100000", "snapkv:capacity=100000,window=8"])
def test_eviction_that_keeps_everything_is_the_exact_cache(spec):
    loaded = tiny("tiny-llama")
    ids = loaded.encode(TEXT)
    _, expected_tokens, expected = _run(loaded, ids)
    cache, tokens, rows = _run(loaded, ids, parse_policy(spec))
    assert tokens == expected_tokens
    assert all((a - b).abs().max() < 1e-5 for a, b in zip(rows, expected))
    assert cache.get_seq_length() == len(ids) + 6 == cache.layers[0].held


def test_streaming_keeps_sinks_and_window_and_decodes_like_a_masked_exact_cache():
    loaded = tiny("tiny-llama")
    ids = loaded.encode(TEXT)
    sink, window, steps = 4, 16, 6
    cache, tokens, rows = _run(loaded, ids, StreamingPolicy(sink=sink, window=window), steps)
    seen = len(ids) + steps
    assert cache.get_seq_length() == seen
    expected_positions = list(range(sink)) + list(range(seen - window, seen))
    for layer in cache.layers:
        assert layer.positions.tolist() == [[expected_positions] * layer.positions.shape[1]]
        assert layer.keys.shape[-2] == sink + window

    def visible(layer, t):
        j = torch.arange(t + 1)
        return ((j < sink) | (j >= t - window)).expand(_heads(loaded), -1)

    oracle = _masked_oracle(loaded, ids, tokens, visible)
    assert len(oracle) == steps
    for got, want in zip(rows[1:], oracle):
        assert (got - want).abs().max() < 1e-5
    # and eviction did change something: the unmasked exact run differs
    _, _, exact = _run(loaded, ids, None, steps)
    assert max((a - b).abs().max() for a, b in zip(rows[1:], exact[1:])) > 1e-3


def test_snapkv_keeps_what_the_window_attends_to_and_decodes_like_a_masked_exact_cache():
    loaded = tiny("tiny-mha", "attn=eager")
    ids = loaded.encode(TEXT)
    capacity, window, steps = 40, 8, 5
    policy = SnapKVPolicy(capacity=capacity, kernel=5, pool="max", window=window)
    cache, tokens, rows = _run(loaded, ids, policy, steps)
    with torch.no_grad():
        attentions = loaded.model(torch.tensor([ids]), output_attentions=True).attentions
    n = len(ids)
    kept = []
    for layer, probs in zip(cache.layers, attentions):
        scores = probs[0, :, -window:, : n - window].sum(dim=1)  # [heads, observed]
        pooled = torch.nn.functional.max_pool1d(scores[:, None], 5, stride=1, padding=2)[:, 0]
        top = torch.topk(pooled, capacity - window, dim=-1).indices.sort(dim=-1).values
        expected = torch.cat([top, torch.arange(n - window, n).expand(top.shape[0], -1)], dim=-1)
        assert torch.equal(layer.positions[0, :, :capacity], expected)
        assert layer.positions.shape[-1] == capacity + steps
        kept.append(expected)

    def visible(layer, t):
        mask = torch.zeros(_heads(loaded), t + 1, dtype=torch.bool)
        mask.scatter_(1, kept[layer], True)
        mask[:, n:] = True
        return mask

    oracle = _masked_oracle(loaded, ids, tokens, visible)
    for got, want in zip(rows[1:], oracle):
        assert (got - want).abs().max() < 1e-5


def test_fused_prefill_then_eviction_decodes_at_true_positions():
    loaded = tiny("tiny-llama")
    prompt = tiny_prompt(loaded)
    sink, window, steps = 4, 24, 5
    result = prefill(loaded, prompt, make_strategy("a3", 1.0), MemoryStore(),
                     evict=StreamingPolicy(sink=sink, window=window))
    assert result.cache.get_seq_length() == prompt.n_tokens
    assert all(isinstance(layer, EvictingLayer) and layer.held == sink + window for layer in result.cache.layers)
    tokens, rows = decode(loaded.model, result.cache, int(torch.argmax(result.logits)), steps)
    assert result.cache.get_seq_length() == prompt.n_tokens + steps

    def visible(layer, t):
        j = torch.arange(t + 1)
        return ((j < sink) | (j >= t - window)).expand(_heads(loaded), -1)

    oracle = _masked_oracle(loaded, prompt.ids, tokens, visible)
    for got, want in zip(rows, oracle):
        assert (got - want).abs().max() < 1e-4


def test_snapkv_after_fusion_observes_the_question():
    loaded = tiny("tiny-qwen2")
    prompt = tiny_prompt(loaded)
    n, q = prompt.n_tokens, len(prompt.question)
    capacity = q + 30
    result = prefill(loaded, prompt, make_strategy("cacheblend", 0.3), MemoryStore(),
                     evict=SnapKVPolicy(capacity=capacity, window=4))
    for layer in result.cache.layers:
        assert layer.held == capacity
        # the observation window is the question (all of it kept), not the policy's plain-run window
        assert layer.positions[0, :, -q:].tolist() == [list(range(n - q, n))] * layer.positions.shape[1]
        assert bool((layer.positions[0, :, :-q] < n - q).all())
    assert result.cache.get_seq_length() == n


def test_policy_specs_parse_with_one_line_errors():
    assert (str(RunSpec.parse("cache=snapkv:capacity=64,pool=max").cache)
            == "snapkv:capacity=64,kernel=5,pool=max,window=32,count_pad=false")
    assert str(RunSpec.parse("cache=streaming:window=8").cache) == "streaming:sink=4,window=8"
    for bad, fragment in [("cache=snapkv:pool=mean", "pool=mean is not one of avg, max"),
                          ("cache=snapkv:kernel=4", "kernel must be an odd width"),
                          ("cache=streaming:window=0", "window must be at least 1"),
                          ("cache=snapkv:pool=max,count_pad=true", "count_pad applies to pool=avg only")]:
        with pytest.raises(KvlabError, match=fragment) as info:
            RunSpec.parse(bad)
        assert "\n" not in str(info.value)


def test_capture_with_an_evicting_cache_records_what_the_masked_exact_cache_gives():
    from kvlab import capture

    loaded = tiny("tiny-llama")
    ids = loaded.encode(TEXT)
    sink, window, steps = 2, 10, 4
    snap = capture(loaded, ids, f"cache=streaming:sink={sink},window={window}", max_new_tokens=steps)
    n = len(ids)
    assert snap.shape(0)[-2] == sink + window and snap.token_ids[:n] == ids and len(snap.token_ids) == n + steps

    def visible(layer, t):
        j = torch.arange(t + 1)
        return ((j < sink) | (j >= t - window)).expand(_heads(loaded), -1)

    oracle = _masked_oracle(loaded, ids, snap.token_ids[n:], visible)
    logits = snap.logits()
    for got, want in zip(logits[1:], oracle):
        assert (got - want).abs().max() < 1e-5
    assert snap.greedy_ids == [int(row.argmax()) for row in logits]
    # layer 0's keys depend only on token and position: the held ones are the exact cache's, where they sit
    exact = capture(loaded, None, force=snap)
    kept = list(range(sink)) + list(range(n + steps - 1 - window, n + steps - 1))
    assert torch.allclose(snap.keys(0), exact.keys(0)[:, :, kept], atol=1e-6)


# ---- a batch: every row keeps what it would keep alone ------------------------------------------
ROWS = ["The quick brown fox jumps over the lazy dog while the cat sleeps in the warm sun.",
        "Seven small boats sailed past the harbor wall as gulls circled over the grey sea.",
        "A tall stack of old letters waited on the desk for somebody to read them at last."]


def _run_rows(loaded, rows, policy, steps=4):
    """Prefill a batch of equal-length rows, then `steps` greedy steps per row: (cache, per-step logits)."""
    model = loaded.model
    ids = torch.tensor(rows)
    cache = policy.build(model)
    with policy.session(model), torch.no_grad():
        out = model(ids, past_key_values=cache, use_cache=True)
        logits = [out.logits[:, -1].float()]
        for _ in range(steps):
            out = model(logits[-1].argmax(dim=-1, keepdim=True), past_key_values=cache, use_cache=True)
            logits.append(out.logits[:, -1].float())
    return cache, torch.stack(logits, dim=1)  # [batch, steps + 1, vocab]


@pytest.mark.parametrize("spec", ["snapkv:capacity=40,window=8,kernel=5,pool=avg",
                                  "snapkv:capacity=24,window=4,kernel=3,pool=max",
                                  "streaming:sink=4,window=16"])
@pytest.mark.parametrize("name", ["tiny-mha", "tiny-llama"])
def test_each_batch_row_keeps_what_it_would_keep_alone(spec, name):
    loaded = tiny(name)
    rows = [loaded.encode(text) for text in ROWS]
    assert len({len(r) for r in rows}) == 1
    policy = parse_policy(spec)
    batch, batch_logits = _run_rows(loaded, rows, policy)
    alone = [_run_rows(loaded, [row], policy) for row in rows]
    for b, (cache, logits) in enumerate(alone):
        for got, want in zip(batch.layers, cache.layers):
            assert torch.equal(got.positions[b], want.positions[0])
            assert (got.keys[b] - want.keys[0]).abs().max() < 1e-5
            assert (got.values[b] - want.values[0]).abs().max() < 1e-5
        assert (batch_logits[b] - logits[0]).abs().max() < 1e-4
    if spec.startswith("snapkv"):  # the rows did choose differently: a shared choice could not pass above
        assert any(not torch.equal(layer.positions[0], layer.positions[1]) for layer in batch.layers)


@pytest.mark.parametrize("spec", ["snapkv:capacity=24,window=4", "streaming:sink=2,window=8"])
def test_a_padded_batch_is_refused(spec):
    loaded = tiny("tiny-qwen2")
    short, long = loaded.encode("Short one."), loaded.encode(ROWS[0])
    pad = loaded.config.pad_token_id or 0
    ids = torch.tensor([[pad] * (len(long) - len(short)) + short, long])
    policy = parse_policy(spec)
    with pytest.raises(KvlabError, match="batch rows of one length") as info, policy.session(loaded.model):
        loaded.model.generate(ids, attention_mask=(ids != pad).long(), past_key_values=policy.build(loaded.model),
                              max_new_tokens=2, do_sample=False)
    assert "\n" not in str(info.value)


def _pool_with_zero_padding(scores: torch.Tensor, kernel: int) -> torch.Tensor:
    """SnapKV's / kvpress's average: the sum over the window, zeros beyond the edges, over `kernel`."""
    pad = kernel // 2
    padded = torch.nn.functional.pad(scores, (pad, pad))
    return torch.stack([padded[:, j:j + kernel].sum(dim=-1) / kernel for j in range(scores.shape[-1])], dim=-1)


def _pool_over_real_neighbours(scores: torch.Tensor, kernel: int) -> torch.Tensor:
    pad, n = kernel // 2, scores.shape[-1]
    return torch.stack([scores[:, max(0, j - pad):j + pad + 1].mean(dim=-1) for j in range(n)], dim=-1)


@pytest.mark.parametrize("count_pad", [False, True])
def test_snapkv_edge_pooling_follows_count_pad(count_pad):
    scores = torch.tensor([[4.4, 0.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0]])
    policy = SnapKVPolicy(capacity=2, kernel=5, pool="avg", window=1, count_pad=count_pad)
    oracle = (_pool_with_zero_padding if count_pad else _pool_over_real_neighbours)(scores[:, :-1], 5)
    assert torch.allclose(policy.pooled(scores[:, :-1]), oracle)
    keep = policy.keep_index(scores[None], window=1)[0, 0].tolist()
    # position 0 averages 4.4 over its 3 real neighbours (1.47) or over 5 with two zeros (0.88); the
    # run of ones pools to 1.0 at position 7: that wins only where the padding is counted
    assert keep == ([7, 11] if count_pad else [0, 11])
    assert keep == [int(oracle[0].argmax()), 11]
