"""Q8_0 / Q4_0 bytes must equal what the gguf package writes, and read back as gguf reads them."""

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, quants

from kvlab.quant import ggml

CODECS = {
    "q8_0": (GGMLQuantizationType.Q8_0, ggml.quantize_q8_0, ggml.dequantize_q8_0),
    "q4_0": (GGMLQuantizationType.Q4_0, ggml.quantize_q4_0, ggml.dequantize_q4_0),
}


def _edge_rows() -> torch.Tensor:
    rows = torch.randn(12, 64)
    rows[0] = 0.0  # all-zero blocks
    rows[1, :32] = 5.0  # constant block
    rows[1, 7] = -5.0  # tie in magnitude: Q4_0 takes the first (+5)
    rows[2, :32] = -5.0
    rows[2, 3] = 5.0  # tie, the negative comes first
    rows[3] = torch.arange(64) * 0.5 - 16  # exact .5 steps: round half away from zero
    rows[4] = torch.randn(64) * 1e-30  # scale underflows float16
    rows[5] = torch.randn(64) * 1e30  # scale overflows float16 -> inf
    rows[6] = torch.randn(64) * 60000.0
    rows[7, :] = 1e-8
    rows[8] = torch.linspace(-127, 127, 64)  # Q8_0 scale exactly 1
    rows[9, :32] = torch.arange(32) - 8.0  # Q4_0 scale exactly 1 (max |x| is -8)
    rows[10] = -0.0
    rows[11, ::2] = torch.finfo(torch.float32).tiny
    return rows


@pytest.mark.parametrize("fmt", sorted(CODECS))
@pytest.mark.parametrize("magnitude", [1.0, 1e-3, 1e3])
def test_bytes_equal_gguf_on_random_data(fmt, magnitude):
    qtype, quantize, dequantize = CODECS[fmt]
    x = torch.randn(2, 3, 256, generator=torch.Generator().manual_seed(7)) * magnitude
    ours = quantize(x)
    theirs = quants.quantize(x.numpy(), qtype)
    assert ours.numpy().tobytes() == theirs.tobytes() and tuple(ours.shape) == theirs.shape
    assert np.array_equal(dequantize(ours).numpy(), quants.dequantize(theirs, qtype))


@pytest.mark.parametrize("fmt", sorted(CODECS))
def test_bytes_equal_gguf_on_edge_cases(fmt):
    qtype, quantize, dequantize = CODECS[fmt]
    x = _edge_rows()
    with np.errstate(all="ignore"):
        theirs = quants.quantize(x.numpy(), qtype)
        expected = quants.dequantize(theirs, qtype)
    assert quantize(x).numpy().tobytes() == theirs.tobytes()
    assert np.array_equal(dequantize(torch.from_numpy(theirs)).numpy(), expected, equal_nan=True)


@pytest.mark.parametrize("fmt", sorted(CODECS))
def test_reads_arbitrary_bytes_as_gguf_does(fmt):
    qtype, _, dequantize = CODECS[fmt]
    data = torch.randint(0, 256, (4, ggml.row_bytes(128, fmt)), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    with np.errstate(all="ignore"):
        expected = quants.dequantize(data.numpy(), qtype)
    assert np.array_equal(dequantize(data).numpy(), expected, equal_nan=True)


def test_hand_worked_q8_0_block():
    x = torch.zeros(32)
    x[0], x[1], x[2], x[3] = 127.0, -63.5, 0.5, -0.49
    data = ggml.quantize_q8_0(x)
    assert data.tolist()[:2] == [0x00, 0x3C]  # float16 1.0 (amax 127 / 127), little-endian
    assert torch.tensor(data.tolist()[2:6], dtype=torch.uint8).view(torch.int8).tolist() == [127, -64, 1, 0]
    assert ggml.dequantize_q8_0(data)[:4].tolist() == [127.0, -64.0, 1.0, 0.0]


def test_hand_worked_q4_0_block():
    x = torch.zeros(32)
    x[0], x[1], x[16], x[17] = -8.0, 7.0, 3.0, -2.4  # d = -8 / -8 = 1
    data = ggml.quantize_q4_0(x)
    assert data.shape == (18,) and data.tolist()[:2] == [0x00, 0x3C]
    # code = trunc(x + 8.5): -8 -> 0, 7 -> 15, 3 -> 11, -2.4 -> 6, 0 -> 8; j low nibble, j+16 high
    assert data.tolist()[2:5] == [0 | (11 << 4), 15 | (6 << 4), 8 | (8 << 4)]
    assert ggml.dequantize_q4_0(data)[[0, 1, 16, 17]].tolist() == [-8.0, 7.0, 3.0, -2.0]


def test_sizes_and_errors():
    assert ggml.row_bytes(64, "q8_0") == 68 and ggml.row_bytes(64, "q4_0") == 36
    with pytest.raises(ValueError, match="multiple of 32"):
        ggml.quantize_q8_0(torch.zeros(48))
    with pytest.raises(ValueError, match="whole number"):
        ggml.dequantize_q4_0(torch.zeros(20, dtype=torch.uint8))
