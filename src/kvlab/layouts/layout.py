"""A tensor-parallel KV layout as plain data.

For each rank, the global KV head held by each local head slot (None for a padding slot),
plus three modifiers seen in real stacks:

- batch slices (attention data parallel): the ranks form `dp` equal groups; group g serves the
  g-th contiguous slice of the batch and holds every KV head for it;
- sequence split (flash-decoding): the G ranks of a batch group that hold head h split the
  sequence round-robin, position p on the (p % G)-th of them at local position p // G;
- rank order: shard i of the layout lives on rank `rank_order[i]` (context-parallel reordering).

Slots are indexed by *logical* rank (the order the strategy produced); files and processes
are numbered by *physical* rank. Without a rank order the two are the same.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from kvlab.errors import KvlabError

Slots = tuple[tuple[int | None, ...], ...]


class LayoutError(KvlabError):
    """A layout that cannot exist, or shards that do not match their layout."""


@dataclass(frozen=True)
class Layout:
    """Where every KV head of one layer lives across `tp` ranks."""

    name: str
    n_kv_heads: int
    slots: Slots
    n_heads: int | None = None
    dp: int = 1
    seq_split: bool = False
    rank_order: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "slots", tuple(tuple(s) for s in self.slots))
        if self.rank_order is not None:
            object.__setattr__(self, "rank_order", tuple(int(r) for r in self.rank_order))
        self._validate()

    # ---- geometry ------------------------------------------------------------------------
    @property
    def tp(self) -> int:
        return len(self.slots)

    @property
    def group_size(self) -> int:
        """Ranks per batch group (`tp // dp`)."""
        return self.tp // self.dp

    def physical(self, logical: int) -> int:
        return logical if self.rank_order is None else self.rank_order[logical]

    def logical(self, physical: int) -> int:
        return physical if self.rank_order is None else self.rank_order.index(physical)

    def heads(self, rank: int) -> tuple[int | None, ...]:
        """The global KV head of each local slot of physical rank `rank` (None: padding)."""
        return self.slots[self.logical(rank)]

    def batch_group(self, logical: int) -> int:
        return logical // self.group_size

    def holders(self, head: int, group: int = 0) -> list[tuple[int, list[int]]]:
        """`(logical rank, [slots])` holding `head` in batch group `group`, in rank order."""
        found = []
        start = group * self.group_size
        for r in range(start, start + self.group_size):
            slots = [s for s, h in enumerate(self.slots[r]) if h == head]
            if slots:
                found.append((r, slots))
        return found

    def local_seq_len(self, seq_len: int) -> int:
        """Positions every rank stores for a global sequence of `seq_len`.

        Under a sequence split a head shared by G ranks needs ceil(seq_len / G) positions per
        rank; all ranks use the length of the least-shared head and zero-pad the rest.
        """
        if not self.seq_split:
            return seq_len
        fewest = min(len(self.holders(h, g)) for g in range(self.dp) for h in range(self.n_kv_heads))
        return math.ceil(seq_len / fewest)

    def placement(self) -> tuple:
        """Everything that decides where data lives (not the name): equal placements shard alike."""
        heads = tuple(self.heads(r) for r in range(self.tp))
        return (self.n_kv_heads, heads, self.dp, self.seq_split, self.rank_order)

    def describe(self) -> str:
        """`r0 [0,0,0] r1 [0,1,1] ...` by physical rank, `-` for padding."""
        parts = []
        for rank in range(self.tp):
            heads = ",".join("-" if h is None else str(h) for h in self.heads(rank))
            parts.append(f"r{rank} [{heads}]")
        return " ".join(parts)

    # ---- metadata ------------------------------------------------------------------------
    def rank_meta(self, rank: int, seq_len: int | None = None) -> dict[str, Any]:
        """The `layout` block of physical rank `rank`'s shard snapshot."""
        meta: dict[str, Any] = {
            "name": self.name,
            "tp": self.tp,
            "rank": rank,
            "heads": list(self.heads(rank)),
            "n_heads": self.n_heads,
            "n_kv_heads": self.n_kv_heads,
            "dp": self.dp,
            "seq_split": self.seq_split,
            "rank_order": list(self.rank_order) if self.rank_order is not None else None,
        }
        if seq_len is not None:
            meta["seq_len"] = seq_len
        return meta

    @classmethod
    def from_rank_metas(cls, metas: Mapping[int, Mapping[str, Any]]) -> "Layout":
        """Rebuild a layout from the `layout` blocks of every rank's shard (keyed by rank)."""
        if not metas:
            raise LayoutError("no shard carries layout metadata")
        first = metas[min(metas)]
        try:
            tp = int(first["tp"])
            name = str(first["name"])
            kv = int(first["n_kv_heads"])
        except (KeyError, TypeError, ValueError) as err:
            raise LayoutError(f"shard layout metadata is incomplete ({err})") from None
        missing = [r for r in range(tp) if r not in metas]
        if missing:
            raise LayoutError(f"layout {name} has tp={tp} but ranks {_ranks(missing)} have no shard")
        for rank, meta in metas.items():
            if int(meta.get("tp", -1)) != tp or meta.get("name") != name or int(meta.get("rank", -1)) != rank:
                raise LayoutError(f"shard of rank {rank} disagrees with rank {min(metas)} about the layout")
        order = first.get("rank_order")
        by_logical: list[tuple[int | None, ...]] = [()] * tp
        for rank in range(tp):
            logical = rank if order is None else list(order).index(rank)
            by_logical[logical] = tuple(metas[rank]["heads"])
        return cls(
            name=name,
            n_kv_heads=kv,
            slots=tuple(by_logical),
            n_heads=first.get("n_heads"),
            dp=int(first.get("dp", 1)),
            seq_split=bool(first.get("seq_split", False)),
            rank_order=tuple(order) if order is not None else None,
        )

    # ---- checks --------------------------------------------------------------------------
    def _validate(self) -> None:
        tp = self.tp
        if tp < 1:
            raise LayoutError("a layout needs at least one rank")
        if self.n_kv_heads < 1:
            raise LayoutError(f"n_kv_heads must be positive, got {self.n_kv_heads}")
        if self.dp < 1 or tp % self.dp:
            raise LayoutError(f"dp={self.dp} must divide tp={tp}")
        for r, slots in enumerate(self.slots):
            for h in slots:
                if h is not None and not (isinstance(h, int) and 0 <= h < self.n_kv_heads):
                    raise LayoutError(f"rank {r} names KV head {h!r}; heads are 0..{self.n_kv_heads - 1} or None")
        for g in range(self.dp):
            lost = [h for h in range(self.n_kv_heads) if not self.holders(h, g)]
            if lost:
                where = f" in batch group {g}" if self.dp > 1 else ""
                raise LayoutError(f"layout {self.name}: KV heads {_ranks(lost)} are held by no rank{where}")
        if self.rank_order is not None and sorted(self.rank_order) != list(range(tp)):
            raise LayoutError(f"rank order {list(self.rank_order)} is not a permutation of 0..{tp - 1}")


def _ranks(items: Sequence[int]) -> str:
    return ", ".join(str(i) for i in items)
