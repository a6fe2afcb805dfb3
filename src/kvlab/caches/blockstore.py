"""Append-only storage of quantized token blocks for one role (keys or values) of one layer.

Blocks are encoded once, when they arrive, and their bytes are never rewritten: later blocks
are appended beside them. Storage is a list of segments of `segment_blocks` blocks each, plus
a partly filled tail; a segment is the unit attention reads (and dequantizes) at once, so
reading never concatenates the whole cache. Memory is exact: no spare capacity is allocated.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

from kvlab.quant.blocks import BlockCodec, parts_bytes

Parts = dict[str, torch.Tensor]


def _cat(a: Parts | None, b: Parts) -> Parts:
    return b if a is None else {name: torch.cat([a[name], b[name]], dim=2) for name in b}


def _slice(parts: Parts, start: int, stop: int | None = None) -> Parts:
    # clone: a slice would keep the whole source buffer alive
    return {name: t[:, :, start:stop].clone() for name, t in parts.items()}


class BlockStore:
    def __init__(self, codec: BlockCodec, segment_blocks: int) -> None:
        if segment_blocks < 1:
            raise ValueError("a segment holds at least one block")
        self.codec = codec
        self.segment_blocks = segment_blocks
        self.segments: list[Parts] = []
        self.tail: Parts | None = None
        self.n_blocks = 0
        self.blocks_encoded = 0  # how many blocks `encode` has seen: equals n_blocks when nothing is re-quantized

    def append(self, x: torch.Tensor) -> None:
        """Encode `[b, h, n, tokens, head_dim]` (n new blocks) and store them after the others."""
        n = x.shape[2]
        if n == 0:
            return
        parts = self.codec.encode(x)
        self.blocks_encoded += n
        self.n_blocks += n
        self.tail = _cat(self.tail, parts)
        while (held := self._tail_blocks()) >= self.segment_blocks:
            if held == self.segment_blocks:
                self.segments.append(self.tail)
                self.tail = None
            else:
                self.segments.append(_slice(self.tail, 0, self.segment_blocks))
                self.tail = _slice(self.tail, self.segment_blocks)

    def _tail_blocks(self) -> int:
        return 0 if self.tail is None else next(iter(self.tail.values())).shape[2]

    def splits(self) -> Iterator[Parts]:
        """The stored blocks in order, one segment (then the tail) at a time."""
        yield from self.segments
        if self.tail is not None:
            yield self.tail

    def decode(self, parts: Parts, dtype: torch.dtype) -> torch.Tensor:
        """One split as `[b, h, n * tokens, head_dim]`."""
        x = self.codec.decode(parts, dtype)
        return x.reshape(x.shape[0], x.shape[1], -1, x.shape[-1])

    def decode_all(self, dtype: torch.dtype) -> torch.Tensor | None:
        pieces = [self.decode(parts, dtype) for parts in self.splits()]
        return torch.cat(pieces, dim=2) if pieces else None

    def raw(self) -> Parts:
        """Every stored tensor, all blocks concatenated along dim 2 (for export)."""
        merged: Parts | None = None
        for parts in self.splits():
            merged = _cat(merged, parts)
        return merged or {}

    @property
    def nbytes(self) -> int:
        return sum(parts_bytes(parts) for parts in self.splits())

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Apply `fn` to every stored tensor (batch reordering for beam search)."""
        self.segments = [{name: fn(t) for name, t in parts.items()} for parts in self.segments]
        if self.tail is not None:
            self.tail = {name: fn(t) for name, t in self.tail.items()}
