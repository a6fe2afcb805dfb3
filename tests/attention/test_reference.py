"""The float64 reference attention against torch's SDPA (float64) and a hand-worked case."""

import math

import pytest
import torch
import torch.nn.functional as F

from kvlab.attention import reference_attention


def _inputs(b=2, h=6, kv=3, t=5, s=9, d=8, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, t, d, generator=g).to(dtype)
    k = torch.randn(b, kv, s, d, generator=g).to(dtype)
    v = torch.randn(b, kv, s, d, generator=g).to(dtype)
    return q, k, v


def _sdpa(q, k, v, **kw):
    return F.scaled_dot_product_attention(q.double(), k.double(), v.double(), enable_gqa=True, **kw)


def test_two_keys_by_hand():
    q = torch.tensor([[[[1.0, 0.0]]]])
    k = torch.tensor([[[[1.0, 0.0], [0.0, 1.0]]]])
    v = torch.tensor([[[[10.0, 0.0], [0.0, 10.0]]]])
    out = reference_attention(q, k, v, scale=1.0)
    w = math.e / (math.e + 1.0)  # softmax of scores (1, 0)
    assert out.dtype == torch.float64
    assert torch.allclose(out, torch.tensor([[[[10 * w, 10 * (1 - w)]]]], dtype=torch.float64), atol=1e-15)


@pytest.mark.parametrize("kv", [6, 3, 1])  # MHA, GQA, MQA
def test_matches_sdpa_with_grouped_heads(kv):
    q, k, v = _inputs(kv=kv)
    got = reference_attention(q, k, v)
    assert torch.allclose(got, _sdpa(q, k, v), atol=1e-12, rtol=0)


def test_kv_head_j_serves_a_contiguous_group_of_query_heads():
    q, k, v = _inputs(h=4, kv=2)
    got = reference_attention(q, k, v)
    # query heads 0, 1 use KV head 0; 2, 3 use KV head 1 (transformers' repeat_kv)
    alone = reference_attention(q[:, 2:4], k[:, 1:2], v[:, 1:2])
    assert torch.equal(got[:, 2:4], alone)


def test_boolean_and_additive_masks_agree_with_sdpa():
    q, k, v = _inputs()
    g = torch.Generator().manual_seed(3)
    allowed = torch.rand(2, 1, 5, 9, generator=g) > 0.3
    allowed[..., 0] = True  # no empty rows here
    additive = torch.zeros(allowed.shape).masked_fill(~allowed, float("-inf"))
    want = _sdpa(q, k, v, attn_mask=allowed)
    assert torch.allclose(reference_attention(q, k, v, allowed), want, atol=1e-12, rtol=0)
    assert torch.allclose(reference_attention(q, k, v, additive), want, atol=1e-12, rtol=0)
    bias = torch.randn(1, 6, 5, 9, generator=g)  # a real additive bias, per head
    assert torch.allclose(reference_attention(q, k, v, bias), _sdpa(q, k, v, attn_mask=bias.double()), atol=1e-12, rtol=0)


def test_causal_with_offset():
    q, k, v = _inputs(t=4, s=10)
    # queries are the last 4 positions: 6..9
    rows = torch.arange(4)[:, None] + 6
    allowed = torch.arange(10)[None, :] <= rows
    want = _sdpa(q, k, v, attn_mask=allowed)
    assert torch.allclose(reference_attention(q, k, v, causal=True), want, atol=1e-12, rtol=0)
    # an explicit offset: queries at positions 2..5
    allowed = torch.arange(10)[None, :] <= torch.arange(4)[:, None] + 2
    got = reference_attention(q, k, v, causal=True, q_offset=2)
    assert torch.allclose(got, _sdpa(q, k, v, attn_mask=allowed), atol=1e-12, rtol=0)


def test_fully_masked_rows_are_zero_not_nan():
    q, k, v = _inputs(t=2, s=3)
    allowed = torch.tensor([[True, True, False], [False, False, False]])
    out = reference_attention(q, k, v, allowed)
    assert torch.isfinite(out).all()
    assert torch.equal(out[:, :, 1], torch.zeros_like(out[:, :, 1]))
    assert torch.allclose(out[:, :, 0], _sdpa(q, k, v, attn_mask=allowed)[:, :, 0], atol=1e-12, rtol=0)


def test_scale_softcap_and_low_precision_inputs():
    q, k, v = _inputs(dtype=torch.bfloat16)
    got = reference_attention(q, k, v, scale=0.5, softcap=3.0)
    scores = 3.0 * torch.tanh(q.double() @ k.double().repeat_interleave(2, 1).transpose(-1, -2) * 0.5 / 3.0)
    want = torch.softmax(scores, -1) @ v.double().repeat_interleave(2, 1)
    assert torch.allclose(got, want, atol=1e-12, rtol=0)


def test_bad_shapes_are_refused():
    q, k, v = _inputs(h=6, kv=4)
    with pytest.raises(ValueError, match="cannot share"):
        reference_attention(q, k, v)
    q, k, v = _inputs()
    with pytest.raises(ValueError, match="head_dim"):
        reference_attention(q[..., :4], k, v)
