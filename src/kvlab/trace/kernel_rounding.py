"""Replay the roundings of ggml's CPU flash-attention kernel, so a llama.cpp trace is checked tightly.

A float64 reference over the recorded q, k, v is not what ggml computes. Its CPU kernel
(`ggml_compute_forward_flash_attn_ext_f16`, ggml 0.25) takes one of three paths:
- tiled (K and V both F16 or both F32, at least 64 query rows): float32 throughout -> no replay;
- one row at a time (everything else): q is first converted to K's dot-product type (F16 for an
  F16 cache, Q8_0 for Q8_0 and Q4_0 caches: `quantize_row_q8_0`), and with an F16 V the weighted
  sum of V rows is accumulated in float16 (online softmax, the accumulator rounded after every
  position); a quantized V is dequantized and accumulated in float32;
- split over the KV positions (one query row, K and V both F16 or F32, at least 512 positions):
  each thread runs the row path over its ceil(n_kv / threads) positions and the partial results
  are merged in float32 with the log-sum-exp rule.

Without flash attention llama.cpp computes `kq = mul_mat(K, q)` and `kqv = mul_mat(V^T, softmax(kq))`:
ggml's matmul converts its second operand to the first's dot-product type, so q is rounded to
K's type and the softmax weights to V's type (F16 for an F16 cache) before each product.

Without the replay a correct F16 trace misses a 1e-4 check by about 0.025 at 1,300 positions and
a Q8_0 one by up to 0.14; with it the recomputation matches to about 1e-5 (float32 order of
operations), so the default tolerance can stay tight enough to catch a misplaced head.
"""

from __future__ import annotations

import math

import torch

from kvlab.attention.reference import reference_attention

TILE_Q = 64  # GGML_FA_TILE_Q: query rows from which the tiled float32 path is taken
SPLIT_KV_MIN = 512  # the split-KV path needs at least this many positions
DOT_TYPE = {"F32": "F32", "F16": "F16", "Q8_0": "Q8_0", "Q4_0": "Q8_0", "Q4_1": "Q8_1", "Q5_0": "Q8_0",
            "Q5_1": "Q8_1", "BF16": "BF16"}


def kernel_path(n_tokens: int, n_kv: int, k_type: str, v_type: str) -> str:
    """Which path ggml's CPU kernel takes: "tiled", "split" or "rows"."""
    plain = k_type == v_type and k_type in ("F16", "F32")
    if plain and n_tokens == 1 and n_kv >= SPLIT_KV_MIN:
        return "split"
    if plain and n_tokens >= TILE_Q:
        return "tiled"
    return "rows"


def round_q(q: torch.Tensor, k_type: str) -> torch.Tensor:
    """q as the kernel hands it to the K·q dot products (converted to K's dot-product type)."""
    dot = DOT_TYPE.get(k_type)
    if dot in (None, "F32"):
        return q.float()
    if dot == "F16":
        return q.float().half().float()
    if dot == "BF16":
        return q.float().bfloat16().float()
    if dot == "Q8_0":
        from kvlab.quant.ggml import dequantize_q8_0, quantize_q8_0

        flat = q.float().reshape(-1, q.shape[-1])
        return dequantize_q8_0(quantize_q8_0(flat)).reshape(q.shape).float()
    raise ValueError(f"no replay of the kernel's rounding for K type {k_type}")


def kernel_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                     scale: float | None, *, k_type: str, v_type: str, threads: int = 1,
                     flash: bool = True) -> torch.Tensor:
    """The attention output ggml's CPU kernel computes, roundings replayed (float64 `[b, h, t, dv]`).

    q `[b, h, t, d]`, k / v `[b, kv_heads, n_kv, d]` as recorded (dequantized), mask additive and
    broadcastable to `[b, h, t, n_kv]`; k_type / v_type the ggml types the cache is stored in.
    threads: the run's thread count (it sets the split path's chunks).
    flash: False for llama.cpp's graph without flash attention (two matmuls around a softmax).
    """
    b, h, t, d = q.shape
    n_kv = k.shape[2]
    scale = d ** -0.5 if scale is None else scale
    if not flash:
        return _matmul_softmax(q, k, v, mask, scale, k_type, v_type)
    path = kernel_path(t, n_kv, k_type, v_type)
    if path == "tiled":
        return reference_attention(q, k, v, mask, scale)
    q_r = round_q(q, k_type)
    if v_type != "F16":
        return reference_attention(q_r, k, v, mask, scale)
    group = h // k.shape[1]
    kk = k.float().repeat_interleave(group, dim=1)  # [b, h, n_kv, d]
    vv = v.float().repeat_interleave(group, dim=1)
    scores = torch.einsum("bhtd,bhnd->bhtn", q_r.double(), kk.double()).float() * float(scale)
    if mask is not None:
        scores = scores + mask.float().expand(b, h, t, n_kv)
    chunk = math.ceil(n_kv / max(threads, 1)) if path == "split" else n_kv
    parts = [_rows_f16(scores[..., s:s + chunk], vv[:, :, s:s + chunk]) for s in range(0, n_kv, chunk)]
    return _merge(parts).double()


def _matmul_softmax(q, k, v, mask, scale, k_type: str, v_type: str) -> torch.Tensor:
    """`softmax(K·q * scale + mask)` then `V^T p`, each matmul's second operand in its first's type."""
    group = q.shape[1] // k.shape[1]
    kk = k.double().repeat_interleave(group, dim=1)
    vv = v.double().repeat_interleave(group, dim=1)
    scores = torch.einsum("bhtd,bhnd->bhtn", round_q(q, k_type).double(), kk) * float(scale)
    if mask is not None:
        scores = scores + mask.double()
    weights = torch.softmax(scores.float(), dim=-1)
    if v_type in ("F16", "BF16"):
        weights = round_q(weights, v_type)
    return torch.einsum("bhtn,bhnd->bhtd", weights.double(), vv)


def _rows_f16(scores: torch.Tensor, v: torch.Tensor):
    """One row path over a run of positions: online softmax in float32, V summed in float16."""
    shape = scores.shape[:-1]
    m = torch.full(shape, -math.inf)
    s_sum = torch.zeros(shape)
    acc = torch.zeros(*shape, v.shape[-1], dtype=torch.float16)
    for ic in range(scores.shape[-1]):
        s = scores[..., ic]
        live = s != -math.inf
        new = live & (s > m)
        ms = torch.where(new, torch.exp(m - s), torch.ones_like(s))
        vs = torch.where(new, torch.ones_like(s), torch.exp(s - m))
        vs = torch.where(live, vs, torch.zeros_like(s))
        m = torch.where(new, s, m)
        acc = torch.where(new.unsqueeze(-1), (acc.float() * ms.unsqueeze(-1)).half(), acc)
        row = v[:, :, ic].unsqueeze(2)  # [b, h, 1, dv] broadcast over query rows
        acc = torch.where(live.unsqueeze(-1), (acc.float() + row * vs.unsqueeze(-1)).half(), acc)
        s_sum = torch.where(live, s_sum * ms + vs, s_sum)
    return m, s_sum, acc.float()


def _merge(parts):
    """Partial (max, sum, accumulator) triples merged in float32 (log-sum-exp rule), then divided."""
    m = torch.stack([p[0] for p in parts]).amax(dim=0)
    total = torch.zeros_like(m)
    acc = torch.zeros_like(parts[0][2])
    for pm, ps, pa in parts:
        w = torch.where(pm == -math.inf, torch.zeros_like(pm), torch.exp(pm - m))
        total = total + ps * w
        acc = acc + pa * w.unsqueeze(-1)
    inv = torch.where(total == 0, torch.zeros_like(total), 1.0 / total)
    return acc * inv.unsqueeze(-1)
