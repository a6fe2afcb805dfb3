"""Snapshots for diff tests: a tiny golden run, and copies of it with chosen rows changed."""

from __future__ import annotations

import functools

import torch

import kvlab
from kvlab.snapshot import Snapshot
from tests.conftest import tiny

PROMPT = "The cache holds keys and values."


@functools.lru_cache(maxsize=None)
def golden_run(name: str = "tiny-llama", steps: int = 8) -> Snapshot:
    loaded = tiny(name)
    return kvlab.capture(loaded, loaded.encode(PROMPT), max_new_tokens=steps)


def edited_copy(snapshot: Snapshot, edits=(), meta: dict | None = None, logits: torch.Tensor | None = None) -> Snapshot:
    """A copy of `snapshot` with `edits` [(layer, "keys"|"values", index, value)] applied in place."""
    layers = [(snapshot.keys(i).clone(), snapshot.values(i).clone()) for i in range(snapshot.n_layers)]
    for layer, tensor, index, value in edits:
        target = layers[layer][0 if tensor == "keys" else 1]
        target[index] = value
    new_meta = {k: v for k, v in snapshot.meta.items() if k not in ("format", "created", "n_layers")}
    new_meta.update(meta or {})
    return Snapshot.from_layers(layers, new_meta, logits=snapshot.logits() if logits is None else logits)
