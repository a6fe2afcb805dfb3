"""GGML Q8_0 and Q4_0 blocks in torch, byte for byte what the `gguf` package writes and reads.

A row whose length is a multiple of 32 is cut into blocks of 32 consecutive values:
- Q8_0, 34 bytes: float16 `d = amax / 127`, then 32 int8 `round(x / d)` (half away from zero).
- Q4_0, 18 bytes: float16 `d = m / -8` where `m` is the signed value of largest magnitude (the
  first one on a tie), then 16 bytes of `trunc(x / d + 8.5)` clamped to 0..15: value j in the
  low nibble of byte j, value j + 16 in the high nibble.
Both store `1 / d` as 0 for an all-zero block, so it reads back as zeros. The arithmetic below
repeats the reference's float32 operations in the same order, which is what makes the bytes equal.
"""

from __future__ import annotations

import torch

BLOCK = 32
Q8_0_BYTES = 34
Q4_0_BYTES = 18
BLOCK_BYTES = {"q8_0": Q8_0_BYTES, "q4_0": Q4_0_BYTES}


def _blocks(x: torch.Tensor) -> torch.Tensor:
    if x.shape[-1] % BLOCK:
        raise ValueError(f"a ggml row must be a multiple of {BLOCK} values long, got {x.shape[-1]}")
    return x.to(torch.float32).reshape(*x.shape[:-1], x.shape[-1] // BLOCK, BLOCK)


def _inverse(d: torch.Tensor) -> torch.Tensor:
    return torch.where(d == 0, torch.zeros_like(d), 1.0 / d)


def _round_half_away(x: torch.Tensor) -> torch.Tensor:
    """ggml's roundf as the reference writes it: floor(a) + floor(2 (a - floor(a))), signed."""
    a = x.abs()
    floored = torch.floor(a)
    return torch.sign(x) * (floored + torch.floor(2 * (a - floored)))


def _pack_scale(d: torch.Tensor, payload: torch.Tensor) -> torch.Tensor:
    """One block = float16 `d` (2 bytes, little-endian) followed by its payload bytes."""
    d_bytes = d.to(torch.float16).contiguous().view(torch.uint8)
    out = torch.cat([d_bytes, payload], dim=-1)
    return out.reshape(*out.shape[:-2], -1)


def _split_scale(data: torch.Tensor, block_bytes: int) -> tuple[torch.Tensor, torch.Tensor]:
    if data.dtype != torch.uint8:
        raise ValueError(f"ggml block data must be uint8, got {data.dtype}")
    if data.shape[-1] % block_bytes:
        raise ValueError(f"a row of {data.shape[-1]} bytes is not a whole number of {block_bytes}-byte blocks")
    blocks = data.reshape(*data.shape[:-1], data.shape[-1] // block_bytes, block_bytes)
    d = blocks[..., :2].contiguous().view(torch.float16).to(torch.float32)
    return d, blocks[..., 2:]


def quantize_q8_0(x: torch.Tensor) -> torch.Tensor:
    """`[..., n]` floats (n a multiple of 32) -> `[..., n / 32 * 34]` uint8 Q8_0 bytes."""
    blocks = _blocks(x)
    d = blocks.abs().amax(dim=-1, keepdim=True) / 127
    q = _round_half_away(blocks * _inverse(d))
    return _pack_scale(d, q.to(torch.int8).view(torch.uint8))


def dequantize_q8_0(data: torch.Tensor) -> torch.Tensor:
    """Q8_0 bytes `[..., m * 34]` -> float32 `[..., m * 32]`."""
    d, q = _split_scale(data, Q8_0_BYTES)
    out = q.contiguous().view(torch.int8).to(torch.float32) * d
    return out.reshape(*out.shape[:-2], -1)


def quantize_q4_0(x: torch.Tensor) -> torch.Tensor:
    """`[..., n]` floats (n a multiple of 32) -> `[..., n / 32 * 18]` uint8 Q4_0 bytes."""
    blocks = _blocks(x)
    where = blocks.abs().argmax(dim=-1, keepdim=True)  # first of equal magnitudes, as numpy
    d = torch.gather(blocks, -1, where) / -8
    q = torch.trunc(blocks * _inverse(d) + 8.5).clamp(0, 15).to(torch.uint8)
    low, high = q[..., : BLOCK // 2], q[..., BLOCK // 2 :]
    return _pack_scale(d, low | (high << 4))


def dequantize_q4_0(data: torch.Tensor) -> torch.Tensor:
    """Q4_0 bytes `[..., m * 18]` -> float32 `[..., m * 32]`."""
    d, packed = _split_scale(data, Q4_0_BYTES)
    q = torch.cat([packed & 0x0F, packed >> 4], dim=-1).to(torch.float32) - 8
    out = q * d
    return out.reshape(*out.shape[:-2], -1)


def row_bytes(n_values: int, fmt: str) -> int:
    """Bytes of a row of `n_values` values in `fmt` ("q8_0" or "q4_0")."""
    if n_values % BLOCK:
        raise ValueError(f"a ggml row must be a multiple of {BLOCK} values long, got {n_values}")
    return n_values // BLOCK * BLOCK_BYTES[fmt]
