"""Where a diff reads a snapshot's tensors from: its file, one tensor at a time, or its memory.

A snapshot loaded from disk is read through `TensorFile` (positioned reads, no memory map), so
a diff holds only the tensors it is working on; one built in memory is read as it is.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from kvlab.snapshot import KV_FILE, LOGITS_FILE, Snapshot, key_name, value_name
from kvlab.tensorfile import TensorFile

TENSORS = ("keys", "values")


class SnapshotSource:
    """Layer tensors and logits rows of one snapshot, read only when asked for."""

    def __init__(self, snapshot: Snapshot) -> None:
        self.snapshot = snapshot
        on_disk = snapshot.path is not None and (snapshot.path / KV_FILE).is_file()
        self._kv = TensorFile(snapshot.path / KV_FILE) if on_disk else None
        logits_path = snapshot.path / LOGITS_FILE if snapshot.path is not None else None
        self._logits = TensorFile(logits_path) if on_disk and logits_path.is_file() else None

    def shape(self, layer: int) -> tuple[int, ...]:
        if self._kv is not None:
            return self._kv.shape(key_name(layer))
        return self.snapshot.shape(layer)

    def value_shape(self, layer: int) -> tuple[int, ...]:
        if self._kv is not None:
            return self._kv.shape(value_name(layer))
        return tuple(self.snapshot.values(layer).shape)

    def dtype(self) -> torch.dtype:
        """The stored dtype of the cache (layer 0's keys)."""
        if self._kv is not None:
            return self._kv.dtype(key_name(0))
        return self.snapshot.keys(0).dtype

    def tensor(self, layer: int, which: str) -> torch.Tensor:
        """`keys` or `values` of one layer."""
        name = key_name(layer) if which == "keys" else value_name(layer)
        if self._kv is not None:
            return self._kv.read(name)
        return self.snapshot.tensor(name)

    def logits_steps(self) -> int | None:
        """Number of logits rows recorded, or None when the snapshot has none."""
        if self._logits is not None:
            return self._logits.shape("logits")[0]
        if self.snapshot.path is not None:
            return None
        logits = self.snapshot.logits()
        return None if logits is None else int(logits.shape[0])

    def logits_chunks(self, rows_per_chunk: int) -> Iterator[torch.Tensor]:
        """The `[steps, vocab]` logits, a few rows at a time."""
        steps = self.logits_steps() or 0
        for start in range(0, steps, rows_per_chunk):
            rows = slice(start, min(steps, start + rows_per_chunk))
            if self._logits is not None:
                yield self._logits.read("logits", rows)
            else:
                yield self.snapshot.logits()[rows]

    def vocab(self) -> int | None:
        if self._logits is not None:
            return self._logits.shape("logits")[1]
        logits = self.snapshot.logits() if self.snapshot.path is None else None
        return None if logits is None else int(logits.shape[1])
