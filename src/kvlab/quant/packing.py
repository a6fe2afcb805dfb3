"""Sub-byte storage: several small unsigned codes per byte.

`bits` = 8 stores one code per byte, 4 two, 2 four. Codes are packed along the last dimension,
little-end first: code i goes to byte i // per_byte, at bit offset (i % per_byte) * bits. So
4-bit codes [1, 2] make the byte 0x21 and 2-bit codes [1, 2, 3, 0] the byte 0b00_11_10_01.
"""

from __future__ import annotations

import torch

PACKABLE_BITS = (2, 4, 8)


def per_byte(bits: int) -> int:
    if bits not in PACKABLE_BITS:
        raise ValueError(f"cannot pack {bits}-bit codes; allowed: {', '.join(map(str, PACKABLE_BITS))}")
    return 8 // bits


def packed_size(n_codes: int, bits: int) -> int:
    """Bytes holding `n_codes` codes of `bits` bits (the count must fill whole bytes)."""
    k = per_byte(bits)
    if n_codes % k:
        raise ValueError(f"{n_codes} codes of {bits} bits do not fill whole bytes")
    return n_codes // k


def _shifts(bits: int, device: torch.device) -> torch.Tensor:
    return torch.arange(0, 8, bits, dtype=torch.uint8, device=device)


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes `[..., n]`, each below 2**bits -> uint8 `[..., n * bits / 8]`."""
    k = per_byte(bits)
    if codes.dtype != torch.uint8:
        raise ValueError(f"codes must be uint8, got {codes.dtype}")
    if k == 1:
        return codes.contiguous()
    packed_size(codes.shape[-1], bits)
    groups = codes.reshape(*codes.shape[:-1], codes.shape[-1] // k, k)
    shifted = groups << _shifts(bits, codes.device)
    out = shifted[..., 0]
    for i in range(1, k):
        out = out | shifted[..., i]
    return out


def unpack(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 `[..., m]` -> the uint8 codes `[..., m * 8 / bits]` that `pack` stored."""
    k = per_byte(bits)
    if k == 1:
        return packed
    mask = (1 << bits) - 1
    # one small op per code position beats a broadcast shift over a [..., m, k] tensor on CPU
    fields = [packed & mask] + [(packed >> (i * bits)) & mask for i in range(1, k - 1)] + [packed >> (8 - bits)]
    return torch.stack(fields, dim=-1).reshape(*packed.shape[:-1], packed.shape[-1] * k)
