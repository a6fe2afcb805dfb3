"""Read the bytes of llama.cpp's sequence state (`llama_state_seq_get_data`) into K/V rows.

The sequence state is llama.cpp's own way to hand one sequence's KV cache to a caller. Its
layout (llama-context.cpp `state_seq_get_data`, llama-kv-cache.cpp `state_write`):

    u32 magic 0xaf143cd8, i32 seq_id, u32 n_stream
    per stream: u32 cell_count; per cell: i32 pos, u32 n_seq_id, i32 seq_id * n_seq_id
                u32 v_trans, u32 n_layer
                per layer: i32 k_type, u64 k_row_bytes, cell_count rows of K
                per layer: i32 v_type, u64 v_row_bytes, cell_count rows of V         (v_trans 0)
                       or: i32 v_type, u32 v_elem_bytes, u32 n_embd_v_gqa,
                           n_embd_v_gqa rows of cell_count elements               (v_trans 1)

Rows stay raw bytes here (ggml types: F32, F16, Q8_0, Q4_0, ...); `kvlab.engines.ggml_rows`
turns them into numbers. Anything that does not add up is a `KvlabError`, never a guess.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np

from kvlab.errors import KvlabError

MAGIC = 0xAF143CD8


class StateError(KvlabError):
    """Sequence-state bytes that are not what this reader knows how to read."""


@dataclass
class LayerRows:
    """One layer's cache for the sequence: raw bytes, one row per cell (V un-transposed)."""

    k_type: int
    k_rows: np.ndarray  # uint8 [cells, k_row_bytes]
    v_type: int
    v_rows: np.ndarray  # uint8 [cells, v_row_bytes]


@dataclass
class SequenceState:
    seq_id: int
    positions: list[int]  # position of each cell, in cell order
    v_trans: bool
    layers: list[LayerRows]


class _Cursor:
    def __init__(self, data: bytes) -> None:
        self.data = memoryview(data)
        self.at = 0

    def take(self, fmt: str) -> tuple:
        size = struct.calcsize(fmt)
        if self.at + size > len(self.data):
            raise StateError(f"llama.cpp sequence state ends early (byte {self.at} of {len(self.data)})")
        values = struct.unpack_from(fmt, self.data, self.at)
        self.at += size
        return values

    def one(self, fmt: str):
        return self.take(fmt)[0]

    def block(self, n: int) -> np.ndarray:
        if n < 0 or self.at + n > len(self.data):
            raise StateError(f"llama.cpp sequence state ends early (wants {n} bytes at {self.at} of {len(self.data)})")
        out = np.frombuffer(self.data, dtype=np.uint8, count=n, offset=self.at)
        self.at += n
        return out


def parse_sequence_state(data: bytes, *, n_layers: int, v_elements: int) -> SequenceState:
    """Parse the state of one sequence; `n_layers` and `v_elements` (n_embd_v_gqa) cross-check it.

    Cells carry no extension: that is what llama.cpp writes for plain RoPE models such as LLaMA.
    """
    cur = _Cursor(data)
    magic, seq_id = cur.take("<Ii")
    if magic != MAGIC:
        raise StateError(f"not a llama.cpp sequence state (magic {magic:#x}, expected {MAGIC:#x})")
    n_stream = cur.one("<I")
    found: SequenceState | None = None
    for _ in range(n_stream):
        cell_count = cur.one("<I")
        if cell_count == 0:
            continue
        if found is not None:
            raise StateError("the sequence state holds cells in more than one stream; kvlab reads one")
        positions = []
        for _ in range(cell_count):
            pos, n_seq = cur.take("<iI")
            seqs = cur.take(f"<{n_seq}i") if n_seq else ()
            if seq_id not in seqs:
                raise StateError(f"cell at position {pos} does not belong to sequence {seq_id}")
            positions.append(pos)
        v_trans, n_layer = cur.take("<II")
        if n_layer != n_layers:
            raise StateError(f"the sequence state has {n_layer} layers, the model {n_layers}")
        k_parts = []
        for _ in range(n_layer):
            k_type, row = cur.take("<iQ")
            k_parts.append((k_type, cur.block(row * cell_count).reshape(cell_count, row)))
        v_parts = []
        for _ in range(n_layer):
            if not v_trans:
                v_type, row = cur.take("<iQ")
                v_parts.append((v_type, cur.block(row * cell_count).reshape(cell_count, row)))
            else:
                v_type, elem, n_embd = cur.take("<iII")
                if n_embd != v_elements:
                    raise StateError(f"transposed V has {n_embd} channels, the model {v_elements}")
                cols = cur.block(elem * n_embd * cell_count).reshape(n_embd, cell_count, elem)
                v_parts.append((v_type, np.ascontiguousarray(cols.transpose(1, 0, 2)).reshape(cell_count, n_embd * elem)))
        layers = [LayerRows(kt, kr, vt, vr) for (kt, kr), (vt, vr) in zip(k_parts, v_parts)]
        found = SequenceState(seq_id, positions, bool(v_trans), layers)
    if cur.at != len(cur.data):
        raise StateError(f"llama.cpp sequence state has {len(cur.data) - cur.at} bytes past its end")
    if found is None:
        raise StateError(f"sequence {seq_id} holds no cells")
    return found
