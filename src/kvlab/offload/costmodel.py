"""Cost model for offloaded decoding: which split to use, and how long a step should take.

Notation, per layer: b batch rows, p bytes per value, h hidden size, h_kv = kv_heads x head_dim,
s cached positions, l positions recomputed (KVPR), g positions resident (FlexGen),
v_gpu the device's GEMM rate (FLOP/s), v_com the link rate from where the cache lives
(host memory or disk) to the device (bytes/s).

KVPR balance. For l recomputed positions a layer moves their activations X (b l h p bytes)
and the K/V of the others (2 b (s - l) h_kv p bytes), and recomputes K = X W_K, V = X W_V
(2 GEMMs of 2 b l h h_kv FLOPs each):

    t_X(l) = b l h p / v_com,   t_rec(l) = 4 b l h h_kv / v_gpu,   t_KV(l) = 2 b (s - l) h_kv p / v_com

X must land before recomputing, while the K/V transfer runs beside the recompute, so a layer
waits t(l) = t_X(l) + max(t_rec(l), t_KV(l)). Below the balance point the max is t_KV and
t(l) = (2 s h_kv + l (h - 2 h_kv)) b p / v_com, which falls with l only if h < 2 h_kv; above it
t(l) = t_X(l) + t_rec(l) rises with l. So the best l is where t_rec = t_KV:

    4 l h h_kv / v_gpu = 2 (s - l) h_kv p / v_com   =>   l* / s = p v_gpu / (2 h v_com + p v_gpu)

(h_kv cancels; with MHA, h_kv = h, this is REFERENCE.md's formula). When h >= 2 h_kv (grouped
KV heads, group size >= 2, e.g. SmolLM2's 9/3) an activation row is at least as large as the
K/V row it replaces: moving X saves nothing and l* = 0. On a device whose copies do not run
beside compute (CPU: device == host, one stream of work) nothing overlaps, t(l) = t_X + t_rec +
t_KV is linear in l, and l* is 0 or s, whichever is cheaper.

FlexGen split. With g of s positions resident, the device holds the weights W, a reserve R,
the resident K/V g L k (k = 2 b h_kv p per position and layer), two landing buffers of one
layer's far part 2 (s - g) k, and one layer's assembled K/V s k while attention runs:

    W + R + g L k + 2 (s - g) k + s k <= budget   =>   g = (budget - W - R - 3 s k) / ((L - 2) k)

and g = s when everything fits resident (W + R + (L + 1) s k <= budget).

Step time (`predict_step`). A layer's compute c = max(FLOPs / v_gpu, bytes read / v_mem) with
the weights and the K/V it reads, plus the copy that assembles its K/V for attention (read and
write of one layer's K/V at v_mem); with overlap (CUDA streams) a layer costs
baseline c; offload max(c + t_d2h(all K/V of the layer), t_h2d(same)); FlexGen max(c, t_far);
KVPR max(c + t_rec, t_X + max(t_rec, t_KV)); without overlap, the sum of the parts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from kvlab.errors import KvlabError
from kvlab.model_facts import decoder_layers, model_shape

GIB = 2**30
RESERVE_SHARE = 0.1  # of the budget, for activations and the allocator, unless reserve_gb is given


@dataclass(frozen=True)
class ModelShape:
    """What the cost model needs to know about a model and a batch."""

    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    bytes_per_value: int
    batch: int = 1
    layer_params: int = 0  # weights of one decoder layer (0: from the usual Llama-MLP formula)
    intermediate: int = 0
    vocab: int = 0

    @classmethod
    def from_model(cls, model, batch: int = 1) -> "ModelShape":
        shape = model_shape(model.config)
        text = model.config.get_text_config(decoder=True)
        layers = decoder_layers(model)
        params = sum(p.numel() for p in layers[0].parameters()) if layers else 0
        return cls(layers=shape["n_layers"], hidden=shape["hidden_size"], heads=shape["n_heads"],
                   kv_heads=shape["n_kv_heads"], head_dim=shape["head_dim"],
                   bytes_per_value=torch.empty((), dtype=model.dtype).element_size(), batch=batch,
                   layer_params=params, intermediate=getattr(text, "intermediate_size", 0) or 0,
                   vocab=shape["vocab_size"])

    @property
    def kv_width(self) -> int:
        """h_kv: K (or V) values per position per batch row in one layer."""
        return self.kv_heads * self.head_dim

    @property
    def kv_row_bytes(self) -> int:
        """K and V of one position in one layer, all batch rows: 2 b h_kv p."""
        return 2 * self.batch * self.kv_width * self.bytes_per_value

    @property
    def act_row_bytes(self) -> int:
        """The activation of one position in one layer, all batch rows: b h p."""
        return self.batch * self.hidden * self.bytes_per_value

    @property
    def params_per_layer(self) -> int:
        if self.layer_params:
            return self.layer_params
        attention = 2 * self.hidden * self.heads * self.head_dim + 2 * self.hidden * self.kv_width
        return attention + 3 * self.hidden * (self.intermediate or 4 * self.hidden)


@dataclass(frozen=True)
class Hardware:
    """Measured rates (from `kvlab hw`) for one device, dtype and tier."""

    gemm_flops_per_s: float
    link_bytes_per_s: float  # host (or disk) -> device
    d2h_bytes_per_s: float
    mem_bytes_per_s: float
    overlap: bool  # copies run beside compute (CUDA side streams)

    @classmethod
    def from_metrics(cls, metrics: dict[str, Any], *, dtype: torch.dtype | str, tier: str = "host") -> "Hardware":
        """Pick the figures a run on this device with this dtype and tier depends on."""
        name = str(dtype).removeprefix("torch.")
        gemm = metrics.get("gemm_flops_per_s") or {}
        rate = gemm.get(name) or gemm.get("float32")
        if not rate:
            raise KvlabError(f"hw_metrics has no GEMM rate for {name}; run `kvlab hw` again")
        h2d = metrics.get("h2d_pinned_bytes_per_s") or metrics.get("h2d_pageable_bytes_per_s")
        if not h2d:
            raise KvlabError("hw_metrics has no host-to-device rate; run `kvlab hw` again")
        link = h2d
        if tier == "disk":
            disk = metrics.get("disk_read_bytes_per_s")
            if not disk:
                raise KvlabError("hw_metrics has no disk read rate; run `kvlab hw` again")
            link = min(disk, h2d) if metrics.get("device", "cpu") != "cpu" else disk
        return cls(gemm_flops_per_s=float(rate), link_bytes_per_s=float(link),
                   d2h_bytes_per_s=float(metrics.get("d2h_bytes_per_s") or h2d),
                   mem_bytes_per_s=float(metrics.get("device_copy_bytes_per_s") or h2d),
                   overlap=str(metrics.get("device", "cpu")).startswith("cuda"))


# ---- KVPR -------------------------------------------------------------------------------
@dataclass(frozen=True)
class KVPRSplit:
    recompute_len: int
    ratio: float
    reason: str


def kvpr_balance_ratio(bytes_per_value: float, hidden: float, gemm_flops_per_s: float,
                       link_bytes_per_s: float) -> float:
    """l*/s = p v_gpu / (2 h v_com + p v_gpu): recompute time equals K/V transfer time."""
    pv = bytes_per_value * gemm_flops_per_s
    return pv / (2 * hidden * link_bytes_per_s + pv)


def kvpr_layer_seconds(recompute_len: int, seq_len: int, shape: ModelShape, hw: Hardware) -> dict[str, float]:
    """t_X, t_rec and t_KV of one layer, and the time the layer waits for its K/V."""
    l, s = recompute_len, seq_len
    t_x = l * shape.act_row_bytes / hw.link_bytes_per_s
    t_rec = 4 * shape.batch * l * shape.hidden * shape.kv_width / hw.gemm_flops_per_s
    t_kv = (s - l) * shape.kv_row_bytes / hw.link_bytes_per_s
    wait = t_x + max(t_rec, t_kv) if hw.overlap else t_x + t_rec + t_kv
    return {"t_x": t_x, "t_rec": t_rec, "t_kv": t_kv, "wait": wait}


def kvpr_split(seq_len: int, shape: ModelShape, hw: Hardware) -> KVPRSplit:
    """The recompute length for a prompt of `seq_len` positions, and why."""
    act, kv = shape.hidden, 2 * shape.kv_width
    if act >= kv:
        relation = "larger than" if act > kv else "as large as"
        return KVPRSplit(0, 0.0, f"an activation row ({act} values) is {relation} the K/V row it replaces "
                                 f"({kv} values: {shape.kv_heads} KV heads x {shape.head_dim} x 2): "
                                 "recomputing cannot save transfer, l = 0")
    if not hw.overlap:
        none = kvpr_layer_seconds(0, seq_len, shape, hw)["wait"]
        every = kvpr_layer_seconds(seq_len, seq_len, shape, hw)["wait"]
        if every < none:
            return KVPRSplit(seq_len, 1.0, "copies and compute do not overlap on this device; recomputing "
                                           "every position is cheaper than moving its K/V")
        return KVPRSplit(0, 0.0, "copies and compute do not overlap on this device (no side streams): "
                                 "moving X and recomputing costs more than moving K/V, l = 0")
    ratio = kvpr_balance_ratio(shape.bytes_per_value, shape.hidden, hw.gemm_flops_per_s, hw.link_bytes_per_s)
    length = math.floor(ratio * seq_len)
    return KVPRSplit(length, ratio, f"balance of recompute and K/V transfer: l/s = p v_gpu / "
                                    f"(2 h v_com + p v_gpu) = {ratio:.3f}")


# ---- FlexGen ----------------------------------------------------------------------------
@dataclass(frozen=True)
class FlexGenSplit:
    gpu_len: int
    ratio: float
    fits: bool
    device_bytes: int
    reason: str


def flexgen_device_bytes(gpu_len: int, total_len: int, shape: ModelShape, weights: int, reserve: int) -> int:
    """Device bytes with `gpu_len` of `total_len` positions resident (see the module docstring)."""
    k = shape.kv_row_bytes
    far = max(0, total_len - gpu_len)
    landing = 2 * far * k if far else 0
    return weights + reserve + gpu_len * shape.layers * k + landing + total_len * k


def flexgen_split(total_len: int, shape: ModelShape, *, budget: int, weights: int, reserve: int) -> FlexGenSplit:
    """The longest resident length whose device memory fits `budget`."""
    k, layers, s = shape.kv_row_bytes, shape.layers, total_len
    everything = flexgen_device_bytes(s, s, shape, weights, reserve)
    if everything <= budget:
        return FlexGenSplit(s, 1.0, True, everything, "the whole cache fits the budget")
    spare = budget - weights - reserve - 3 * s * k
    if spare < 0 or layers <= 2:
        nothing = flexgen_device_bytes(0, s, shape, weights, reserve)
        fits = nothing <= budget
        why = ("weights, reserve and staging alone exceed the budget" if not fits
               else "with two layers or fewer, resident K/V cost as much as staging")
        return FlexGenSplit(0, 0.0, fits, nothing, f"{why}: nothing resident")
    gpu_len = min(s, spare // ((layers - 2) * k))
    used = flexgen_device_bytes(gpu_len, s, shape, weights, reserve)
    return FlexGenSplit(int(gpu_len), gpu_len / s if s else 0.0, True, used,
                        f"{gpu_len} of {s} positions fit the budget of {budget / GIB:.2f} GiB "
                        f"(weights {weights / GIB:.2f} GiB, reserve {reserve / GIB:.2f} GiB)")


def default_reserve(budget: int) -> int:
    return int(budget * RESERVE_SHARE)


def weight_bytes(model) -> int:
    """Bytes of the model's parameters and buffers."""
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


def length_from_ratio(ratio: float, length: int) -> int:
    """The ratio forms (`gpu_ratio=R`, `ratio=R`): floor(R x length)."""
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"ratio {ratio} is not between 0 and 1")
    return math.floor(ratio * length)


# ---- step time --------------------------------------------------------------------------
def layer_compute_seconds(seq_len: int, shape: ModelShape, hw: Hardware) -> float:
    """One decode step of one layer on the device: GEMM-bound or memory-bound, whichever is slower."""
    flops = 2 * shape.batch * shape.params_per_layer + 4 * shape.batch * shape.heads * shape.head_dim * seq_len
    read = shape.params_per_layer * shape.bytes_per_value + seq_len * shape.kv_row_bytes
    return max(flops / hw.gemm_flops_per_s, read / hw.mem_bytes_per_s)


def predict_step(method: str, seq_len: int, shape: ModelShape, hw: Hardware, split: int = 0) -> float:
    """Predicted seconds of one decode step at `seq_len` cached positions (see the module docstring)."""
    layer_kv = (seq_len + 1) * shape.kv_row_bytes
    # every method hands attention one layer's K/V built by a copy (DynamicCache's cat included),
    # except a FlexGen split that keeps everything resident and hands over its buffer
    assemble = 0.0 if method == "flexgen" and split > seq_len else 2 * layer_kv / hw.mem_bytes_per_s
    c = layer_compute_seconds(seq_len, shape, hw) + assemble
    head = 2 * shape.batch * shape.hidden * shape.vocab / hw.gemm_flops_per_s
    if method in ("baseline", "dynamic"):
        per_layer = c
    elif method == "offload":
        h2d, d2h = layer_kv / hw.link_bytes_per_s, layer_kv / hw.d2h_bytes_per_s
        per_layer = max(c + d2h, h2d) if hw.overlap else c + d2h + h2d
    elif method == "flexgen":
        far = max(0, seq_len - split) * shape.kv_row_bytes / hw.link_bytes_per_s
        new = 0.0 if split > seq_len else shape.kv_row_bytes / hw.d2h_bytes_per_s  # written to the host
        per_layer = (max(c, far) if hw.overlap else c + far) + new
    elif method == "kvpr":
        parts = kvpr_layer_seconds(min(split, seq_len), seq_len, shape, hw)
        new = shape.kv_row_bytes / hw.d2h_bytes_per_s
        per_layer = (max(c + parts["t_rec"], parts["wait"]) if hw.overlap else c + parts["wait"]) + new
    else:
        raise ValueError(f"no step model for method {method!r}")
    return shape.layers * per_layer + head
