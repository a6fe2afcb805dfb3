"""Token blocks of a KV cache in a quantized scheme: the storage unit of the mixed cache.

A block is `tokens` consecutive positions of one (batch row, KV head): a `[tokens, head_dim]`
slab. Codecs take many blocks at once, `[batch, kv_heads, n_blocks, tokens, head_dim]`, and
return named tensors whose first three dimensions are `[batch, kv_heads, n_blocks]`, so blocks
can be appended and sliced along dim 2 without touching their bytes:

- `kivi` (2, 4, 8 bits): `q` packed codes `[.., tokens, head_dim * bits / 8]`, float16 `scale`
  and `zero`. Keys per channel (one group = the block's `tokens` values of a channel: `[.., 1,
  head_dim]`), values per token (groups of `min(group, head_dim)` channels: `[.., tokens,
  head_dim / group]`).
- `q8_0` / `q4_0`: `q` = the block's `tokens * head_dim` values, row-major (token by token),
  as ggml blocks of 32 (`[.., tokens * head_dim / 32 * 34 | 18]` bytes, the scale inside).
  With head_dim a multiple of 32 each ggml block lies within one token, as in llama.cpp.
- `fp8` (e4m3fn): `q` float8 `[.., tokens, head_dim]`, float32 `scale` `[.., 1, 1]` =
  amax / 448 per block and KV head; values are clamped before the cast.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch

from kvlab.quant import fp8, ggml, intq

Role = Literal["keys", "values"]
SCHEMES = ("kivi", "q8_0", "q4_0", "fp8")
FP8_FORMAT = "e4m3fn"


class BlockCodec(ABC):
    """Quantizes and dequantizes whole blocks of one role (keys or values)."""

    scheme: ClassVar[str]

    def __init__(self, tokens: int, head_dim: int) -> None:
        self.tokens, self.head_dim = tokens, head_dim

    @abstractmethod
    def encode(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """`[b, h, n, tokens, head_dim]` floats -> named tensors, each `[b, h, n, ...]`."""

    @abstractmethod
    def decode(self, parts: dict[str, torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
        """Named tensors of n blocks -> `[b, h, n, tokens, head_dim]` in `dtype`."""

    def _check(self, x: torch.Tensor) -> None:
        if x.dim() != 5 or tuple(x.shape[-2:]) != (self.tokens, self.head_dim):
            raise ValueError(f"{self.scheme} blocks are [b, h, n, {self.tokens}, {self.head_dim}], got {tuple(x.shape)}")


class KiviCodec(BlockCodec):
    scheme = "kivi"

    def __init__(self, tokens: int, head_dim: int, role: Role, bits: int, group: int) -> None:
        super().__init__(tokens, head_dim)
        self.bits = bits
        if role == "keys":  # per channel: each channel's block of tokens is one group
            self.group, self.axis = tokens, -2
        else:  # per token: groups of channels
            self.group, self.axis = min(group, head_dim), -1
            if head_dim % self.group:
                raise ValueError(f"head_dim {head_dim} is not a multiple of the value group {self.group}")
        intq.quantize(torch.zeros(1, 1, 1, tokens, head_dim), bits, self.group, self.axis)  # shape check

    def encode(self, x):
        self._check(x)
        q = intq.quantize(x, self.bits, self.group, self.axis)
        return {"q": q.payload, "scale": q.scale, "zero": q.zero}

    def decode(self, parts, dtype):
        q = intq.GroupedInt(parts["q"], parts["scale"], parts["zero"], self.bits, self.group, self.axis)
        return intq.dequantize(q, dtype)


class GgmlCodec(BlockCodec):
    def __init__(self, tokens: int, head_dim: int, scheme: str) -> None:
        super().__init__(tokens, head_dim)
        self.scheme = scheme  # type: ignore[misc]
        ggml.row_bytes(tokens * head_dim, scheme)  # raises unless a whole number of ggml blocks
        self._quantize = ggml.quantize_q8_0 if scheme == "q8_0" else ggml.quantize_q4_0
        self._dequantize = ggml.dequantize_q8_0 if scheme == "q8_0" else ggml.dequantize_q4_0

    def encode(self, x):
        self._check(x)
        return {"q": self._quantize(x.reshape(*x.shape[:3], -1))}

    def decode(self, parts, dtype):
        q = parts["q"]
        return self._dequantize(q).reshape(*q.shape[:3], self.tokens, self.head_dim).to(dtype)


class Fp8Codec(BlockCodec):
    scheme = "fp8"

    def encode(self, x):
        self._check(x)
        x = x.to(torch.float32)
        scale = fp8.scale_from_amax(x.abs().amax(dim=(-2, -1), keepdim=True), FP8_FORMAT)
        limit = fp8.fp8_max(FP8_FORMAT)
        q = (x / scale).clamp(-limit, limit).to(fp8.fp8_dtype(FP8_FORMAT))
        return {"q": q, "scale": scale}

    def decode(self, parts, dtype):
        return (_fp8_to_float(parts["q"]) * parts["scale"]).to(dtype)


def fp8_table(dtype: torch.dtype, device: torch.device | str = "cpu") -> torch.Tensor:
    """float32 `[256]`: the value of each byte read as `dtype` (an fp8 format)."""
    table = _FP8_TABLES.get(dtype)
    if table is None or table.device != torch.device(device):
        table = torch.arange(256, dtype=torch.uint8, device=device).view(dtype).to(torch.float32)
        _FP8_TABLES[dtype] = table
    return table


def _fp8_to_float(q: torch.Tensor) -> torch.Tensor:
    """The same values as `q.float()`, through a 256-entry table: several times faster on CPU."""
    table = fp8_table(q.dtype, q.device)
    codes = q.contiguous().view(torch.uint8).reshape(-1).to(torch.int32)
    return table.index_select(0, codes).reshape(q.shape)


_FP8_TABLES: dict[torch.dtype, torch.Tensor] = {}


@dataclass(frozen=True)
class SchemeSpec:
    """A scheme with its parameters; `codec(role, head_dim)` builds the codec for one role."""

    scheme: str = "kivi"
    bits: int = 4
    tokens: int = 32  # tokens per block
    group: int = 32  # kivi value group (channels)

    def codec(self, role: Role, head_dim: int) -> BlockCodec:
        if self.scheme == "kivi":
            return KiviCodec(self.tokens, head_dim, role, self.bits, self.group)
        if self.scheme in ("q8_0", "q4_0"):
            return GgmlCodec(self.tokens, head_dim, self.scheme)
        if self.scheme == "fp8":
            return Fp8Codec(self.tokens, head_dim)
        raise ValueError(f"unknown scheme {self.scheme!r}; allowed: {', '.join(SCHEMES)}")


def parts_bytes(parts: dict[str, torch.Tensor]) -> int:
    return sum(intq.tensor_bytes(t) for t in parts.values())
