"""Shard a full KV cache by a layout, and rebuild it from shards while checking them.

Reconstruction never silently takes the first copy of a replicated head: it compares the
copies of every head with each other and every padding slot (or padded position) with zero,
per layer, tensor and head, and reports each disagreement with its location. A device bug
that corrupts one rank's copy shows up here, and with three or more copies the odd one out is
named and left out of the rebuilt cache.

Shards are `[batch, slots, seq, head_dim]` per layer and tensor (keys, values), the layout of
a transformers cache layer with the local heads of one rank.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, Protocol

import torch

from kvlab.layouts.layout import Layout, LayoutError
from kvlab.snapshot import Snapshot


KV = tuple[torch.Tensor, torch.Tensor]
TENSORS = ("keys", "values")


# ---- findings ----------------------------------------------------------------------------
@dataclass(frozen=True)
class Problem:
    """One located finding: a replica that disagrees, or padding that is not zero."""

    kind: Literal["replica", "padding"]
    layer: int
    tensor: str
    rank: int
    slot: int
    head: int | None
    max_abs: float
    position: int | None
    batch: int
    reference: tuple[int, int] | None = None  # (rank, slot) of the copy the others agree with
    copies: int = 0  # how many copies of these positions exist (replica findings)

    def message(self) -> str:
        where = f"layer {self.layer} {self.tensor}"
        at = f" (batch {self.batch}, position {self.position})" if self.position is not None else ""
        if self.kind == "replica":
            ref_rank, ref_slot = self.reference or (None, None)
            if self.copies == 2:
                return (f"{where} head {self.head}: rank {self.rank} slot {self.slot} and rank {ref_rank} slot "
                        f"{ref_slot} disagree by {self.max_abs:.3g}{at}; two copies, either may be wrong")
            return (f"{where} head {self.head}: rank {self.rank} slot {self.slot} differs by {self.max_abs:.3g}{at} "
                    f"from rank {ref_rank} slot {ref_slot}, the copy most of the {self.copies} copies agree with")
        return f"{where}: padding of rank {self.rank} slot {self.slot} is not zero (max abs {self.max_abs:.3g}){at}"

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["max_abs"] = json_number(self.max_abs)
        data["reference"] = list(self.reference) if self.reference is not None else None
        data["message"] = self.message()
        return data


@dataclass
class TensorCheck:
    """Checks of one (layer, tensor): largest replica disagreement per head, largest padding per rank."""

    replica_diff: list[float]
    padding_abs: list[float]
    problems: list[Problem] = field(default_factory=list)


@dataclass
class Reconstruction:
    """The full cache rebuilt from shards, and what the checks found on the way."""

    layout: Layout
    layers: list[KV]
    checks: list[dict[str, TensorCheck]]  # per layer, "keys" / "values"
    seq_len: int

    @property
    def problems(self) -> list[Problem]:
        return [p for layer in self.checks for check in layer.values() for p in check.problems]

    @property
    def replica_max_diff(self) -> float:
        """Largest disagreement between two copies of one head anywhere (0.0 when no head is replicated)."""
        return _max(v for layer in self.checks for check in layer.values() for v in check.replica_diff)

    @property
    def padding_max_abs(self) -> float:
        """Largest magnitude found in padding slots or padded positions (0.0 when there is none)."""
        return _max(v for layer in self.checks for check in layer.values() for v in check.padding_abs)

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        """`kvlab reconstruct --json`: the contract keys, then per-layer detail and the layer count."""
        return {
            "layout": self.layout.name,
            "tp": self.layout.tp,
            "replica_max_diff": json_number(self.replica_max_diff),
            "padding_max_abs": json_number(self.padding_max_abs),
            "problems": [p.to_dict() for p in self.problems],
            "ok": self.ok,
            "n_kv_heads": self.layout.n_kv_heads,
            "heads_by_rank": [list(self.layout.heads(r)) for r in range(self.layout.tp)],
            "dp": self.layout.dp,
            "seq_split": self.layout.seq_split,
            "rank_order": list(self.layout.rank_order) if self.layout.rank_order else None,
            "seq_len": self.seq_len,
            "layers": [
                {
                    "layer": i,
                    **{
                        name: {
                            "replica_max_diff_by_head": [json_number(v) for v in check.replica_diff],
                            "padding_max_abs_by_rank": [json_number(v) for v in check.padding_abs],
                        }
                        for name, check in layer.items()
                    },
                }
                for i, layer in enumerate(self.checks)
            ],
            "n_layers": len(self.layers),
        }

    def to_snapshot(self, meta: dict[str, Any] | None = None, logits: torch.Tensor | None = None) -> "Snapshot":
        """The rebuilt cache as a Snapshot; `meta` (e.g. rank 0's) gets `layout: null` and the check summary."""
        meta = {k: v for k, v in (meta or {}).items() if k not in ("format", "created", "n_layers")}
        meta["layout"] = None
        meta["reconstructed_from"] = {
            "layout": self.layout.name,
            "tp": self.layout.tp,
            "heads_by_rank": [list(self.layout.heads(r)) for r in range(self.layout.tp)],
            "replica_max_diff": json_number(self.replica_max_diff),
            "padding_max_abs": json_number(self.padding_max_abs),
            "n_problems": len(self.problems),
        }
        return Snapshot.from_layers(self.layers, meta, logits=logits)


def json_number(value: float) -> float | None:
    """Finite floats as they are; inf and nan as null (JSON has no such numbers; the problem's
    message says which it was)."""
    return value if value == value and abs(value) != float("inf") else None


def _max(values) -> float:
    best = 0.0
    for v in values:
        if v != v or v > best:  # nan wins: it is the worst finding
            best = v
            if v != v:
                break
    return best


# ---- one tensor --------------------------------------------------------------------------
def shard_tensor(full: torch.Tensor, layout: Layout) -> list[torch.Tensor]:
    """Split one `[batch, kv_heads, seq, head_dim]` tensor into the shard of each physical rank."""
    if full.dim() != 4:
        raise LayoutError(f"expected a [batch, kv_heads, seq, head_dim] tensor, got shape {tuple(full.shape)}")
    batch, kv, seq, dim = full.shape
    if kv != layout.n_kv_heads:
        raise LayoutError(f"the tensor has {kv} KV heads but layout {layout.name} is for {layout.n_kv_heads}")
    local = layout.local_seq_len(seq)
    slices = _slices([len(rows) for rows in torch.arange(batch).tensor_split(layout.dp)])
    parts: list[torch.Tensor | None] = [None] * layout.tp
    for logical, heads in enumerate(layout.slots):
        rows = full[slices[layout.batch_group(logical)]]
        out = rows.new_zeros((rows.shape[0], len(heads), local, dim))
        for slot, head in enumerate(heads):
            if head is None:
                continue
            if layout.seq_split:
                index, size = _place_in_group(layout, head, logical)
                span = rows[:, head, index::size]
                out[:, slot, : span.shape[1]] = span
            else:
                out[:, slot] = rows[:, head]
        parts[layout.physical(logical)] = out
    return parts  # type: ignore[return-value]


def merge_tensor(
    parts: Sequence[torch.Tensor],
    layout: Layout,
    *,
    seq_len: int | None = None,
    layer: int = 0,
    tensor: str = "keys",
    replica_atol: float = 0.0,
    padding_atol: float = 0.0,
) -> tuple[torch.Tensor, TensorCheck]:
    """Rebuild one tensor from the shard of each physical rank, checking replicas and padding.

    `seq_len` is the global sequence length: needed under a sequence split when the last
    positions are padding (default: every local position is real); without a split a shorter
    `seq_len` crops preallocated shards.
    """
    where = f"layer {layer} {tensor}"
    batch_sizes, local, dim = _check_shapes(parts, layout, where)
    seq = _global_seq_len(layout, local, seq_len, where)
    slices = _slices([batch_sizes[g] for g in range(layout.dp)])
    full = parts[0].new_zeros((sum(batch_sizes.values()), layout.n_kv_heads, seq, dim))
    check = TensorCheck([0.0] * layout.n_kv_heads, [0.0] * layout.tp)
    for group in range(layout.dp):
        found = _Findings(check, layer, tensor, slices[group].start)
        for head in range(layout.n_kv_heads):
            for index, size, copies in _copy_sets(layout, head, group):
                # positions index, index + size, ... of this head; every copy holds them all
                count = len(range(index, seq, size))
                tensors = [parts[rank][:, slot, :count] for rank, slot in copies]
                ref, errors = _majority(tensors, replica_atol)
                full[slices[group], head, index::size] = tensors[ref]
                for i, (worst, row, position) in enumerate(errors):
                    check.replica_diff[head] = _max([check.replica_diff[head], worst])
                    if i != ref and worst > replica_atol:
                        found.add("replica", copies[i], head, worst, row, index + position * size, copies[ref],
                                  len(copies))
                if count < local:  # the tail of a sequence split
                    for rank, slot in copies:
                        found.padding(parts[rank][:, slot, count:], rank, slot, padding_atol,
                                      lambda j, c=count, i=index, g=size: i + (c + j) * g)
        for logical in range(group * layout.group_size, (group + 1) * layout.group_size):
            rank = layout.physical(logical)
            for slot, head in enumerate(layout.slots[logical]):
                if head is None:
                    found.padding(parts[rank][:, slot], rank, slot, padding_atol, lambda j: j)
    return full, check


def _copy_sets(layout: Layout, head: int, group: int) -> list[tuple[int, int, list[tuple[int, int]]]]:
    """`(index, stride, [(rank, slot), ...])`: copies of positions index::stride of `head`.

    Without a sequence split every slot holding the head holds every position (one set);
    with one, the i-th rank sharing the head holds positions i::G in each of its slots.
    """
    holders = [(layout.physical(logical), slots) for logical, slots in layout.holders(head, group)]
    if not layout.seq_split:
        return [(0, 1, [(rank, slot) for rank, slots in holders for slot in slots])]
    return [(i, len(holders), [(rank, slot) for slot in slots]) for i, (rank, slots) in enumerate(holders)]


def _majority(copies: list[torch.Tensor], atol: float) -> tuple[int, list[tuple[float, int, int]]]:
    """Pick the copy most others agree with (the first on a tie) and each copy's distance to it.

    Compares with the first copy; only when more copies disagree with it than agree does it
    try the first disagreeing copy instead, so a single corrupted copy is named even when it
    comes first (with three or more copies).
    """
    def against(ref: int) -> list[tuple[float, int, int]]:
        return [(0.0, 0, 0) if i == ref else _worst(_abs_diff(c, copies[ref])) for i, c in enumerate(copies)]

    errors = against(0)
    agree = sum(1 for worst, _, _ in errors if worst <= atol)
    if agree * 2 < len(copies):
        other = next(i for i, (worst, _, _) in enumerate(errors) if worst > atol)
        retry = against(other)
        if sum(1 for worst, _, _ in retry if worst <= atol) > agree:
            return other, retry
    return 0, errors


def _check_shapes(parts: Sequence[torch.Tensor], layout: Layout, where: str) -> tuple[dict[int, int], int, int]:
    if len(parts) != layout.tp:
        raise LayoutError(f"{where}: {len(parts)} shards for layout {layout.name} with tp={layout.tp}")
    batch: dict[int, int] = {}
    first = parts[0]
    for rank, part in enumerate(parts):
        if part.dim() != 4:
            raise LayoutError(f"{where}: rank {rank} has shape {tuple(part.shape)}, expected "
                              "[batch, kv_heads, seq, head_dim]")
        want = len(layout.heads(rank))
        if part.shape[1] != want:
            raise LayoutError(f"{where}: rank {rank} holds {part.shape[1]} KV heads but layout {layout.name} "
                              f"(tp={layout.tp}, {layout.n_kv_heads} KV heads) puts {want} there: "
                              f"{list(layout.heads(rank))}")
        if part.shape[3] != first.shape[3]:
            raise LayoutError(f"{where}: head_dim differs: rank 0 has {first.shape[3]}, rank {rank} {part.shape[3]}")
        if part.shape[2] != first.shape[2]:
            raise LayoutError(f"{where}: mismatched seq lengths: rank 0 holds {first.shape[2]} positions, "
                              f"rank {rank} {part.shape[2]}")
        if part.dtype != first.dtype:
            raise LayoutError(f"{where}: dtype differs: rank 0 is {first.dtype}, rank {rank} {part.dtype}")
        group = layout.batch_group(layout.logical(rank))
        if batch.setdefault(group, part.shape[0]) != part.shape[0]:
            raise LayoutError(f"{where}: ranks of batch group {group} hold different batch sizes "
                              f"({batch[group]} and {part.shape[0]} on rank {rank})")
    return batch, first.shape[2], first.shape[3]


def _global_seq_len(layout: Layout, local: int, seq_len: int | None, where: str) -> int:
    if not layout.seq_split:
        if seq_len is not None and seq_len > local:
            raise LayoutError(f"{where}: seq_len {seq_len} is longer than the {local} positions the shards hold")
        return local if seq_len is None else seq_len
    if seq_len is None:
        fewest = min(len(layout.holders(h, g)) for g in range(layout.dp) for h in range(layout.n_kv_heads))
        return local * fewest
    if layout.local_seq_len(seq_len) > local:
        raise LayoutError(f"{where}: a sequence of {seq_len} split this way needs {layout.local_seq_len(seq_len)} "
                          f"positions per rank; the shards hold {local}")
    return seq_len


def _slices(sizes: Sequence[int]) -> list[slice]:
    """Contiguous batch slices of the given sizes, one per batch group."""
    out, start = [], 0
    for size in sizes:
        out.append(slice(start, start + size))
        start += size
    return out


def _place_in_group(layout: Layout, head: int, logical: int) -> tuple[int, int]:
    """(index of `logical` among the ranks of its batch group holding `head`, how many there are)."""
    holders = [r for r, _ in layout.holders(head, layout.batch_group(logical))]
    return holders.index(logical), len(holders)


def _abs_diff(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """|a - b| in at least float32, 0 where both are the same (NaN included), inf where one is NaN."""
    wide = torch.promote_types(a.dtype, torch.float32)
    a, b = a.to(wide), b.to(wide)
    diff = (a - b).abs()
    same = (a == b) | (a.isnan() & b.isnan())
    diff = diff.masked_fill(same, 0.0)
    return diff.nan_to_num(nan=float("inf"))


def _worst(values: torch.Tensor) -> tuple[float, int, int]:
    """(max, batch row, position) of a `[batch, seq, head_dim]` tensor of non-negative values."""
    if values.numel() == 0:
        return 0.0, 0, 0
    flat = int(values.reshape(-1).argmax())
    _, seq, dim = values.shape
    return float(values.reshape(-1)[flat]), flat // (seq * dim), (flat // dim) % seq


class _Findings:
    """Records problems of one (layer, tensor, batch group) into a TensorCheck."""

    def __init__(self, check: TensorCheck, layer: int, tensor: str, row0: int) -> None:
        self.check, self.layer, self.tensor, self.row0 = check, layer, tensor, row0

    def add(self, kind, where: tuple[int, int], head, worst: float, row: int, position: int | None,
            reference: tuple[int, int] | None = None, copies: int = 0) -> None:
        rank, slot = where
        self.check.problems.append(Problem(kind, self.layer, self.tensor, rank, slot, head, worst, position,
                                           self.row0 + row, reference, copies))

    def padding(self, values: torch.Tensor, rank: int, slot: int, atol: float,
                position_of: Callable[[int], int]) -> None:
        wide = values.to(torch.promote_types(values.dtype, torch.float32))
        worst, row, local = _worst(wide.abs().nan_to_num(nan=float("inf")))
        self.check.padding_abs[rank] = _max([self.check.padding_abs[rank], worst])
        if worst > atol:
            self.add("padding", (rank, slot), None, worst, row, position_of(local))


# ---- whole caches ------------------------------------------------------------------------
class ShardSet(Protocol):
    """Per-rank K/V by layer, read on demand (snapshots, files, in-memory lists)."""

    n_layers: int

    def layer(self, rank: int, index: int) -> KV: ...


class _Shards:
    """Per-rank layers of shard snapshots (read on demand) or of in-memory `(keys, values)` lists."""

    def __init__(self, shards: Sequence["Snapshot"] | Sequence[Sequence[KV]]) -> None:
        self._shards = shards
        counts = {s.n_layers if isinstance(s, Snapshot) else len(s) for s in shards}
        if len(counts) != 1:
            raise LayoutError(f"shards hold different numbers of layers: {sorted(counts)}")
        self.n_layers = counts.pop()

    def layer(self, rank: int, index: int) -> KV:
        shard = self._shards[rank]
        if isinstance(shard, Snapshot):
            return shard.layer(index)
        keys, values = shard[index]
        return keys, values


def shard(full, layout: Layout):
    """Shard a whole cache by `layout`, one entry per physical rank.

    full: a `[batch, kv, seq, dim]` tensor (-> list of tensors), a list of `(keys, values)` per
    layer (-> per rank, a list of `(keys, values)`), or a Snapshot (-> per rank, a shard Snapshot
    whose `meta.layout` says what it holds).
    """
    if isinstance(full, torch.Tensor):
        return shard_tensor(full, layout)
    if isinstance(full, Snapshot):
        return _shard_snapshot(full, layout)
    per_rank: list[list[KV]] = [[] for _ in range(layout.tp)]
    for keys, values in full:
        for rank, (k, v) in enumerate(zip(shard_tensor(keys, layout), shard_tensor(values, layout))):
            per_rank[rank].append((k, v))
    return per_rank


def _shard_snapshot(full: "Snapshot", layout: Layout) -> list["Snapshot"]:
    layers = [full.layer(i) for i in range(full.n_layers)]
    seq = layers[0][0].shape[2] if layers else 0
    per_rank = shard(layers, layout)
    base = {k: v for k, v in full.meta.items() if k not in ("format", "created", "n_layers")}
    logits = full.logits()
    return [
        Snapshot.from_layers(per_rank[rank], {**base, "layout": layout.rank_meta(rank, seq)}, logits=logits)
        for rank in range(layout.tp)
    ]


def layout_of(shards: Sequence["Snapshot"]) -> Layout:
    """The layout recorded in shard snapshots' `meta.layout` (rank from each block)."""
    metas = {}
    for position, snap in enumerate(shards):
        block = snap.layout
        if not block:
            raise LayoutError(f"shard {position} has no layout metadata: give the layout explicitly")
        rank = int(block.get("rank", -1))
        if rank in metas:
            raise LayoutError(f"two shards claim rank {rank}")
        metas[rank] = block
    return Layout.from_rank_metas(metas)


def reconstruct(
    shards,
    layout: Layout | None = None,
    *,
    seq_len: int | None = None,
    replica_atol: float = 0.0,
    padding_atol: float = 0.0,
    on_layer: Callable[[int], None] | None = None,
) -> Reconstruction:
    """Rebuild every layer's K and V from per-rank shards, checking replicas and padding.

    shards: shard Snapshots (the layout may then come from their metadata, and they are put in
    rank order), per-rank lists of `(keys, values)` indexed by physical rank, or a `ShardSet`.
    A copy differing by more than `replica_atol` from the one most copies match (the first on a
    tie, which is what the rebuilt cache holds), or padding larger than `padding_atol`, is a
    Problem.
    """
    if isinstance(shards, Sequence) and shards and all(isinstance(s, Snapshot) for s in shards):
        if layout is None or all(s.layout for s in shards):
            recorded = layout_of(shards)
            if layout is not None and layout.placement() != recorded.placement():
                raise LayoutError(f"the shards were written with layout {recorded.name} ({recorded.describe()}), "
                                  f"not {layout.name} ({layout.describe()})")
            layout = recorded
            shards = sorted(shards, key=lambda s: int(s.layout["rank"]))
            if seq_len is None:
                seq_len = shards[0].layout.get("seq_len")
    source: ShardSet = shards if hasattr(shards, "layer") and hasattr(shards, "n_layers") else _Shards(shards)
    if layout is None:
        raise LayoutError("reconstruct needs a layout (or shard snapshots that record theirs)")

    layers: list[KV] = []
    checks: list[dict[str, TensorCheck]] = []
    seq = 0
    for index in range(source.n_layers):
        per_rank = [source.layer(rank, index) for rank in range(layout.tp)]
        merged, layer_checks = [], {}
        for position, name in enumerate(TENSORS):
            tensor, check = merge_tensor([kv[position] for kv in per_rank], layout, seq_len=seq_len, layer=index,
                                         tensor=name, replica_atol=replica_atol, padding_atol=padding_atol)
            merged.append(tensor)
            layer_checks[name] = check
        if merged[0].shape != merged[1].shape:
            raise LayoutError(f"layer {index}: keys {tuple(merged[0].shape)} and values {tuple(merged[1].shape)} "
                              "have different shapes")
        seq = merged[0].shape[2]
        layers.append((merged[0], merged[1]))
        checks.append(layer_checks)
        if on_layer is not None:
            on_layer(1)
    return Reconstruction(layout=layout, layers=layers, checks=checks, seq_len=seq)

