"""Build traces the way llama.cpp lays its attention tensors out, with gguf.GGUFWriter directly.

- q: `q_cur`, ne [head_dim, n_head, n_tokens] (the graph uses ggml_permute(q_cur, 0, 2, 1, 3))
- k, v: the cache, ne [n_embd_k_gqa, n_kv] = [n_head_kv * head_dim, n_kv], one row per token
- mask: F16, ne [n_kv, n_tokens padded], -inf where blocked (and in the padding rows)
- out: ggml_flash_attn_ext's result, ne [head_dim, n_head, n_tokens]
With `views`, q, k and v are written the way a dumper that ignores strides writes a permuted
view: the view's ne (q [head_dim, n_tokens, n_head], k [head_dim, n_kv, n_head_kv]) beside
the source's bytes.
"""

from __future__ import annotations

import gguf
import numpy as np
import torch

from kvlab.attention import reference_attention
from kvlab.trace import ggml

MASK_PAD = 4


def attention_case(h=4, kv=2, t=3, s=11, d=32, seed=0):
    """Random q, k, v (torch layout, batch 1), a causal mask, and the float64 reference output."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, h, t, d, generator=g)
    k = torch.randn(1, kv, s, d, generator=g)
    v = torch.randn(1, kv, s, d, generator=g)
    allowed = torch.arange(s)[None, :] <= torch.arange(t)[:, None] + (s - t)
    mask = torch.zeros(1, 1, t, s).masked_fill(~allowed, float("-inf"))
    out = reference_attention(q, k, v, mask).to(torch.float32)
    return q, k, v, mask, out


def encode(array: np.ndarray, kind: str):
    """(numpy array for GGUFWriter.add_tensor, raw_dtype) storing float32 `array` as `kind`."""
    qtype = gguf.GGMLQuantizationType[kind.upper()]
    if kind == "f32":
        return array.astype(np.float32), None
    if kind == "f16":
        return array.astype(np.float16), None
    return gguf.quants.quantize(array.astype(np.float32), qtype), qtype


def stored(array: np.ndarray, kind: str) -> np.ndarray:
    """What a reader gets back from `array` stored as `kind` (exact rounding / dequantization)."""
    data, qtype = encode(array, kind)
    return data.astype(np.float32) if qtype is None else gguf.quants.dequantize(data, qtype)


def llama_cpp_arrays(q, k, v, mask, out) -> dict[str, np.ndarray]:
    """numpy arrays in llama.cpp's memory order (numpy shape = reversed ne)."""
    _, h, t, d = q.shape
    kv, s = k.shape[1], k.shape[2]
    padded = np.full((t + MASK_PAD, s), -np.inf, dtype=np.float32)
    padded[:t] = mask[0, 0].numpy()
    return {
        "q": q[0].transpose(0, 1).contiguous().numpy(),  # [t, h, d]  = ne [d, h, t]
        "k": k[0].transpose(0, 1).reshape(s, kv * d).contiguous().numpy(),  # ne [kv*d, s]
        "v": v[0].transpose(0, 1).reshape(s, kv * d).contiguous().numpy(),
        "mask": padded,  # ne [s, t + pad]
        "out": out[0].transpose(0, 1).contiguous().numpy(),  # ne [d, h, t]
    }


def write_llama_cpp_trace(path, q, k, v, mask, out, *, kinds=None, layer=0, step=1, views=False,
                          interleave=False) -> dict[str, np.ndarray]:
    """Write one layer/step as llama.cpp holds it; returns the float arrays as stored."""
    kinds = {"q": "f32", "k": "f16", "v": "f16", "mask": "f16", "out": "f32", **(kinds or {})}
    if interleave:
        q, k = ggml.interleave_channels(q), ggml.interleave_channels(k)
    arrays = llama_cpp_arrays(q, k, v, mask, out)
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_uint32("llama.attention.head_count", q.shape[1])
    kept = {}
    for role, array in arrays.items():
        data, qtype = encode(array, kinds[role])
        kept[role] = stored(array, kinds[role])
        if views and role in ("q", "k", "v") and qtype is None:
            # the permuted view's shape over the source's bytes (numpy shape = reversed view ne)
            _, h, t, d = q.shape
            view_shape = (h, t, d) if role == "q" else (k.shape[1], k.shape[2], q.shape[3])
            data = data.reshape(view_shape)
        writer.add_tensor(f"blk.{layer}.step.{step}.{role}", data, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return kept
