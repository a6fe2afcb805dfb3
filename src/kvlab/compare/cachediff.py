"""Stream two caches layer by layer into error maps per (layer, KV head, position).

Only one layer's keys (then values) of each snapshot are in memory at a time, and the float64
arithmetic runs over bounded chunks of positions, so the peak stays near one layer of each
snapshot whatever the cache size. What is kept is small: three float32 maps `[layers, heads,
positions]` per tensor (1/head_dim of the cache each) and float64 sums per (layer, head) from
which the whole-layer and whole-head figures follow exactly.

A NaN or Inf in either cache does not stop the diff: its rows get rel-L2 = max abs = inf and
cosine = NaN in the maps, are left out of the sums, and are listed with their location.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from kvlab.compare.metrics import Errors, rel_l2_and_cosine, row_sums
from kvlab.compare.source import TENSORS, SnapshotSource

CHUNK_ELEMENTS = 1 << 18  # elements of one float64 temporary (2 MiB); three live at once
MAX_NONFINITE_LISTED = 100
_SUMS = ("diff_sq", "golden_sq", "test_sq", "dot", "max_abs")


@dataclass(frozen=True)
class NonFinite:
    """A cache row (one layer, head, position of K or V) holding NaN or Inf."""

    snapshot: str  # "golden" | "test"
    tensor: str  # "keys" | "values"
    layer: int
    head: int
    position: int
    count: int  # non-finite elements in the row (over batch rows too)

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass(frozen=True)
class Divergence:
    """Where a test cache first leaves the tolerance, in the order the model computes it: the
    earliest position, then the lowest layer over the tolerance there (keys before values), its
    worst KV head. `worst` is the largest row at that position, often a deeper layer the error
    has grown into by then."""

    position: int
    layer: int
    head: int
    tensor: str
    error: float  # rel-L2 of that row; inf for a non-finite row
    nonfinite: bool = False
    worst: "Divergence | None" = None

    def to_dict(self) -> dict:
        out = {
            "position": self.position, "layer": self.layer, "head": self.head, "tensor": self.tensor,
            "error": self.error if not self.nonfinite else None, "nonfinite": self.nonfinite,
        }
        if self.worst is not None:
            out["worst"] = self.worst.to_dict()
        return out


@dataclass
class CacheDiff:
    """Error maps and sums of a test cache against a golden one."""

    maps: dict[str, dict[str, torch.Tensor]]  # tensor -> metric -> [layers, heads, positions] float32
    sums: dict[str, dict[str, torch.Tensor]]  # tensor -> sum -> [layers, heads] float64 (finite rows)
    nonfinite: list[NonFinite] = field(default_factory=list)
    nonfinite_rows: int = 0

    @property
    def n_layers(self) -> int:
        return int(self.maps["keys"]["rel_l2"].shape[0])

    @property
    def n_positions(self) -> int:
        return int(self.maps["keys"]["rel_l2"].shape[2])

    def head_errors(self, tensor: str) -> list[list[Errors]]:
        """Errors of each (layer, head) over all its positions, `[layer][head]`."""
        return _errors(self.sums[tensor], dims=())

    def layer_errors(self, tensor: str) -> list[Errors]:
        """Errors of each whole layer (all heads and positions)."""
        return _errors(self.sums[tensor], dims=(1,))

    def total_errors(self, tensor: str) -> Errors:
        """Errors of the whole cache."""
        return _errors(self.sums[tensor], dims=(0, 1))

    def position_max(self, tensor: str) -> torch.Tensor:
        """Largest rel-L2 over layers and heads at each position, `[positions]`."""
        return self.maps[tensor]["rel_l2"].amax(dim=(0, 1))

    def first_divergence(self, tol: float) -> Divergence | None:
        """Earliest position where any layer/head has rel-L2 > tol (or is non-finite), then the first
        layer over the tolerance there in computation order (lower layers first, keys before
        values) and its worst head; `worst` names the largest row at that position.

        Errors flow upwards through the layers at a position, so the lowest layer that leaves the
        tolerance is where it starts (a wrong RoPE shows in layer 0's keys even when deeper
        layers have grown larger errors from it by then).
        """
        exceeding = [self._exceeds(t, tol).any(dim=(0, 1)) for t in TENSORS]
        hits = torch.nonzero(exceeding[0] | exceeding[1])
        if not len(hits):
            return None
        position = int(hits[0])
        columns = {}
        worst: Divergence | None = None
        for tensor in TENSORS:
            column = self.maps[tensor]["rel_l2"][:, :, position].to(torch.float64)
            column = torch.where(column.isnan(), float("inf"), column)
            columns[tensor] = column
            flat = int(torch.argmax(column))
            layer, head = divmod(flat, column.shape[1])
            value = float(column[layer, head])
            if worst is None or value > worst.error:
                worst = Divergence(position, layer, head, tensor, value, nonfinite=value == float("inf"))
        for layer in range(self.n_layers):
            for tensor in TENSORS:
                row = columns[tensor][layer]
                if bool((row > tol).any()):
                    head = int(torch.argmax(row))
                    value = float(row[head])
                    return Divergence(position, layer, head, tensor, value, nonfinite=value == float("inf"),
                                      worst=worst)
        return worst

    def _exceeds(self, tensor: str, tol: float) -> torch.Tensor:
        rel = self.maps[tensor]["rel_l2"]
        return (rel > tol) | rel.isnan()


def diff_caches(
    golden: SnapshotSource,
    test: SnapshotSource,
    n_layers: int,
    *,
    on_layer: Callable[[int], None] | None = None,
) -> CacheDiff:
    """Error maps of `test` against `golden`, read one layer and one tensor at a time."""
    maps: dict[str, dict[str, torch.Tensor]] = {}
    sums: dict[str, dict[str, torch.Tensor]] = {}
    listed: list[NonFinite] = []
    bad_rows = 0
    with one_thread():
        for layer in range(n_layers):
            for tensor in TENSORS:
                g = golden.tensor(layer, tensor)
                t = test.tensor(layer, tensor)
                if tensor not in maps:
                    maps[tensor], sums[tensor] = _allocate(n_layers, g.shape)
                bad_rows += _diff_layer(g, t, layer, tensor, maps[tensor], sums[tensor], listed)
                del g, t
            if on_layer is not None:
                on_layer(1)
    if not maps:
        raise ValueError("no layers to diff")
    return CacheDiff(maps=maps, sums=sums, nonfinite=listed, nonfinite_rows=bad_rows)


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Run torch on one intra-op thread for the block, then restore the caller's setting.

    A chunk is a few memory-bound passes over a few MiB: a second thread barely speeds them
    up, and on a busy machine threads spinning at every op's barrier cost 5-10x the CPU time
    (bench/diff_throughput.py: 0.5 s of CPU on one thread, 4-6 s on two).
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _allocate(n_layers: int, shape: tuple[int, ...]):
    _, heads, positions, _ = shape
    maps = {m: torch.zeros(n_layers, heads, positions, dtype=torch.float32) for m in ("max_abs", "rel_l2", "cosine")}
    sums = {s: torch.zeros(n_layers, heads, dtype=torch.float64) for s in _SUMS}
    return maps, sums


def _diff_layer(g, t, layer, tensor, maps, sums, listed: list[NonFinite]) -> int:
    """Fill one layer's rows of the maps and sums; returns how many rows were non-finite."""
    batch, heads, positions, dim = g.shape
    step = max(1, CHUNK_ELEMENTS // max(1, batch * heads * dim))
    bad_rows = 0
    for start in range(0, positions, step):
        stop = min(positions, start + step)
        gc, tc = g[:, :, start:stop], t[:, :, start:stop]
        rows = row_sums(gc, tc)
        rel, cosine = rel_l2_and_cosine(rows.diff_sq, rows.golden_sq, rows.test_sq, rows.dot)
        max_abs = rows.max_abs
        golden_bad = ~torch.isfinite(rows.golden_sq)
        test_bad = ~torch.isfinite(rows.test_sq)
        bad = golden_bad | test_bad
        finite = ~bad
        if bool(bad.any()):
            inf = torch.tensor(float("inf"), dtype=torch.float64)
            rel = torch.where(bad, inf, rel)
            max_abs = torch.where(bad, inf, max_abs)
            cosine = torch.where(bad, torch.full_like(cosine, float("nan")), cosine)
            bad_rows += int(bad.any(dim=0).sum())
            _record(gc, golden_bad, "golden", tensor, layer, start, listed)
            _record(tc, test_bad, "test", tensor, layer, start, listed)
        maps["rel_l2"][layer, :, start:stop] = rel.amax(dim=0).float()
        maps["max_abs"][layer, :, start:stop] = max_abs.amax(dim=0).float()
        maps["cosine"][layer, :, start:stop] = cosine.amin(dim=0).float()
        for name in ("diff_sq", "golden_sq", "test_sq", "dot"):
            sums[name][layer] += torch.where(finite, getattr(rows, name), 0.0).sum(dim=(0, 2))
        chunk_max = torch.where(finite, rows.max_abs, 0.0).amax(dim=(0, 2))
        sums["max_abs"][layer] = torch.maximum(sums["max_abs"][layer], chunk_max)
    return bad_rows


def _record(chunk: torch.Tensor, bad: torch.Tensor, snapshot: str, tensor: str, layer: int, start: int,
            listed: list[NonFinite]) -> None:
    if len(listed) >= MAX_NONFINITE_LISTED or not bool(bad.any()):
        return
    counts = (~torch.isfinite(chunk)).sum(dim=-1).sum(dim=0)  # [heads, positions]
    for head, position in torch.nonzero(bad.any(dim=0)).tolist():
        if len(listed) >= MAX_NONFINITE_LISTED:
            return
        listed.append(NonFinite(snapshot, tensor, layer, head, start + position, int(counts[head, position])))


def _errors(sums: dict[str, torch.Tensor], dims: tuple[int, ...]):
    """Errors from summed squares, reduced over `dims` of `[layers, heads]`; nested lists or one Errors."""
    if dims:
        reduced = {name: (t.amax(dim=dims) if name == "max_abs" else t.sum(dim=dims)) for name, t in sums.items()}
    else:
        reduced = sums
    rel, cosine = rel_l2_and_cosine(reduced["diff_sq"], reduced["golden_sq"], reduced["test_sq"], reduced["dot"])
    max_abs = reduced["max_abs"]

    def build(index: tuple[int, ...]) -> Errors:
        return Errors(max_abs=float(max_abs[index]), rel_l2=float(rel[index]), cosine=float(cosine[index]))

    if rel.dim() == 0:
        return build(())
    if rel.dim() == 1:
        return [build((i,)) for i in range(rel.shape[0])]
    return [[build((i, j)) for j in range(rel.shape[1])] for i in range(rel.shape[0])]
