"""The mixed cache: hot window + quantized blocks, flash-decoding attention over both."""

from __future__ import annotations

import contextlib

import pytest
import torch

import kvlab
from kvlab.caches import parse_policy
from kvlab.caches.mixed_layer import MixedLayer, cache_nbytes
from kvlab.runspec import RunSpec, RunSpecError
from kvlab.attention.reference import reference_attention
from tests.conftest import TINY_FAMILIES, tiny

SCHEMES = ["scheme=kivi,bits=2", "scheme=kivi,bits=4", "scheme=kivi,bits=8", "scheme=q8_0", "scheme=q4_0", "scheme=fp8"]
PROMPT = list(range(40, 77))  # 37 byte tokens


def _query(attn, hidden, position_embeddings):
    """q after RoPE, as the attention module computes it."""
    import inspect

    module = inspect.getmodule(type(attn))
    b, n, _ = hidden.shape
    q = attn.q_proj(hidden).view(b, n, -1, attn.head_dim).transpose(1, 2)
    cos, sin = position_embeddings
    q, _ = module.apply_rotary_pos_emb(q, q, cos, sin)
    return q


def _decode_errors(name: str, spec: str, steps: int = 10, layer_idx: int = 1) -> tuple[float, int]:
    """Largest |flash-decoding output - float64 reference over the dequantized cache| over decode
    steps of one layer, and how many of those steps read quantized blocks."""
    model = tiny(name).model
    policy = parse_policy(spec)
    cache = policy.build(model)
    attn = model.model.layers[layer_idx].self_attn
    layer = cache.layers[layer_idx]
    seen: dict = {}
    worst, with_blocks = 0.0, 0

    def before(module, args, kwargs):
        seen["q"] = _query(module, kwargs["hidden_states"], kwargs["position_embeddings"])

    def out_proj(module, args):
        seen["out"] = args[0]
        seen["deferred"] = layer.defer_cold

    def after(module, args, kwargs, output):
        nonlocal worst, with_blocks
        q = seen["q"]
        if q.shape[2] != 1:
            return
        assert seen["deferred"], "the decode step did not go through flash-decoding"
        keys, values = layer.dequantized()
        want = reference_attention(q, keys, values, scale=module.scaling)
        got = seen["out"].view(1, 1, q.shape[1], -1).transpose(1, 2)
        worst = max(worst, (got.double() - want).abs().max().item())
        with_blocks += layer.key_store.n_blocks > 0

    handles = [attn.register_forward_pre_hook(before, with_kwargs=True),
               attn.o_proj.register_forward_pre_hook(out_proj)]
    try:
        with policy.session(model), torch.no_grad():
            handles.append(attn.register_forward_hook(after, with_kwargs=True))
            out = model(torch.tensor([PROMPT]), past_key_values=cache, use_cache=True)
            for _ in range(steps):
                nxt = out.logits[:, -1:].argmax(-1)
                out = model(nxt, past_key_values=cache, use_cache=True)
    finally:
        for h in handles:
            h.remove()
    return worst, with_blocks


# every scheme at every hot size on tiny-llama; every scheme on each other family, hot sizes in turn
CASES = [("tiny-llama", scheme, hot) for scheme in SCHEMES for hot in (0, 5, 12)] + [
    (name, scheme, (0, 5, 12)[(i + j) % 3]) for i, name in enumerate(TINY_FAMILIES[1:]) for j, scheme in enumerate(SCHEMES)
]


@pytest.fixture
def native_calls(monkeypatch):
    """How many decode steps the compiled kernel ran."""
    from kvlab.attention import flash_decoding

    calls = []
    real = flash_decoding.native_flash_decode
    monkeypatch.setattr(flash_decoding, "native_flash_decode", lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


@pytest.mark.parametrize("kernel", ["native", "torch"])
@pytest.mark.parametrize("name,scheme,hot", CASES)
def test_flash_decoding_equals_reference_over_dequantized_cache(name, scheme, hot, kernel, native_calls):
    worst, with_blocks = _decode_errors(name, f"mixed:{scheme},hot={hot},group=8,split=16,kernel={kernel}")
    assert with_blocks == 10
    assert worst <= 1e-5
    assert len(native_calls) == (10 * len(tiny(name).model.model.layers) if kernel == "native" else 0)


def test_hot_window_fills_then_moves_whole_blocks():
    model = tiny("tiny-llama").model
    cache = parse_policy("mixed:hot=5,group=8,split=16").build(model)
    layer = cache.layers[0]
    lengths = []
    with torch.no_grad():
        model(torch.tensor([PROMPT]), past_key_values=cache, use_cache=True)
        lengths.append((layer.key_store.n_blocks, layer.keys.shape[-2]))
        for t in range(12):
            model(torch.tensor([[t]]), past_key_values=cache, use_cache=True)
            lengths.append((layer.key_store.n_blocks, layer.keys.shape[-2]))
    assert lengths[0] == (4, 5)  # 37 tokens: 4 blocks of 8, the last 5 in full precision
    assert all(5 <= hot <= 5 + 8 - 1 and 8 * blocks + hot == 37 + i for i, (blocks, hot) in enumerate(lengths))
    assert lengths[-1] == (5, 9) and cache.get_seq_length() == 49
    assert len(layer.key_store.segments) == 2  # split=16 tokens: segments of 2 blocks


def test_each_block_is_quantized_once_and_never_rewritten():
    model = tiny("tiny-llama").model
    cache = parse_policy("mixed:hot=4,group=8,split=16").build(model)
    layer = cache.layers[2]
    calls = []
    encode = layer.key_store.codec.encode
    layer.key_store.codec.encode = lambda x: (calls.append(x.shape[2]), encode(x))[1]
    with torch.no_grad():
        model(torch.tensor([PROMPT]), past_key_values=cache, use_cache=True)
        first_segment = layer.key_store.segments[0]
        stored = {k: v.clone() for k, v in layer.key_store.raw().items()}
        for t in range(30):
            model(torch.tensor([[t]]), past_key_values=cache, use_cache=True)
    assert sum(calls) == layer.key_store.n_blocks == layer.key_store.blocks_encoded == 7
    assert calls == [4, 1, 1, 1]  # the prompt's blocks at once, then one block per 8 steps
    assert layer.key_store.segments[0] is first_segment
    now = layer.key_store.raw()
    assert all(torch.equal(now[k][:, :, :4], stored[k]) for k in stored)


def test_memory_is_counted_to_the_byte():
    model = tiny("tiny-llama").model  # 4 layers, 2 KV heads, head_dim 16
    cache = parse_policy("mixed:bits=4,hot=4,group=8").build(model)
    with torch.no_grad():
        model(torch.tensor([PROMPT]), past_key_values=cache, use_cache=True)
    # 37 tokens: 4 blocks of 8 quantized, 5 hot. Per KV head and block: keys 8*16/2 payload +
    # 16 float16 scales + 16 zeros (per channel) = 128 bytes; values 64 payload + 16 scales + 16
    # zeros (two groups of 8 channels per token) = 128 bytes. Hot: 5 tokens * 16 * 4 bytes, K and V.
    per_layer = 2 * 4 * (128 + 128) + 2 * 5 * 16 * 4 * 2
    assert cache_nbytes(cache) == 4 * per_layer == sum(layer.nbytes for layer in cache.layers)


def _greedy(model, cache, ids, steps, session, attention_mask=None):
    logits = []
    ctx = session if session is not None else contextlib.nullcontext()
    with ctx, torch.no_grad():
        mask = attention_mask
        out = model(ids, attention_mask=mask, past_key_values=cache, use_cache=True)
        for _ in range(steps):
            logits.append(out.logits[:, -1])
            nxt = out.logits[:, -1:].argmax(-1)
            if mask is not None:
                mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
            out = model(nxt, attention_mask=mask, past_key_values=cache, use_cache=True)
    return torch.stack(logits)


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-mistral"])
def test_without_the_session_update_returns_the_dequantized_view(name):
    """Plain SDPA over what update() returns gives the logits flash-decoding gives."""
    model = tiny(name).model
    policy = parse_policy("mixed:bits=4,hot=6,group=8,split=16")
    plain = _greedy(model, policy.build(model), torch.tensor([PROMPT]), 16, None)
    flash = _greedy(model, policy.build(model), torch.tensor([PROMPT]), 16, policy.session(model))
    assert (plain - flash).abs().max() <= 1e-5


@pytest.mark.parametrize("kernel", ["native", "torch"])
def test_left_padded_batch_masks_every_part(kernel):
    model = tiny("tiny-qwen2").model
    policy = parse_policy(f"mixed:scheme=q4_0,hot=3,group=8,split=8,kernel={kernel}")
    ids = torch.tensor([[258] * 11 + PROMPT[:26], PROMPT])
    mask = torch.ones_like(ids)
    mask[0, :11] = 0
    plain = _greedy(model, policy.build(model), ids, 12, None, mask)
    flash = _greedy(model, policy.build(model), ids, 12, policy.session(model), mask)
    assert (plain - flash).abs().max() <= 1e-5
    alone = _greedy(model, policy.build(model), torch.tensor([PROMPT[:26]]), 1, None)
    assert (plain[0, 0] - alone[0, 0]).abs().max() <= 1e-4  # padding is really masked


def test_generate_with_and_without_the_session():
    loaded = tiny("tiny-llama")
    model = loaded.model
    policy = parse_policy("mixed:bits=8,hot=4,group=8")
    ids = torch.tensor([PROMPT])
    hooks_before = sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())
    plain = model.generate(ids, past_key_values=policy.build(model), max_new_tokens=12, do_sample=False)
    with policy.session(model):
        assert model.config._attn_implementation == "kvlab_split_k"
        flash = model.generate(ids, past_key_values=policy.build(model), max_new_tokens=12, do_sample=False)
    assert model.config._attn_implementation == "sdpa"
    assert sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules()) == hooks_before
    exact = model.generate(ids, max_new_tokens=12, do_sample=False)
    assert torch.equal(plain, flash)
    assert torch.equal(plain[:, :38], exact[:, :38])  # the first token comes from a full-precision prefill


def test_session_undoes_itself_on_error():
    model = tiny("tiny-mha").model
    policy = parse_policy("mixed")
    with pytest.raises(RuntimeError), policy.session(model):
        raise RuntimeError("boom")
    assert model.config._attn_implementation == "sdpa"
    assert not any(m._forward_pre_hooks for m in model.modules())


def test_run_spec_errors_are_one_line():
    with pytest.raises(RunSpecError, match="scheme q8_0 stores 8 bits"):
        RunSpec.parse("cache=mixed:scheme=q8_0,bits=4")
    with pytest.raises(RunSpecError, match="one of 2, 4, 8"):
        RunSpec.parse("cache=mixed:bits=3")
    with pytest.raises(RunSpecError, match="multiple of group"):
        RunSpec.parse("cache=mixed:group=32,split=48")
    with pytest.raises(RunSpecError, match="hot must be"):
        RunSpec.parse("cache=mixed:hot=-1")
    with pytest.raises(kvlab.KvlabError, match="multiple of 32"):
        parse_policy("mixed:scheme=q8_0,group=1,split=1").build(tiny("tiny-llama").model)  # 16 values per block
    assert str(RunSpec.parse("cache=mixed:bits=2,hot=64,dtype=float32")) == "dtype=float32,cache=mixed:bits=2,hot=64,scheme=kivi,group=32,split=4096,kernel=auto"


def test_capture_cli_stores_the_dequantized_view_and_the_raw_blocks(cli, tmp_path):
    out = tmp_path / "snap"
    code, _, err = cli("capture", "--model", "tiny-llama", "--prompt", "a mixed cache test prompt, long enough",
                       "-n", "12", "--run", "cache=mixed:bits=4,hot=4,group=8", "--out", out, "--quiet")
    assert code == 0, err
    snap = kvlab.Snapshot.load(out)
    n = len(snap.token_ids) - 1
    q = snap.tensor("layers.0.keys.q")
    blocks = (n - 4) // 8
    assert q.shape == (1, 2, blocks, 8, 8) and q.dtype == torch.uint8
    assert snap.tensor("layers.0.values.scale").shape == (1, 2, blocks, 8, 2)  # 2 groups of 8 channels
    assert snap.tensor("layers.3.keys.hot").shape[2] == n - 8 * blocks
    assert snap.keys(0).shape == (1, 2, n, 16)
    # the stored view is the dequantized blocks followed by the hot window
    from kvlab.quant.blocks import SchemeSpec

    codec = SchemeSpec("kivi", 4, 8, 32).codec("keys", 16)
    parts = {p: snap.tensor(f"layers.0.keys.{p}") for p in ("q", "scale", "zero")}
    cold = codec.decode(parts, torch.float32).reshape(1, 2, -1, 16)
    assert torch.equal(snap.keys(0), torch.cat([cold, snap.tensor("layers.0.keys.hot")], dim=2))


def test_capture_before_any_block_is_quantized(cli, tmp_path):
    """With the default 128-token window a short run quantizes nothing: the view is the window."""
    out = tmp_path / "snap"
    code, _, err = cli("capture", "--model", "tiny-llama", "--prompt", "short", "-n", "3",
                       "--run", "cache=mixed", "--out", out, "--quiet")
    assert code == 0, err
    snap = kvlab.Snapshot.load(out)
    assert torch.equal(snap.keys(1), snap.tensor("layers.1.keys.hot"))
    assert snap.keys(1).shape[2] == len(snap.token_ids) - 1


def test_layers_are_mixed_layers_built_explicitly():
    cache = parse_policy("mixed").build(tiny("tiny-llama-32l").model)
    assert len(cache.layers) == 32 and all(type(layer) is MixedLayer for layer in cache.layers)
    assert MixedLayer._layer_type is None


def test_block_store_segments_hold_blocks_in_order():
    from kvlab.caches.blockstore import BlockStore
    from kvlab.quant.blocks import SchemeSpec

    store = BlockStore(SchemeSpec("q8_0", 8, tokens=2).codec("keys", 16), segment_blocks=3)
    x = torch.randn(1, 1, 8, 2, 16)
    store.append(x[:, :, :5])  # one whole segment of 3 and a tail of 2
    store.append(x[:, :, 5:6])  # fills the tail into a second segment
    store.append(x[:, :, 6:8])
    assert [next(iter(p.values())).shape[2] for p in store.splits()] == [3, 3, 2]
    assert store.n_blocks == store.blocks_encoded == 8
    assert torch.equal(store.decode_all(torch.float32), store.codec.decode(store.codec.encode(x), torch.float32).reshape(1, 1, 16, 16))
    assert store.nbytes == 8 * (2 * 16 // 32) * 34


def test_bfloat16_runs_keep_the_hot_window_in_bfloat16():
    loaded = tiny("tiny-llama", "dtype=bfloat16")
    golden = kvlab.capture(loaded, PROMPT, max_new_tokens=10, stop_at_eos=False)
    snap = kvlab.capture(loaded, None, "dtype=bfloat16,cache=mixed:bits=8,hot=4,group=8", force=golden)
    assert snap.tensor("layers.0.keys.hot").dtype == torch.bfloat16 and snap.keys(0).dtype == torch.bfloat16
    assert (snap.logits() - golden.logits()).abs().max() <= 0.1  # 8-bit blocks within bfloat16 noise
