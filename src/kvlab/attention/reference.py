"""A float64 reference attention: the oracle every kernel and trace is compared with.

It is written for clarity, not speed: scores are materialised in float64, masks are applied
as they are given, and grouped KV heads are repeated explicitly. Whatever dtype the inputs
come in, they are widened to float64 first, so the only rounding left is float64's.
"""

from __future__ import annotations

import torch


def reference_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None = None,
    scale: float | None = None,
    *,
    causal: bool = False,
    q_offset: int | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """`softmax(q @ k^T * scale + mask) @ v` in float64.

    q: `[batch, heads, q_len, head_dim]`; k, v: `[batch, kv_heads, kv_len, head_dim]` with
    `heads % kv_heads == 0` (GQA/MQA: KV head j serves query heads `j*g .. (j+1)*g - 1`, g =
    heads // kv_heads, as transformers' `repeat_kv` does). v may have its own head_dim.
    mask: broadcastable to `[batch, heads, q_len, kv_len]`; boolean (True = attend) or additive
    (0 to attend, -inf or a large negative number to block).
    scale: defaults to `head_dim ** -0.5`.
    causal: also block keys after each query's position; query i sits at position
    `q_offset + i` (default `kv_len - q_len`: the queries are the last tokens of the cache).
    softcap: `softcap * tanh(scores / softcap)` before the mask (Gemma 2 style), when given.

    Returns float64 `[batch, heads, q_len, head_dim_v]`. A query row whose keys are all masked
    gets zeros rather than NaN (the convention flash-decoding uses for empty chunks).
    """
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q, k, v must be 4-D [batch, heads, seq, head_dim], got {q.dim()}, {k.dim()}, {v.dim()}")
    batch, heads, q_len, head_dim = q.shape
    kv_heads, kv_len = k.shape[1], k.shape[2]
    if k.shape[0] != batch or v.shape[0] != batch or v.shape[1] != kv_heads or v.shape[2] != kv_len:
        raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} do not match q {tuple(q.shape)}")
    if k.shape[3] != head_dim:
        raise ValueError(f"q head_dim {head_dim} != k head_dim {k.shape[3]}")
    if kv_heads == 0 or heads % kv_heads:
        raise ValueError(f"{heads} query heads cannot share {kv_heads} KV heads evenly")

    group = heads // kv_heads
    q64 = q.to(torch.float64)
    k64 = k.to(torch.float64).repeat_interleave(group, dim=1)
    v64 = v.to(torch.float64).repeat_interleave(group, dim=1)
    scale = head_dim ** -0.5 if scale is None else float(scale)

    scores = torch.matmul(q64, k64.transpose(-1, -2)) * scale
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    allowed = torch.ones(q_len, kv_len, dtype=torch.bool, device=q.device)
    if causal:
        offset = kv_len - q_len if q_offset is None else int(q_offset)
        positions = torch.arange(q_len, device=q.device)[:, None] + offset
        allowed = torch.arange(kv_len, device=q.device)[None, :] <= positions
    if mask is not None:
        if mask.dtype == torch.bool:
            allowed = allowed & mask
        else:
            scores = scores + mask.to(torch.float64)
    scores = scores.masked_fill(~allowed, float("-inf"))

    row_max = scores.amax(dim=-1, keepdim=True)
    empty = torch.isneginf(row_max)
    weights = torch.exp(scores - torch.where(empty, torch.zeros_like(row_max), row_max))
    total = weights.sum(dim=-1, keepdim=True)
    weights = torch.where(empty, torch.zeros_like(weights), weights / torch.where(empty, torch.ones_like(total), total))
    return torch.matmul(weights, v64)
