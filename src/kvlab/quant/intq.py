"""Asymmetric grouped integer quantization at 2, 4 and 8 bits (min-max, as KIVI).

Values are cut into groups of `group` consecutive entries along one axis; each group keeps a
float16 `zero` (its minimum) and `scale` ((max - min) / (2**bits - 1)) and stores
`code = round((x - zero) / scale)` in `bits` bits, packed along the last dimension
(`kvlab.quant.packing`). Dequantization is `code * scale + zero`.

The float16 zero is rounded down and the scale up, so every value of a group lands inside the
code range and the error of any value is at most half a step (`scale / 2`, plus float32
rounding): rounding them to nearest instead can push the group's ends outside the range, where
clamping costs far more than half a step. Values must lie within float16 range.

KIVI's choice of axes for a `[batch, kv_heads, tokens, head_dim]` block: keys per channel
(groups along tokens, `axis=-2`), values per token (groups along channels, `axis=-1`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvlab.quant import packing

SCALE_DTYPE = torch.float16


@dataclass(frozen=True)
class GroupedInt:
    """One quantized tensor: packed codes plus a scale and zero per group."""

    payload: torch.Tensor  # uint8, the codes in the original layout, packed along the last dim
    scale: torch.Tensor  # float16, the original shape with the group axis divided by `group`
    zero: torch.Tensor  # float16, same shape as `scale`
    bits: int
    group: int
    axis: int  # negative: counted from the end, so leading (batch, block) dims may vary

    @property
    def nbytes(self) -> int:
        """Exact storage: payload + scales + zeros."""
        return tensor_bytes(self.payload) + tensor_bytes(self.scale) + tensor_bytes(self.zero)


def tensor_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _grouped(x: torch.Tensor, group: int, axis: int) -> torch.Tensor:
    """View `x` with `axis` split into (n_groups, group); the group members sit at `axis`."""
    size = x.shape[axis]
    if group < 1 or size % group:
        raise ValueError(f"an axis of {size} cannot be cut into groups of {group}")
    dim = axis % x.dim()
    return x.reshape(*x.shape[:dim], size // group, group, *x.shape[dim + 1:])


def _toward(t: torch.Tensor, direction: float) -> torch.Tensor:
    return torch.nextafter(t, torch.full_like(t, direction))


def quantize(x: torch.Tensor, bits: int, group: int, axis: int = -1) -> GroupedInt:
    """Quantize `x` in groups of `group` along `axis` (a negative index) to `bits`-bit codes."""
    if axis >= 0:
        raise ValueError("axis must be negative (counted from the last dimension)")
    levels = (1 << bits) - 1
    packing.per_byte(bits)
    grouped = _grouped(x.to(torch.float32), group, axis)
    member = (axis % x.dim()) + 1  # where the group members sit in `grouped`
    low = grouped.amin(dim=member, keepdim=True)
    high = grouped.amax(dim=member, keepdim=True)
    zero = low.to(SCALE_DTYPE)
    zero = torch.where(zero.to(torch.float32) > low, _toward(zero, -float("inf")), zero)
    exact = (high - zero.to(torch.float32)) / levels
    scale = exact.to(SCALE_DTYPE)
    scale = torch.where(scale.to(torch.float32) < exact, _toward(scale, float("inf")), scale)
    s = scale.to(torch.float32)
    steps = (grouped - zero.to(torch.float32)) / torch.where(s > 0, s, torch.ones_like(s))
    codes = torch.round(steps).clamp(0, levels).to(torch.uint8).reshape(x.shape)
    return GroupedInt(
        payload=packing.pack(codes, bits),
        scale=scale.squeeze(member),
        zero=zero.squeeze(member),
        bits=bits,
        group=group,
        axis=axis,
    )


def dequantize(q: GroupedInt, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """`code * scale + zero`, computed in float32, returned in `dtype`."""
    codes = packing.unpack(q.payload, q.bits)
    member = (q.axis % codes.dim()) + 1
    grouped = _grouped(codes, q.group, q.axis).to(torch.float32)
    scale = q.scale.unsqueeze(member).to(torch.float32)
    zero = q.zero.unsqueeze(member).to(torch.float32)
    return torch.addcmul(zero, grouped, scale).reshape(codes.shape).to(dtype)
