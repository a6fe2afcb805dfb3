"""llama.cpp cache rows -> K/V in transformers' layout `[batch, kv_heads, seq, head_dim]`.

Three things stand between a llama.cpp cache row and the tensor transformers holds:
- the row's ggml type: F32 / F16 rows are numbers, quantized rows (Q8_0, Q4_0, ...) are blocks
  that `gguf.quants` dequantizes exactly as ggml does;
- with a quantized cache this llama.cpp stores K and V Hadamard-rotated (an orthonormal,
  symmetric Walsh-Hadamard matrix of size 64 applied to each 64-channel chunk of a row), so
  the rotation is applied once more to undo it (H @ H = I);
- the GGUF conversion of LLaMA-family models interleaves the head-dim channels of the Q/K
  weights (HF channel i sits at 2i, channel i + D/2 at 2i + 1, so llama.cpp's RoPE can rotate
  neighbouring pairs): keys are de-interleaved; values are not touched by the conversion.
"""

from __future__ import annotations

import numpy as np
import torch

from kvlab.errors import KvlabError
from kvlab.trace.ggml import deinterleave_channels as deinterleave  # noqa: F401 - GGUF -> HF channel order
from kvlab.trace.ggml import interleave_channels as interleave  # noqa: F401 - HF -> GGUF channel order

GGML_TYPE_NAMES = {0: "f32", 1: "f16", 2: "q4_0", 3: "q4_1", 6: "q5_0", 7: "q5_1", 8: "q8_0", 30: "bf16"}
ROTATION_SIZE = 64


def type_name(ggml_type: int) -> str:
    return GGML_TYPE_NAMES.get(ggml_type, f"ggml type {ggml_type}")


def rows_to_float(rows: np.ndarray, ggml_type: int, n_elements: int) -> np.ndarray:
    """uint8 rows `[n, bytes]` of one ggml type -> float32 `[n, n_elements]`."""
    import gguf
    from gguf import quants

    rows = np.ascontiguousarray(rows)
    if ggml_type == 0:
        out = rows.view(np.float32)
    elif ggml_type == 1:
        out = rows.view(np.float16).astype(np.float32)
    else:
        try:
            qtype = gguf.GGMLQuantizationType(ggml_type)
        except ValueError:
            raise KvlabError(f"llama.cpp cache rows of {type_name(ggml_type)} cannot be read") from None
        out = quants.dequantize(rows, qtype).astype(np.float32, copy=False)
    if out.shape[-1] != n_elements:
        raise KvlabError(f"a llama.cpp {type_name(ggml_type)} cache row holds {out.shape[-1]} values, "
                         f"the model needs {n_elements}")
    return out


def hadamard(n: int = ROTATION_SIZE) -> np.ndarray:
    """llama.cpp's orthonormal Walsh-Hadamard matrix (Sylvester order, 1/sqrt(n) scaled)."""
    if n < 1 or n & (n - 1):
        raise ValueError(f"a Hadamard size must be a power of two, got {n}")
    h = np.array([[1.0]])
    while h.shape[0] < n:
        h = np.block([[h, h], [h, -h]])
    return h / np.sqrt(n)


def unrotate(x: np.ndarray, n: int = ROTATION_SIZE) -> np.ndarray:
    """Undo llama.cpp's Hadamard rotation of each n-channel chunk of the last dimension."""
    d = x.shape[-1]
    if d % n:
        raise KvlabError(f"rows of {d} channels cannot hold {n}-channel Hadamard chunks")
    chunks = x.reshape(*x.shape[:-1], d // n, n).astype(np.float64)
    return (chunks @ hadamard(n)).reshape(x.shape).astype(np.float32)


def to_heads(rows: np.ndarray, n_kv_heads: int, head_dim: int) -> torch.Tensor:
    """float rows `[seq, n_kv_heads * head_dim]` -> `[1, n_kv_heads, seq, head_dim]`."""
    seq = rows.shape[0]
    t = torch.from_numpy(np.ascontiguousarray(rows)).reshape(seq, n_kv_heads, head_dim)
    return t.permute(1, 0, 2).unsqueeze(0).contiguous()


def raw_heads(rows: np.ndarray, n_kv_heads: int) -> torch.Tensor:
    """Raw quantized rows `[seq, bytes]` -> uint8 `[1, n_kv_heads, seq, bytes / n_kv_heads]`.

    Each KV head's channels are whole blocks (head_dim is a multiple of 32), so a head's part
    of a row is a run of complete blocks.
    """
    seq, nbytes = rows.shape
    if nbytes % n_kv_heads:
        raise KvlabError(f"a cache row of {nbytes} bytes does not split into {n_kv_heads} heads")
    t = torch.from_numpy(np.ascontiguousarray(rows)).reshape(seq, n_kv_heads, nbytes // n_kv_heads)
    return t.permute(1, 0, 2).unsqueeze(0).contiguous()
