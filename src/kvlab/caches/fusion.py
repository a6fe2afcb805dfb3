"""The cache layer of a fused prefill: chunk K/V loaded from a store, overwritten where recomputed.

During the fused prefill the model is fed every document and question token after a prefix
that is real past. A layer that computes all tokens replaces the loaded K/V with its fresh
ones; a layer that computes only the selected rows writes their fresh K/V over the loaded ones
at their positions and attends to everything. Once the prefill is done the layer grows by
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

    `rows` are the input rows (0 = first document token) the layers from the first selective
    one on compute; None while layers compute every row.
    """

    n_past: int  # prefix tokens: real past, never recomputed
    n_new: int  # document + question tokens fed to the model
    n_docs: int  # document tokens (candidates for recomputation)
    check_layer: int | None = None  # where value deviations are observed
    rows: torch.Tensor | None = None
    done: bool = False
    observations: dict[str, Any] = field(default_factory=dict)


class FusionLayer(DynamicLayer):
    """Holds `[1, kv_heads, n_past + n_new, head_dim]` K/V: prefix, loaded chunks, question slots."""

    is_croppable = False

    def __init__(self, index: int, keys: torch.Tensor, values: torch.Tensor, plan: FusionPlan) -> None:
        super().__init__()
        expected = plan.n_past + plan.n_new
        if keys.shape[-2] != expected or values.shape[-2] != expected:
            raise ValueError(f"layer {index}: loaded K/V hold {keys.shape[-2]} positions, the prompt has {expected}")
        self.index = index
        self.plan = plan
        self.keys, self.values = keys, values
        self.dtype, self.device = keys.dtype, keys.device
        self.is_initialized = True

    def get_seq_length(self) -> int:
        return super().get_seq_length() if self.plan.done else self.plan.n_past

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        if self.plan.done:
            return super().get_mask_sizes(query_length)
        return self.plan.n_past + query_length, 0

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        plan = self.plan
        if plan.done:
            return super().update(key_states, value_states)
        past = plan.n_past
        if plan.rows is None:
            if key_states.shape[-2] != plan.n_new:
                raise RuntimeError(f"layer {self.index}: a full layer got {key_states.shape[-2]} rows, expected {plan.n_new}")
            if self.index == plan.check_layer:
                cached = self.values[:, :, past: past + plan.n_docs].float()
                fresh = value_states[:, :, : plan.n_docs].float()
                plan.observations["deviation"] = (fresh - cached).pow(2).sum(dim=(0, 1, 3))
            self.keys = torch.cat([self.keys[:, :, :past], key_states], dim=-2)
            self.values = torch.cat([self.values[:, :, :past], value_states], dim=-2)
        else:
            if key_states.shape[-2] != plan.rows.numel():
                raise RuntimeError(f"layer {self.index}: got {key_states.shape[-2]} rows, expected {plan.rows.numel()}")
            index = plan.rows + past
            self.keys.index_copy_(2, index, key_states)
            self.values.index_copy_(2, index, value_states)
        return self.keys, self.values
