"""flash_decode must equal one softmax over all positions (float64 reference), whatever the split."""

import pytest
import torch

from kvlab.attention import flash_decoding, native
from kvlab.attention.reference import reference_attention

KERNEL = {"name": "fused"}


@pytest.fixture(autouse=True, params=["fused", "explicit", "native"])
def kernel(request, monkeypatch):
    """Every test runs on the three part kernels: PyTorch's fused CPU one, the written-out
    formulas, and the compiled kernel (parts as full-precision rows, the last one as the hot window)."""
    if request.param == "explicit":
        monkeypatch.setattr(flash_decoding, "_FUSED_CPU", None)
    monkeypatch.setitem(KERNEL, "name", request.param)
    return request.param


def flash_decode(query, parts, scale=None, mask=None):
    if KERNEL["name"] != "native":
        return flash_decoding.flash_decode(query, parts, scale, mask)
    parts = list(parts)
    cold = [native.Part(native.raw_role(k), native.raw_role(v), k.shape[-2], 8) for k, v in parts[:-1]]
    return flash_decoding.native_flash_decode(query, cold, *parts[-1], scale, mask)


def _split(k, v, sizes):
    start = 0
    for n in sizes:
        yield k[:, :, start:start + n], v[:, :, start:start + n]
        start += n


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2), (9, 3), (4, 1)])
@pytest.mark.parametrize("sizes", [[40], [1, 39], [16, 0, 16, 8], [32, 8], [0, 40, 0]])
def test_matches_reference_for_any_split(heads, kv_heads, sizes):
    g = torch.Generator().manual_seed(heads * 10 + kv_heads)
    q = torch.randn(2, heads, 1, 16, generator=g)
    k = torch.randn(2, kv_heads, 40, 16, generator=g) * 3  # large scores: the max-subtraction matters
    v = torch.randn(2, kv_heads, 40, 16, generator=g)
    got = flash_decode(q, _split(k, v, sizes), scale=0.3)
    want = reference_attention(q, k, v, scale=0.3)
    assert (got.double() - want).abs().max() <= 1e-5


def test_padding_mask_and_fully_masked_parts():
    g = torch.Generator().manual_seed(3)
    q = torch.randn(2, 4, 1, 8, generator=g)
    k, v = torch.randn(2, 2, 24, 8, generator=g), torch.randn(2, 2, 24, 8, generator=g)
    mask = torch.ones(2, 1, 1, 24, dtype=torch.bool)
    mask[0, :, :, :10] = False  # left padding: the first part of row 0 is fully masked
    mask[1, :, :, 13] = False
    got = flash_decode(q, _split(k, v, [8, 8, 8]), mask=mask)
    assert (got.double() - reference_attention(q, k, v, mask)).abs().max() <= 1e-5


def test_additive_and_per_head_masks_and_several_query_rows():
    g = torch.Generator().manual_seed(4)
    q = torch.randn(1, 4, 3, 8, generator=g)
    k, v = torch.randn(1, 2, 12, 8, generator=g), torch.randn(1, 2, 12, 8, generator=g)
    causal = torch.ones(3, 12, dtype=torch.bool).tril(diagonal=9)
    additive = torch.zeros(1, 4, 3, 12).masked_fill(~causal, float("-inf")) + torch.randn(1, 4, 3, 12, generator=g)
    got = flash_decode(q, _split(k, v, [5, 7]), mask=additive)
    assert (got.double() - reference_attention(q, k, v, additive)).abs().max() <= 1e-5
    got = flash_decode(q, _split(k, v, [6, 6]), mask=causal.view(1, 1, 3, 12))
    assert (got.double() - reference_attention(q, k, v, causal.view(1, 1, 3, 12))).abs().max() <= 1e-5


def test_nothing_to_attend_gives_zeros_and_bad_masks_are_refused():
    q = torch.randn(1, 2, 1, 4)
    k = v = torch.randn(1, 2, 6, 4)
    assert torch.equal(flash_decode(q, _split(k, v, [6]), mask=torch.zeros(1, 1, 1, 6, dtype=torch.bool)),
                       torch.zeros(1, 2, 1, 4))
    with pytest.raises(ValueError, match="covers 5 positions"):
        flash_decode(q, _split(k, v, [6]), mask=torch.ones(1, 1, 1, 5, dtype=torch.bool))


def test_half_precision_inputs_are_accumulated_in_float32():
    g = torch.Generator().manual_seed(5)
    q = torch.randn(1, 2, 1, 16, generator=g).to(torch.bfloat16)
    k = torch.randn(1, 1, 64, 16, generator=g).to(torch.bfloat16)
    v = torch.randn(1, 1, 64, 16, generator=g).to(torch.bfloat16)
    got = flash_decode(q, _split(k, v, [32, 32]))
    assert got.dtype == torch.bfloat16
    assert (got.double() - reference_attention(q, k, v)).abs().max() <= 1e-2  # one bfloat16 rounding
