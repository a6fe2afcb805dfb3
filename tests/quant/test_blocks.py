import pytest
import torch

from kvlab.quant.blocks import SchemeSpec, parts_bytes

# bytes of one block of 32 tokens x head_dim 64, keys and values, worked by hand
BLOCK_BYTES = {
    ("kivi", 2): (32 * 64 // 4 + 2 * 64 * 2, 32 * 64 // 4 + 2 * 32 * 2 * 2),
    ("kivi", 4): (32 * 64 // 2 + 2 * 64 * 2, 32 * 64 // 2 + 2 * 32 * 2 * 2),
    ("kivi", 8): (32 * 64 + 2 * 64 * 2, 32 * 64 + 2 * 32 * 2 * 2),
    ("q8_0", 8): (64 * 34, 64 * 34),  # 2048 values = 64 ggml blocks
    ("q4_0", 4): (64 * 18, 64 * 18),
    ("fp8", 8): (32 * 64 + 4, 32 * 64 + 4),  # one float32 scale per block and head
}
# worst error relative to the block's largest magnitude, by bits of precision
TOLERANCE = {("kivi", 2): 0.7, ("kivi", 4): 0.14, ("kivi", 8): 0.01, ("q8_0", 8): 0.005, ("q4_0", 4): 0.13,  # the most negative value can clamp a whole step

             ("fp8", 8): 0.07}


@pytest.mark.parametrize("scheme,bits", sorted(BLOCK_BYTES))
def test_round_trip_and_exact_bytes(scheme, bits):
    spec = SchemeSpec(scheme, bits, tokens=32, group=32)
    x = torch.randn(2, 3, 5, 32, 64, generator=torch.Generator().manual_seed(bits))
    for role, expected in zip(("keys", "values"), BLOCK_BYTES[(scheme, bits)]):
        codec = spec.codec(role, 64)
        parts = codec.encode(x)
        assert all(t.shape[:3] == (2, 3, 5) for t in parts.values())
        assert parts_bytes(parts) == expected * 2 * 3 * 5
        back = codec.decode(parts, torch.float32)
        assert back.shape == x.shape
        err = (back - x).abs().amax() / x.abs().amax()
        assert err <= TOLERANCE[(scheme, bits)]
        one = codec.decode({k: v[:, :, 2:3] for k, v in parts.items()}, torch.float32)
        assert torch.equal(one, back[:, :, 2:3])  # a block decodes on its own


def test_small_head_dim_uses_a_smaller_value_group_and_ggml_spans_tokens():
    x = torch.randn(1, 1, 2, 8, 16)
    kivi = SchemeSpec("kivi", 4, tokens=8, group=32).codec("values", 16)
    assert kivi.group == 16
    q4 = SchemeSpec("q4_0", 4, tokens=8).codec("keys", 16)
    assert parts_bytes(q4.encode(x)) == 2 * (8 * 16 // 32) * 18
    with pytest.raises(ValueError, match="multiple of 32"):
        SchemeSpec("q8_0", 8, tokens=1).codec("keys", 16)


def test_fp8_table_decoding_equals_the_cast_for_every_byte():
    from kvlab.quant.blocks import _fp8_to_float

    q = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).reshape(4, 64)
    assert torch.allclose(_fp8_to_float(q), q.float(), rtol=0, atol=0, equal_nan=True)  # NaN bytes stay NaN
