"""FP8 number formats for KV caches: e4m3fn, e5m2, e4m3fnuz.

Convention everywhere (vLLM, compressed-tensors, ModelOpt): dequantize `x = q * scale`, with
`scale = amax / fp8_max`. Values are clamped to the format's range before the cast: casting a
value beyond it gives NaN (e4m3fn has no infinity), which would poison attention.
"""

from __future__ import annotations

import torch

FORMATS: dict[str, torch.dtype] = {
    "e4m3fn": torch.float8_e4m3fn,
    "e5m2": torch.float8_e5m2,
    "e4m3fnuz": torch.float8_e4m3fnuz,
}
FP8_MAX: dict[str, float] = {"e4m3fn": 448.0, "e5m2": 57344.0, "e4m3fnuz": 240.0}


def fp8_dtype(fmt: str) -> torch.dtype:
    try:
        return FORMATS[fmt]
    except KeyError:
        raise ValueError(f"unknown fp8 format {fmt!r}; allowed: {', '.join(FORMATS)}") from None


def fp8_max(fmt: str) -> float:
    fp8_dtype(fmt)
    return FP8_MAX[fmt]


def scale_from_amax(amax: torch.Tensor | float, fmt: str) -> torch.Tensor:
    """`amax / fp8_max`; an all-zero tensor (amax 0) gets scale 1 so nothing divides by zero."""
    amax = torch.as_tensor(amax, dtype=torch.float32)
    return torch.where(amax > 0, amax / fp8_max(fmt), torch.ones_like(amax))


def broadcast_scale(scale: torch.Tensor | float, x: torch.Tensor) -> torch.Tensor:
    """A per-tensor scale (scalar or `(1,)`) or a per-KV-head one (`(kv,)` or `(kv, 1, 1)`)
    shaped to broadcast against a `[batch, kv_heads, seq, head_dim]` tensor."""
    scale = torch.as_tensor(scale, dtype=torch.float32, device=x.device)
    if scale.numel() == 1:
        return scale.reshape(())
    heads = scale.numel()
    if x.dim() != 4 or x.shape[1] != heads:
        raise ValueError(f"{heads} per-head scales do not fit a tensor of shape {tuple(x.shape)}")
    return scale.reshape(1, heads, 1, 1)


def quantize(x: torch.Tensor, scale: torch.Tensor | float, fmt: str = "e4m3fn") -> torch.Tensor:
    """`clamp(x / scale, ±max)` cast to the fp8 dtype (round to nearest even)."""
    limit = fp8_max(fmt)
    scaled = x.to(torch.float32) / broadcast_scale(scale, x)
    return scaled.clamp(-limit, limit).to(fp8_dtype(fmt))


def dequantize(q: torch.Tensor, scale: torch.Tensor | float, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """`q * scale` in `dtype`."""
    return (q.to(torch.float32) * broadcast_scale(scale, q)).to(dtype)


def amax(x: torch.Tensor, per_head: bool = False) -> torch.Tensor:
    """Largest magnitude of a `[batch, kv_heads, seq, head_dim]` tensor, overall or per KV head."""
    a = x.detach().abs().to(torch.float32)
    if per_head:
        return a.amax(dim=(0, 2, 3))
    return a.amax()
