import pytest
import torch

from kvlab.quant import packing


def test_hand_worked_bytes():
    assert packing.pack(torch.tensor([1, 2], dtype=torch.uint8), 4).tolist() == [0x21]
    assert packing.pack(torch.tensor([1, 2, 3, 0], dtype=torch.uint8), 2).tolist() == [0b00_11_10_01]
    assert packing.pack(torch.tensor([15, 0, 0, 15], dtype=torch.uint8), 4).tolist() == [0x0F, 0xF0]
    assert packing.pack(torch.tensor([7, 200], dtype=torch.uint8), 8).tolist() == [7, 200]


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_round_trip_and_size(bits):
    codes = torch.randint(0, 1 << bits, (3, 5, 64), dtype=torch.uint8)
    packed = packing.pack(codes, bits)
    assert packed.shape == (3, 5, 64 * bits // 8) and packed.dtype == torch.uint8
    assert packing.packed_size(64, bits) == 64 * bits // 8
    assert torch.equal(packing.unpack(packed, bits), codes)


def test_rejects_what_does_not_fill_bytes():
    with pytest.raises(ValueError, match="whole bytes"):
        packing.pack(torch.zeros(3, dtype=torch.uint8), 2)
    with pytest.raises(ValueError, match="allowed"):
        packing.pack(torch.zeros(4, dtype=torch.uint8), 3)
    with pytest.raises(ValueError, match="uint8"):
        packing.pack(torch.zeros(4, dtype=torch.int32), 4)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_unpack_reads_views_and_empty_tensors(bits):
    codes = torch.randint(0, 1 << bits, (3, 5, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(bits))
    packed = packing.pack(codes, bits)
    assert torch.equal(packing.unpack(packed.transpose(0, 1), bits), codes.transpose(0, 1))  # a strided view
    assert torch.equal(packing.unpack(packed[:, 1:3], bits), codes[:, 1:3])
    assert packing.unpack(packed[:0], bits).shape == (0, 5, 16)
