"""Regenerate the reader's fuzz corpus: one valid tiny trace and broken variants of it.

    PYTHONPATH=src python tests/trace/corpus/make_corpus.py

Each broken file is the valid one with one thing wrong; `EXPECTED` (in test_reader_fuzz.py) says
which one-line error each must give.
"""

from __future__ import annotations

import struct
from pathlib import Path

import torch

from kvlab.attention import reference_attention
from kvlab.trace import TraceWriter

HERE = Path(__file__).parent


def valid_trace(path: Path) -> bytes:
    """One layer, one step; q f32 (permuted), k q8_0, v f16, mask f16, out bf16 (permuted)."""
    import gguf

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, heads, n, 32, generator=g) for heads, n in ((2, 1), (1, 3), (1, 3)))
    qtype = gguf.GGMLQuantizationType.Q8_0
    k_stored = torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(k.numpy(), qtype), qtype))
    writer = TraceWriter(path)
    writer.add_meta("kvlab.blk.0.scale", 0.5)
    writer.add_tensor("blk.0.step.1.q", q, permute=(0, 2, 1, 3))
    writer.add_tensor("blk.0.step.1.k", k, store="q8_0")
    writer.add_tensor("blk.0.step.1.v", v.half())
    writer.add_tensor("blk.0.step.1.mask", torch.zeros(1, 1, 1, 3), store="f16")
    out = reference_attention(q, k_stored, v.half(), scale=0.5).to(torch.bfloat16)
    writer.add_tensor("blk.0.step.1.out", out, permute=(0, 2, 1, 3))
    writer.write()
    return path.read_bytes()


def main() -> None:
    data = valid_trace(HERE / "valid.gguf")
    header = 24
    broken = {
        "bad_magic.gguf": b"GGML" + data[4:],
        "bad_version.gguf": data[:4] + struct.pack("<I", 99) + data[8:],
        "truncated_header.gguf": data[:18],
        "truncated_metadata.gguf": data[: header + 40],
        "truncated_data.gguf": data[: len(data) - 40],
        "huge_tensor_count.gguf": data[:8] + struct.pack("<Q", 1 << 40) + data[16:],
        # a ggml type id no one defined, on the first tensor
        "bad_tensor_type.gguf": _retype_first_tensor(data, 99),
        # q's recorded permutation is not a permutation
        "bad_permute.gguf": _break_first_permutation(data),
    }
    for name, blob in broken.items():
        (HERE / name).write_bytes(blob)


def _break_first_permutation(data: bytes) -> bytes:
    axes = struct.pack("<4q", 0, 2, 1, 3)
    at = data.index(axes)
    return data[:at] + struct.pack("<4q", 0, 2, 2, 3) + data[at + len(axes):]


def _retype_first_tensor(data: bytes, ggml_type: int) -> bytes:
    # tensor info: name (u64 len + bytes), n_dims u32, dims u64 * n, type u32, offset u64
    name = b"blk.0.step.1.q"
    at = data.index(struct.pack("<Q", len(name)) + name) + 8 + len(name)
    n_dims = struct.unpack_from("<I", data, at)[0]
    at += 4 + 8 * n_dims
    return data[:at] + struct.pack("<I", ggml_type) + data[at + 4:]


if __name__ == "__main__":
    main()
