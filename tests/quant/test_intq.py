import pytest
import torch

from kvlab.quant import intq


def test_hand_worked_two_bit_group():
    q = intq.quantize(torch.tensor([[0.0, 1.0, 2.0, 3.0]]), bits=2, group=4, axis=-1)
    assert q.zero.tolist() == [[0.0]] and q.scale.tolist() == [[1.0]]
    assert q.payload.tolist() == [[0b11_10_01_00]]  # codes 0, 1, 2, 3, first code in the low bits
    assert q.nbytes == 1 + 2 + 2  # one payload byte, a float16 scale and a float16 zero
    assert intq.dequantize(q).tolist() == [[0.0, 1.0, 2.0, 3.0]]


def test_hand_worked_four_bit_steps():
    x = torch.tensor([[-1.0, 4.0, 5.5, 14.0]])  # zero -1, scale 15 / 15 = 1: codes 0, 5, 6.5 -> 6 (even), 15
    q = intq.quantize(x, bits=4, group=4, axis=-1)
    assert q.scale.tolist() == [[1.0]] and q.zero.tolist() == [[-1.0]]
    assert q.payload.tolist() == [[0 | (5 << 4), 6 | (15 << 4)]]
    assert intq.dequantize(q).tolist() == [[-1.0, 4.0, 5.0, 14.0]]


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("axis", [-1, -2])
def test_error_is_at_most_half_a_step(bits, axis):
    g = torch.Generator().manual_seed(bits)
    # channels with large offsets are where a rounded-to-nearest float16 zero would cost more
    x = torch.randn(2, 3, 64, 32, generator=g) * 2 + torch.randn(1, 1, 1, 32, generator=g) * 40
    q = intq.quantize(x, bits, 32, axis)
    err = (intq.dequantize(q) - x).abs()
    member = (axis % 4) + 1
    step = q.scale.float().unsqueeze(member)
    grouped_err = intq._grouped(err, 32, axis)
    assert (grouped_err <= step / 2 + 1e-5 * x.abs().max()).all()


def test_constant_groups_are_exact_and_scale_zero():
    x = torch.full((1, 32), 0.25)
    q = intq.quantize(x, 4, 32, -1)
    assert q.scale.item() == 0.0 and torch.equal(intq.dequantize(q), x)


def test_kivi_axes_and_byte_accounting():
    x = torch.randn(1, 2, 32, 64)
    keys = intq.quantize(x, 4, 32, axis=-2)  # per channel: one group of 32 tokens per channel
    values = intq.quantize(x, 4, 32, axis=-1)  # per token: groups of 32 channels
    assert keys.scale.shape == (1, 2, 1, 64) and values.scale.shape == (1, 2, 32, 2)
    assert keys.payload.shape == (1, 2, 32, 32)
    assert keys.nbytes == 2 * 32 * 64 // 2 + 2 * 2 * 64 * 2  # payload + scales + zeros
    assert values.nbytes == 2 * 32 * 64 // 2 + 2 * 2 * 32 * 2 * 2
    assert intq.dequantize(keys, torch.float16).dtype == torch.float16


def test_bad_shapes():
    with pytest.raises(ValueError, match="groups of 32"):
        intq.quantize(torch.zeros(1, 48), 4, 32, -1)
    with pytest.raises(ValueError, match="negative"):
        intq.quantize(torch.zeros(1, 32), 4, 32, 1)
