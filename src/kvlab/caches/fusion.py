"""The cache layer of a fused prefill: chunk K/V loaded from a store, overwritten where recomputed.

During the fused prefill the model is fed the whole prompt. A layer that computes all tokens
replaces the loaded K/V with its fresh ones; a layer that computes only the selected rows
writes their fresh K/V over the loaded ones at their positions and attends to everything. Once the prefill is done the layer grows by
concatenation like transformers' DynamicLayer, so decoding continues normally.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from transformers.cache_utils import DynamicLayer


@dataclass
class FusionPlan:
    """What the layers of one fused prefill share.

    The model is fed the whole prompt: prefix rows [0, n_prefix), document rows
    [n_prefix, n_prefix + n_docs), then the question. `rows` are the rows the layers from the
    first selective one on compute (selected document rows and the question; the prefix is
    exact as stored); None while layers compute every row.
    """

    n_tokens: int
    n_prefix: int
    n_docs: int
    check_layer: int | None = None  # where value deviations are observed
    rows: torch.Tensor | None = None
    done: bool = False
    observations: dict[str, Any] = field(default_factory=dict)

    @property
    def docs(self) -> slice:
        return slice(self.n_prefix, self.n_prefix + self.n_docs)


class FusionLayer(DynamicLayer):
    """Holds `[1, kv_heads, n_tokens, head_dim]` K/V: prefix, loaded chunks, question slots."""

    is_croppable = False

    def __init__(self, index: int, keys: torch.Tensor, values: torch.Tensor, plan: FusionPlan) -> None:
        super().__init__()
        if keys.shape[-2] != plan.n_tokens or values.shape[-2] != plan.n_tokens:
            raise ValueError(f"layer {index}: loaded K/V hold {keys.shape[-2]} positions, the prompt has {plan.n_tokens}")
        self.index = index
        self.plan = plan
        self.keys, self.values = keys, values
        self.dtype, self.device = keys.dtype, keys.device
        self.is_initialized = True

    def get_seq_length(self) -> int:
        return super().get_seq_length() if self.plan.done else 0

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        if self.plan.done:
            return super().get_mask_sizes(query_length)
        return query_length, 0

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        plan = self.plan
        if plan.done:
            return super().update(key_states, value_states)
        if plan.rows is None:
            if key_states.shape[-2] != plan.n_tokens:
                raise RuntimeError(f"layer {self.index}: a full layer got {key_states.shape[-2]} rows, expected {plan.n_tokens}")
            if self.index == plan.check_layer:
                cached, fresh = self.values[:, :, plan.docs].float(), value_states[:, :, plan.docs].float()
                plan.observations["deviation"] = (fresh - cached).pow(2).sum(dim=(0, 1, 3))
            self.keys, self.values = key_states, value_states
        else:
            if key_states.shape[-2] != plan.rows.numel():
                raise RuntimeError(f"layer {self.index}: got {key_states.shape[-2]} rows, expected {plan.rows.numel()}")
            self.keys.index_copy_(2, plan.rows, key_states)
            self.values.index_copy_(2, plan.rows, value_states)
        return self.keys, self.values
