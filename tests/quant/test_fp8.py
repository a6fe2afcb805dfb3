import pytest
import torch

from kvlab.quant import fp8


@pytest.mark.parametrize("fmt", ["e4m3fn", "e5m2", "e4m3fnuz"])
def test_scale_one_matches_torch_cast_in_range(fmt):
    limit = fp8.fp8_max(fmt)
    x = torch.linspace(-limit, limit, 2001)
    assert torch.equal(fp8.quantize(x, 1.0, fmt).view(torch.uint8), x.to(fp8.fp8_dtype(fmt)).view(torch.uint8))


@pytest.mark.parametrize("fmt", ["e4m3fn", "e5m2", "e4m3fnuz"])
def test_overflow_clamps_instead_of_nan(fmt):
    limit = fp8.fp8_max(fmt)
    x = torch.tensor([limit * 10, -limit * 10, float("inf"), -float("inf")])
    q = fp8.quantize(x, 1.0, fmt).float()
    assert not torch.isnan(q).any()
    assert q.tolist() == [limit, -limit, limit, -limit]


def test_clamp_matters_where_a_plain_cast_gives_nan():
    # A plain cast past the range is NaN for e4m3fnuz here (and for e4m3fn on some backends and
    # torch versions); quantize never depends on how the cast saturates.
    assert torch.isnan(torch.tensor([500.0]).to(torch.float8_e4m3fnuz).float()).all()
    assert fp8.quantize(torch.tensor([500.0]), 1.0, "e4m3fnuz").float().item() == 240.0
    assert fp8.quantize(torch.tensor([500.0]), 1.0, "e4m3fn").float().item() == 448.0


def test_hand_worked_values():
    # 0.3 = 1.2 * 2^-2; with 3 mantissa bits 1.2 rounds to 1.25 -> 0.3125
    assert fp8.quantize(torch.tensor([0.3]), 1.0, "e4m3fn").float().item() == 0.3125
    # with scale 0.5, 1.0 is stored as 2.0 and reads back exactly
    q = fp8.quantize(torch.tensor([1.0]), 0.5, "e4m3fn")
    assert q.float().item() == 2.0 and fp8.dequantize(q, 0.5).item() == 1.0
    assert fp8.fp8_max("e5m2") == 57344.0 and fp8.fp8_max("e4m3fnuz") == 240.0


def test_scale_from_amax_uses_the_whole_range():
    x = torch.randn(1, 3, 50, 8) * torch.tensor([1.0, 10.0, 100.0]).view(1, 3, 1, 1)
    per_head = fp8.scale_from_amax(fp8.amax(x, per_head=True), "e4m3fn")
    q = fp8.quantize(x, per_head, "e4m3fn")
    assert torch.allclose(q.float().abs().amax(dim=(0, 2, 3)), torch.full((3,), 448.0))
    back = fp8.dequantize(q, per_head)
    rel = (back - x).abs() / x.abs().clamp_min(1e-6)
    # 3 mantissa bits: relative rounding error at most 2^-4 for normal numbers
    normal = x.abs() > per_head.view(1, 3, 1, 1) * 2 ** -6
    assert rel[normal].max() <= 2 ** -4 + 1e-6
    assert fp8.scale_from_amax(torch.tensor(0.0), "e4m3fn").item() == 1.0


def test_bad_inputs():
    with pytest.raises(ValueError, match="unknown fp8 format"):
        fp8.fp8_dtype("e3m4")
    with pytest.raises(ValueError, match="per-head scales do not fit"):
        fp8.quantize(torch.zeros(1, 2, 3, 4), torch.ones(3))


def test_compressed_tensors_head_shape_broadcasts_like_a_vector():
    x = torch.randn(2, 3, 5, 4) * torch.tensor([1.0, 5.0, 0.1]).view(1, 3, 1, 1)
    scale = fp8.scale_from_amax(fp8.amax(x, per_head=True), "e4m3fn")
    q_vec = fp8.quantize(x, scale, "e4m3fn")
    q_ct = fp8.quantize(x, scale.reshape(3, 1, 1), "e4m3fn")  # compressed-tensors stores (num_kv_heads, 1, 1)
    assert torch.equal(q_vec.view(torch.uint8), q_ct.view(torch.uint8))
    assert torch.equal(fp8.dequantize(q_ct, scale.reshape(3, 1, 1)), fp8.dequantize(q_vec, scale))
