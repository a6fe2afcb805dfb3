"""FP8 KV scales in memory: one K and one V scale per layer, per tensor or per KV head.

Every file format kvlab reads or writes (vLLM's `kv_cache_scales.json`, compressed-tensors and
ModelOpt checkpoints, AMMO per-rank files) converts to and from `KVScales`. Two conversions
lose information and say how: vLLM keeps one scale per (rank, layer) for both K and V (the
larger one is kept, so nothing that fitted before clips), and per-head scales fold to a rank
as the largest scale among the heads that rank holds.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from kvlab.errors import KvlabError
from kvlab.quant.fp8 import scale_from_amax
from kvlab.scales.rank_heads import heads_of_rank

RankScales = dict[int, dict[int, float]]  # {tp rank: {layer: scale}}, vLLM's scaling_factor


class ScalesError(KvlabError):
    """Scales that are missing, malformed, or do not fit the model."""


@dataclass(frozen=True)
class KVScales:
    """Per-layer K and V scales (`x = q * scale`); each a float32 tensor `(1,)` or `(kv_heads,)`."""

    keys: tuple[torch.Tensor, ...]
    values: tuple[torch.Tensor, ...]
    fp8_format: str = "e4m3fn"
    meta: dict = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        if len(self.keys) != len(self.values):
            raise ScalesError(f"{len(self.keys)} K scales but {len(self.values)} V scales")
        if not self.keys:
            raise ScalesError("no scales at all")
        for kind, group in (("K", self.keys), ("V", self.values)):
            for i, s in enumerate(group):
                if s.dim() != 1 or s.dtype != torch.float32:
                    raise ScalesError(f"layer {i} {kind} scale must be a 1-d float32 tensor, got {tuple(s.shape)}")
                if not torch.isfinite(s).all() or (s <= 0).any():
                    raise ScalesError(f"layer {i} {kind} scale is not finite and positive: {s.tolist()}")

    # ---- construction ----------------------------------------------------------------------
    @classmethod
    def from_amax(cls, key_amax: Sequence[torch.Tensor], value_amax: Sequence[torch.Tensor],
                  fp8_format: str = "e4m3fn", meta: dict | None = None) -> "KVScales":
        """`scale = amax / fp8_max` per layer (an all-zero layer gets scale 1)."""
        def one(a: torch.Tensor) -> torch.Tensor:
            return scale_from_amax(torch.as_tensor(a, dtype=torch.float32).reshape(-1), fp8_format)

        return cls(tuple(one(a) for a in key_amax), tuple(one(a) for a in value_amax), fp8_format, meta or {})

    @classmethod
    def from_ranks(cls, ranks: RankScales, n_heads: int, n_kv_heads: int, per_head: bool,
                   fp8_format: str = "e4m3fn") -> "KVScales":
        """Scales for a single-device run from vLLM's per-(rank, layer) scales.

        Per head, each KV head takes the largest scale of the ranks that hold it (under the
        layout `heads_of_rank` gives for that tp); per tensor, the largest over all ranks.
        The same scale serves K and V, as in vLLM.
        """
        tp = len(ranks)
        layers = sorted(ranks[0]) if 0 in ranks else []
        per_layer: list[torch.Tensor] = []
        if per_head:
            slots = heads_of_rank(tp, n_heads, n_kv_heads)
            for layer in layers:
                heads = torch.zeros(n_kv_heads)
                for rank, held in enumerate(slots):
                    for h in held:
                        if h is not None:
                            heads[h] = max(float(heads[h]), ranks[rank][layer])
                per_layer.append(heads)
        else:
            per_layer = [torch.tensor([max(ranks[r][layer] for r in range(tp))]) for layer in layers]
        return cls(tuple(per_layer), tuple(t.clone() for t in per_layer), fp8_format)

    # ---- reading ---------------------------------------------------------------------------
    @property
    def n_layers(self) -> int:
        return len(self.keys)

    @property
    def per_head(self) -> bool:
        return any(s.numel() > 1 for s in (*self.keys, *self.values))

    @property
    def granularity(self) -> str:
        return "head" if self.per_head else "tensor"

    # ---- changing granularity --------------------------------------------------------------
    def per_tensor_scales(self) -> "KVScales":
        """One scale per layer and tensor: the largest over the heads."""
        def reduce(s: torch.Tensor) -> torch.Tensor:
            return s.amax().reshape(1)

        return KVScales(tuple(map(reduce, self.keys)), tuple(map(reduce, self.values)), self.fp8_format, self.meta)

    def per_head_scales(self, n_kv_heads: int) -> "KVScales":
        """One scale per KV head; a per-tensor scale is given to every head."""
        def widen(s: torch.Tensor, i: int, kind: str) -> torch.Tensor:
            if s.numel() == n_kv_heads:
                return s.clone()
            if s.numel() == 1:
                return s.expand(n_kv_heads).clone()
            raise ScalesError(f"layer {i} has {s.numel()} {kind} head scales but the model has {n_kv_heads} KV heads")

        return KVScales(tuple(widen(s, i, "K") for i, s in enumerate(self.keys)),
                        tuple(widen(s, i, "V") for i, s in enumerate(self.values)), self.fp8_format, self.meta)

    def fitted(self, n_layers: int, n_kv_heads: int, granularity: str) -> "KVScales":
        """These scales checked against a model's geometry and brought to `granularity`."""
        if self.n_layers != n_layers:
            raise ScalesError(f"the scales cover {self.n_layers} layers but the model has {n_layers}")
        widened = self.per_head_scales(n_kv_heads)  # also checks the head count
        return widened if granularity == "head" else self.per_tensor_scales()

    def to_ranks(self, tp: int, n_heads: int, n_kv_heads: int) -> RankScales:
        """vLLM's `{rank: {layer: scale}}`: per rank and layer, the largest K or V scale of its heads.

        A rank that holds only zero padding heads gets the layer's largest scale (any positive
        scale reads zeros back exactly; vLLM needs one for every rank).
        """
        slots = heads_of_rank(tp, n_heads, n_kv_heads)
        out: RankScales = {}
        for rank, held in enumerate(slots):
            real = [h for h in held if h is not None]
            layer_scales: dict[int, float] = {}
            for layer, (k, v) in enumerate(zip(self.keys, self.values)):
                both = torch.maximum(k.expand(n_kv_heads) if k.numel() == 1 else k,
                                     v.expand(n_kv_heads) if v.numel() == 1 else v)
                if both.numel() != n_kv_heads:
                    raise ScalesError(f"layer {layer} has {both.numel()} head scales but the model has {n_kv_heads} KV heads")
                chosen = both[real] if real else both
                layer_scales[layer] = float(chosen.max())
            out[rank] = layer_scales
        return out
