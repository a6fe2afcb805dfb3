"""Read per-rank KV shards written by other tools (or by kvlab) from a directory.

A shard directory holds one entry per rank: a kvlab shard snapshot folder, a safetensors
file, or a torch `.pt`/`.pth`/`.bin` file holding a dict of tensors. The rank is read from the
entry's name: the digits after "rank" (`rank3.safetensors`, `tp_rank-3.pt`), else the last
number in the name (`shard_3.pt`). Tensor names follow a pattern with one layer placeholder,
`{layer}`, `{2*layer}`, `{2*layer+1}`, ...; presets:

    kvlab   layers.{layer}.keys,layers.{layer}.values
    nxdi    kv_mgr.past_key_values.{2*layer},kv_mgr.past_key_values.{2*layer+1}

Tensors are read lazily, one layer at a time.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from kvlab.errors import first_line
from kvlab.layouts.layout import Layout, LayoutError
from kvlab.layouts.reconstruct import KV, Reconstruction, reconstruct
from kvlab.snapshot import Snapshot, read_meta

PRESETS = {
    "kvlab": "layers.{layer}.keys,layers.{layer}.values",
    "nxdi": "kv_mgr.past_key_values.{2*layer},kv_mgr.past_key_values.{2*layer+1}",
}
FILE_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")
_PLACEHOLDER = re.compile(r"\{(?:(\d+)\*)?layer(?:\+(\d+))?\}")
_RANK = re.compile(r"rank[_-]?(\d+)", re.IGNORECASE)
_NUMBER = re.compile(r"\d+")


class ShardFileError(LayoutError):
    """A shard directory or file that cannot be read as per-rank KV shards."""


@dataclass(frozen=True)
class NamePattern:
    """How a layer's keys and values are named in a shard file."""

    keys: str
    values: str

    @classmethod
    def parse(cls, text: str) -> "NamePattern":
        """A preset name or `KEYS_PATTERN,VALUES_PATTERN`, each with one layer placeholder."""
        text = PRESETS.get(text.strip(), text.strip())
        parts = [p.strip() for p in text.split(",")]
        if len(parts) != 2 or not all(parts):
            raise ShardFileError(f"pattern {text!r}: give a preset ({', '.join(PRESETS)}) or KEYS,VALUES such as "
                                 "'cache.{layer}.k,cache.{layer}.v'")
        for part in parts:
            if len(_PLACEHOLDER.findall(part)) != 1:
                raise ShardFileError(f"pattern {part!r} needs exactly one layer placeholder: "
                                     "{layer}, {2*layer}, {2*layer+1}, ...")
        return cls(parts[0], parts[1])

    def name(self, kind: int, layer: int) -> str:
        """The tensor name of `layer`'s keys (kind 0) or values (kind 1)."""

        def fill(match: re.Match) -> str:
            scale, offset = int(match.group(1) or 1), int(match.group(2) or 0)
            return str(scale * layer + offset)

        return _PLACEHOLDER.sub(fill, (self.keys, self.values)[kind])

    def layers(self, names, kind: int) -> set[int]:
        """Layers whose `kind` tensor is among `names`."""
        pattern = (self.keys, self.values)[kind]
        match = _PLACEHOLDER.search(pattern)
        assert match is not None
        scale, offset = int(match.group(1) or 1), int(match.group(2) or 0)
        regex = re.compile(re.escape(pattern[: match.start()]) + r"(\d+)" + re.escape(pattern[match.end():]) + "$")
        found = set()
        for name in names:
            m = regex.match(name)
            if m and (int(m.group(1)) - offset) % scale == 0 and int(m.group(1)) >= offset:
                found.add((int(m.group(1)) - offset) // scale)
        return found

    def __str__(self) -> str:
        return f"{self.keys},{self.values}"


class _Reader:
    """Named tensors of one rank's file or snapshot folder, read on demand."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.meta: dict[str, Any] | None = None
        self.snapshot: Snapshot | None = None
        if path.is_dir():
            snap = Snapshot.load(path)
            self.meta = snap.meta
            self._get = snap.tensor
            self.names = snap.tensor_names()
            self.snapshot = snap
        elif path.suffix == ".safetensors":
            from safetensors import SafetensorError, safe_open

            try:
                handle = safe_open(str(path), framework="pt")
            except (SafetensorError, OSError) as err:
                raise ShardFileError(f"{path} is not a readable safetensors file ({first_line(err)})") from None
            self.names = list(handle.keys())
            self._get = handle.get_tensor
        else:
            tensors = _load_torch(path)
            self.names = list(tensors)
            self._get = tensors.__getitem__

    def get(self, name: str) -> torch.Tensor:
        if name not in self.names:
            raise ShardFileError(f"{self.path.name} has no tensor {name}")
        return self._get(name)


def _load_torch(path: Path) -> dict[str, torch.Tensor]:
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for a foreign or truncated file
        raise ShardFileError(f"{path} is not a readable torch file ({first_line(err)})") from None
    flat: dict[str, torch.Tensor] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, torch.Tensor):
            flat[prefix] = value
        elif isinstance(value, Mapping):
            for key, item in value.items():
                walk(f"{prefix}.{key}" if prefix else str(key), item)
        elif isinstance(value, (list, tuple)):
            for i, item in enumerate(value):
                walk(f"{prefix}.{i}" if prefix else str(i), item)

    walk("", data)
    if not flat:
        raise ShardFileError(f"{path} holds no tensors (expected a dict of name -> tensor)")
    return flat


def rank_of(name: str) -> int:
    """The rank in a file or folder name: digits after 'rank', else the last number."""
    stem = name
    for suffix in FILE_SUFFIXES:
        stem = stem.removesuffix(suffix)
    match = _RANK.search(stem)
    if match:
        return int(match.group(1))
    numbers = _NUMBER.findall(stem)
    if not numbers:
        raise ShardFileError(f"cannot read a rank from the name {name!r}: name shards like rank0.safetensors")
    return int(numbers[-1])


class ShardDir:
    """The per-rank shards of a directory, as a ShardSet for `reconstruct`."""

    def __init__(
        self,
        path: str | Path,
        *,
        tp: int | None = None,
        pattern: str | None = None,
        transpose_keys: bool = False,
    ) -> None:
        self.path = Path(path)
        self.transpose_keys = transpose_keys
        self.files = _rank_entries(self.path)
        ranks = sorted(self.files)
        if tp is None:
            snapshot_tp = _recorded_tp(self.files)
            tp = snapshot_tp if snapshot_tp is not None else len(ranks)
        missing = [r for r in range(tp) if r not in self.files]
        extra = [r for r in ranks if r >= tp]
        if missing:
            raise ShardFileError(f"{self.path}: missing rank {_list(missing)} for tp={tp} (found ranks {_list(ranks)})")
        if extra:
            raise ShardFileError(f"{self.path}: rank {_list(extra)} is beyond tp={tp} (ranks are 0..{tp - 1})")
        self.tp = tp
        self.readers = [_Reader(self.files[r]) for r in range(tp)]
        self.pattern = NamePattern.parse(pattern) if pattern else self._detect_pattern()
        self.n_layers = self._count_layers()

    @property
    def layout_metas(self) -> dict[int, dict[str, Any]] | None:
        """The `layout` block of every rank when all shards are kvlab shard snapshots."""
        metas = {r: (reader.meta or {}).get("layout") for r, reader in enumerate(self.readers)}
        if not all(metas.values()):
            return None
        for rank, meta in metas.items():
            if int(meta.get("rank", -1)) != rank:
                raise ShardFileError(f"{self.files[rank].name} is named as rank {rank} but its metadata says "
                                     f"rank {meta.get('rank')}")
        return metas  # type: ignore[return-value]

    @property
    def meta(self) -> dict[str, Any] | None:
        """Rank 0's snapshot metadata, when the shards are kvlab snapshots."""
        return self.readers[0].meta

    def logits(self) -> torch.Tensor | None:
        snap = self.readers[0].snapshot
        return snap.logits() if snap is not None else None

    def layer(self, rank: int, index: int) -> KV:
        reader = self.readers[rank]
        keys = reader.get(self.pattern.name(0, index))
        values = reader.get(self.pattern.name(1, index))
        if self.transpose_keys:
            if keys.dim() != 4:
                raise ShardFileError(f"{reader.path.name}: keys of layer {index} have shape {tuple(keys.shape)}; "
                                     "transposed keys are [batch, heads, head_dim, seq]")
            keys = keys.transpose(2, 3)
        return keys, values

    def _detect_pattern(self) -> NamePattern:
        names = self.readers[0].names
        for preset in PRESETS.values():
            pattern = NamePattern.parse(preset)
            if pattern.layers(names, 0):
                return pattern
        shown = ", ".join(sorted(names)[:6]) + (", ..." if len(names) > 6 else "")
        raise ShardFileError(f"{self.files[0].name}: no tensor follows a known naming ({', '.join(PRESETS)}); "
                             f"its tensors are {shown}: give --pattern KEYS,VALUES")

    def _count_layers(self) -> int:
        counts = {}
        for rank, reader in enumerate(self.readers):
            keys, values = self.pattern.layers(reader.names, 0), self.pattern.layers(reader.names, 1)
            name = self.files[rank].name
            if not keys:
                raise ShardFileError(f"{name}: no tensor matches the keys pattern {self.pattern.keys}")
            n = max(keys) + 1
            for layer in range(n):
                for kind, found in ((0, keys), (1, values)):
                    if layer not in found:
                        raise ShardFileError(f"{name} has no tensor {self.pattern.name(kind, layer)} "
                                             f"(layer {layer} {('keys', 'values')[kind]})")
            counts[rank] = n
        if len(set(counts.values())) != 1:
            detail = ", ".join(f"rank {r}: {n}" for r, n in counts.items())
            raise ShardFileError(f"{self.path}: ranks hold different numbers of layers ({detail})")
        return counts[0]


def _rank_entries(path: Path) -> dict[int, Path]:
    if not path.is_dir():
        raise ShardFileError(f"{path} is not a directory of per-rank shards")
    candidates = [p for p in sorted(path.iterdir())
                  if (p.is_dir() and (p / "meta.json").is_file()) or (p.is_file() and p.suffix in FILE_SUFFIXES)]
    if any(p.is_dir() for p in candidates):
        candidates = [p for p in candidates if p.is_dir()]
    if not candidates:
        raise ShardFileError(f"{path} holds no shard: expected kvlab shard snapshots or "
                             f"{'/'.join(FILE_SUFFIXES)} files, one per rank")
    found: dict[int, Path] = {}
    for entry in candidates:
        rank = rank_of(entry.name)
        if rank in found:
            raise ShardFileError(f"{path}: rank {rank} appears twice ({found[rank].name} and {entry.name})")
        found[rank] = entry
    return found


def _recorded_tp(files: dict[int, Path]) -> int | None:
    first = files[min(files)]
    if not first.is_dir():
        return None
    layout = read_meta(first).get("layout") or {}
    return int(layout["tp"]) if "tp" in layout else None


def reconstruct_dir(
    path: str | Path,
    layout: Layout | None = None,
    *,
    pattern: str | None = None,
    seq_len: int | None = None,
    transpose_keys: bool = False,
    replica_atol: float = 0.0,
    padding_atol: float = 0.0,
    on_layer=None,
) -> tuple[Reconstruction, ShardDir]:
    """Rebuild the full cache from a shard directory; the layout comes from kvlab shards' metadata if not given."""
    shards = ShardDir(path, tp=layout.tp if layout is not None else None, pattern=pattern,
                      transpose_keys=transpose_keys)
    recorded = shards.layout_metas
    if recorded is not None:
        own = Layout.from_rank_metas(recorded)
        if layout is not None and layout.placement() != own.placement():
            raise LayoutError(f"{path} was written with layout {own.name} ({own.describe()}), "
                              f"not {layout.name} ({layout.describe()})")
        layout = layout or own
        if seq_len is None:
            seq_len = recorded[0].get("seq_len")
    if layout is None:
        raise LayoutError(f"{path}: the shards record no layout: give --layout, --heads, --kv-heads and --tp")
    result = reconstruct(shards, layout, seq_len=seq_len, replica_atol=replica_atol, padding_atol=padding_atol,
                         on_layer=on_layer)
    return result, shards


def imported_meta(shards: ShardDir) -> dict[str, Any]:
    """Metadata for the rebuilt snapshot: rank 0's own for kvlab shards, the source otherwise."""
    if shards.meta is not None:
        return dict(shards.meta)
    return {
        "model": {"spec": None},
        "run": "",
        "token_ids": [],
        "n_prompt": 0,
        "imported_from": {
            "dir": str(shards.path),
            "pattern": str(shards.pattern),
            "files": {str(rank): path.name for rank, path in sorted(shards.files.items())},
        },
    }


def _list(items) -> str:
    return ", ".join(str(i) for i in items)
