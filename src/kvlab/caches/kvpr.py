"""`cache=kvpr`: offloaded K/V with partial recomputation (KVPR, Findings of ACL 2025).

For positions `[0, l)` of every layer the cache keeps the layer's attention input activations
X (the normalised hidden states that feed k_proj/v_proj) instead of K/V, captured at prefill
by a forward pre-hook that `session(model)` installs and always removes. At each decode step
the layer's X crosses to the device and K = RoPE(X W_K + b_K), V = X W_V + b_V are recomputed
at the tokens' original positions, while the stored K/V of `[l, s)` cross on another stream
(CUDA) in parallel; new tokens append to the K/V part. Both parts live in host memory (pinned
on CUDA) or, with `tier=disk`, in memory-mapped files.

Moving X for a position costs `hidden` values instead of `2 * kv_heads * head_dim`: with
multi-head attention that is half the bytes, paid for with two small GEMMs. The cost model
(`kvlab.offload.costmodel`) picks l from measured hardware; with grouped KV heads an activation
row can be larger than the K/V row it replaces, and then l = 0.

    cache=kvpr:recompute_len=512    cache=kvpr:ratio=0.3,tier=disk    cache=kvpr:auto
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Literal

import torch

from kvlab.caches.recompute import KVRecomputer
from kvlab.caches.registry import register
from kvlab.caches.split import SplitCache, SplitLayer, SplitPolicy
from kvlab.errors import KvlabError
from kvlab.intercept import intercept
from kvlab.model_facts import attention_modules, model_shape
from kvlab.offload import costmodel
from kvlab.offload.hw import load_metrics


class KVPRLayer(SplitLayer):
    """Near part = activations of `[0, split)` in a store, recomputed into K/V each step."""

    def __init__(self, cache, index: int) -> None:
        super().__init__(cache, index)
        self.acts = None
        self.cos: torch.Tensor | None = None
        self.sin: torch.Tensor | None = None
        self.checked = False
        self._pending: tuple[torch.Tensor, torch.Tensor | None] | None = None

    def capture(self, hidden_states: torch.Tensor, position_ids: torch.Tensor | None) -> None:
        """Called by the session's hook with the attention's input, just before `update`."""
        self._pending = (hidden_states, position_ids)

    def update(self, key_states, value_states, *args, **kwargs):
        try:
            return super().update(key_states, value_states, *args, **kwargs)
        finally:
            self._pending = None

    def lazy_initialization(self, key_states, value_states) -> None:
        super().lazy_initialization(key_states, value_states)
        hidden = self.cache.recomputer.hidden_size
        self.acts = self.cache.new_store((key_states.shape[0], hidden), key_states.dtype, near=True)

    def store_near(self, start, keys, values):
        count = keys.shape[-2]
        x, positions = self._pending_rows(start, count)
        cos, sin = self.cache.rope_rows(x, positions)
        if not self.checked:
            self.cache.recomputer.check(self.index, x, cos, sin, keys, values)
            self.checked = True
        self.acts.append(x.transpose(0, 1))
        if self.cos is None or start == 0:
            self.cos, self.sin = cos, sin
        else:
            self.cos = torch.cat([self.cos[:, :start], cos], dim=1)
            self.sin = torch.cat([self.sin[:, :start], sin], dim=1)

    def _pending_rows(self, start: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self._pending is None:
            raise KvlabError(f"cache=kvpr: layer {self.index} got no activations; run the model inside "
                             "`with policy.session(model):`")
        hidden, positions = self._pending
        x = hidden[:, :count]
        if positions is None:
            positions = torch.arange(start, start + count, device=x.device).unsqueeze(0)
        return x, positions[:, :count]

    def near(self, count, landed):
        if count == 0:
            return self.empty_kv()
        x = landed["act"].permute(1, 0, 2)  # [count, b, hidden] -> [b, count, hidden]
        return self.cache.recomputer.kv(self.index, x, self.cos[:, :count], self.sin[:, :count])

    def near_plan(self):
        count = min(self.split, self.length)
        return {"act": self.acts.rows(0, count)} if count else {}

    def drop_near(self, length):
        self.acts.truncate(length)
        if self.cos is not None:
            self.cos, self.sin = self.cos[:, :length], self.sin[:, :length]

    def reset(self) -> None:
        super().reset()
        self.acts, self.cos, self.sin, self.checked = None, None, None, False

    def stores(self):
        return [self.far, self.acts]


class KVPRCache(SplitCache):
    policy_name = "kvpr"

    def __init__(self, n_layers: int, recomputer: KVRecomputer, **kwargs) -> None:
        super().__init__([KVPRLayer(self, i) for i in range(n_layers)], lanes=("act", "kv"), **kwargs)
        self.recomputer = recomputer
        self._rope_memo: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def rope_rows(self, x: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin at `positions`, computed once for all layers (they see the same positions)."""
        memo = self._rope_memo
        if memo is not None and memo[0].shape == positions.shape and torch.equal(memo[0], positions):
            return memo[1], memo[2]
        cos, sin = self.recomputer.rope(x, positions)
        self._rope_memo = (positions, cos, sin)
        return cos, sin

    def device_bytes(self) -> int:
        rope = {t.data_ptr(): t.numel() * t.element_size()
                for layer in self.layers for t in (layer.cos, layer.sin) if t is not None}
        return super().device_bytes() + sum(rope.values())

    def reset(self) -> None:
        super().reset()
        self._rope_memo = None


def _capture_attention_input(module, args, kwargs) -> None:
    """Forward pre-hook: hand a KVPR cache the attention's input X and positions."""
    cache = kwargs.get("past_key_values")
    if isinstance(cache, KVPRCache):
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        cache.layers[module.layer_idx].capture(hidden, kwargs.get("position_ids"))


@register("kvpr")
@dataclass(frozen=True)
class KVPRPolicy(SplitPolicy):
    """Keep activations for positions `[0, l)` and recompute their K/V; the rest offloaded.

    recompute_len: l in tokens (clipped to the prompt), or `auto`;
    ratio: l as a share of the prompt;
    auto: l from the cost model and the figures `kvlab hw` measured (0, with the reason, when
        an activation row is no smaller than the K/V row it replaces);
    tier: where activations and K/V live; dir: the folder for tier=disk files.
    """

    recompute_len: int | Literal["auto"] | None = None
    ratio: float | None = None
    auto: bool = False
    tier: Literal["host", "disk"] = "host"
    dir: str | None = None

    def validate(self) -> None:
        auto = self.auto or self.recompute_len == "auto"
        given = [on for on in (self.recompute_len is not None and self.recompute_len != "auto",
                               self.ratio is not None, auto) if on]
        if len(given) != 1:
            raise ValueError("give exactly one of recompute_len=N, ratio=R or auto")
        if isinstance(self.recompute_len, int) and self.recompute_len < 0:
            raise ValueError(f"recompute_len={self.recompute_len} is negative")
        if self.ratio is not None and not 0.0 <= self.ratio <= 1.0:
            raise ValueError(f"ratio={self.ratio} is not between 0 and 1")
        if self.dir is not None and self.tier != "disk":
            raise ValueError("dir= is the folder for tier=disk files; add tier=disk")

    def build(self, model, *, batch_size: int = 1, max_length: int | None = None):
        recomputer = KVRecomputer(model)
        return KVPRCache(model_shape(model.config)["n_layers"], recomputer, device=model.device,
                         rule=self._rule(model, batch_size), tier=self.tier, directory=self.dir,
                         max_length=max_length)

    def session(self, model) -> contextlib.AbstractContextManager[None]:
        """Each attention module's input, kept for the recomputation (forward pre-hooks)."""
        return intercept(model, pre=[(module, _capture_attention_input) for module in attention_modules(model)])

    def _rule(self, model, batch_size: int):
        if isinstance(self.recompute_len, int):
            return lambda first: min(self.recompute_len, first)
        if self.ratio is not None:
            return lambda first: math.floor(self.ratio * first)

        shape = costmodel.ModelShape.from_model(model, batch=batch_size)
        metrics = load_metrics(str(model.device), need="gemm_flops_per_s", what="cache=kvpr:auto")
        hardware = costmodel.Hardware.from_metrics(metrics, dtype=model.dtype, tier=self.tier)

        def rule(first: int):
            split = costmodel.kvpr_split(first, shape, hardware)
            return split.recompute_len, split.reason

        return rule
