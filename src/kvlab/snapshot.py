"""Snapshot: one captured KV cache plus what produced it, as a folder on disk.

    DIR/kv.safetensors      layers.{i}.keys / layers.{i}.values  [batch, kv_heads, seq, head_dim]
                            (+ optional raw payloads such as layers.{i}.keys.q)
    DIR/meta.json           format, model, run, token ids, per-step top-k logits, layout, ...
    DIR/logits.safetensors  `logits` [steps, vocab] float32: the full last-position logits

Loading is lazy: the safetensors file is memory-mapped and a layer is read only when asked
for, so tools can stream multi-GB caches layer by layer. Saving is atomic.
"""

from __future__ import annotations

import datetime as _dt
import json
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from kvlab.atomic import atomic_dir
from kvlab.errors import KvlabError, first_line
from kvlab.version import __version__

FORMAT_NAME = "kvlab.snapshot"
FORMAT_VERSION = 1
FORMAT = f"{FORMAT_NAME}/{FORMAT_VERSION}"
KV_FILE = "kv.safetensors"
META_FILE = "meta.json"
LOGITS_FILE = "logits.safetensors"


class SnapshotError(KvlabError):
    """A snapshot that is missing, truncated, foreign or from a newer kvlab."""


def key_name(layer: int) -> str:
    return f"layers.{layer}.keys"


def value_name(layer: int) -> str:
    return f"layers.{layer}.values"


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


class Snapshot:
    """A captured cache: K/V per layer, token ids, per-step logits and metadata.

    Build one in memory with `Snapshot.from_layers`, or open one from disk with `Snapshot.load`.
    """

    def __init__(
        self,
        meta: dict[str, Any],
        tensors: Mapping[str, torch.Tensor] | None = None,
        logits: torch.Tensor | None = None,
        *,
        path: Path | None = None,
        reader: Any = None,
    ) -> None:
        self.meta = meta
        self.path = path
        self._tensors = dict(tensors) if tensors is not None else None
        self._logits = logits
        self._reader = reader

    # ---- construction ----------------------------------------------------------------------
    @classmethod
    def from_layers(
        cls,
        layers: list[tuple[torch.Tensor, torch.Tensor]],
        meta: dict[str, Any],
        extras: Mapping[str, torch.Tensor] | None = None,
        logits: torch.Tensor | None = None,
    ) -> "Snapshot":
        """An in-memory snapshot; `meta` gets the format fields filled in."""
        tensors: dict[str, torch.Tensor] = {}
        for i, (keys, values) in enumerate(layers):
            tensors[key_name(i)] = keys.detach()
            tensors[value_name(i)] = values.detach()
        for name, tensor in (extras or {}).items():
            tensors[name] = tensor.detach()
        full = {"format": FORMAT, "created": now_iso(), **meta, "n_layers": len(layers)}
        full.setdefault("kvlab_version", __version__)
        return cls(full, tensors, logits)

    @classmethod
    def load(cls, path: str | Path) -> "Snapshot":
        """Open a snapshot folder lazily; any problem is one SnapshotError line."""
        from safetensors import SafetensorError, safe_open

        path = Path(path)
        if not path.exists():
            raise SnapshotError(f"no snapshot at {path}")
        if not path.is_dir():
            raise SnapshotError(f"{path} is a file; a snapshot is a folder holding {KV_FILE} and {META_FILE}")
        meta = read_meta(path)
        kv_path = path / KV_FILE
        if not kv_path.is_file():
            raise SnapshotError(f"{path}: {KV_FILE} is missing")
        try:
            reader = safe_open(str(kv_path), framework="pt")
        except (SafetensorError, OSError) as err:
            raise SnapshotError(f"{kv_path} is truncated or corrupt ({first_line(err)})") from None
        header = reader.metadata() or {}
        fmt = str(header.get("format", ""))
        if fmt.startswith(FORMAT_NAME + "/") and fmt != FORMAT:
            raise SnapshotError(f"{kv_path} was written by a newer kvlab ({fmt}); this kvlab reads {FORMAT}")
        names = set(reader.keys())
        n_layers = meta.get("n_layers")
        if not isinstance(n_layers, int) or n_layers < 0:
            raise SnapshotError(f"{path}/{META_FILE} has no valid n_layers")
        for i in range(n_layers):
            for name in (key_name(i), value_name(i)):
                if name not in names:
                    raise SnapshotError(f"{kv_path} has no tensor {name} (meta.json says {n_layers} layers)")
        if fmt != FORMAT:  # written by another tool: trust the tensors only after checking them
            check_cache_tensors(kv_path, n_layers, lambda name: tuple(reader.get_slice(name).get_shape()),
                                lambda name: reader.get_slice(name).get_dtype(), meta.get("model") or {})
        return cls(meta, path=path, reader=reader)

    # ---- reading ---------------------------------------------------------------------------
    @property
    def n_layers(self) -> int:
        return int(self.meta["n_layers"])

    @property
    def token_ids(self) -> list[int]:
        return list(self.meta.get("token_ids", []))

    @property
    def n_prompt(self) -> int:
        return int(self.meta.get("n_prompt", 0))

    @property
    def run(self) -> str:
        return str(self.meta.get("run", ""))

    @property
    def model(self) -> dict[str, Any]:
        return dict(self.meta.get("model", {}))

    @property
    def layout(self) -> dict[str, Any] | None:
        return self.meta.get("layout")

    @property
    def greedy_ids(self) -> list[int]:
        """The model's own argmax at each step (differs from the fed token under teacher forcing)."""
        return list(self.meta.get("greedy_ids", []))

    def tensor_names(self) -> list[str]:
        if self._tensors is not None:
            return list(self._tensors)
        return list(self._reader.keys())

    def tensor(self, name: str) -> torch.Tensor:
        """One stored tensor, read from disk on demand."""
        if self._tensors is not None:
            if name not in self._tensors:
                raise SnapshotError(f"snapshot has no tensor {name}")
            return self._tensors[name]
        if name not in set(self._reader.keys()):
            raise SnapshotError(f"{self.path} has no tensor {name}")
        return self._reader.get_tensor(name)

    def shape(self, layer: int) -> tuple[int, ...]:
        """Shape of layer `layer`'s keys without reading them."""
        self._check_layer(layer)
        if self._tensors is not None:
            return tuple(self._tensors[key_name(layer)].shape)
        return tuple(self._reader.get_slice(key_name(layer)).get_shape())

    def keys(self, layer: int) -> torch.Tensor:
        self._check_layer(layer)
        return self.tensor(key_name(layer))

    def values(self, layer: int) -> torch.Tensor:
        self._check_layer(layer)
        return self.tensor(value_name(layer))

    def layer(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.keys(layer), self.values(layer)

    def cache_nbytes(self) -> int:
        """Bytes the run's cache held: for a quantized tensor (one with a raw payload `.q`) the payload,
        its parts and its full-precision window, not the dequantized view; else the tensor itself."""
        names = set(self.tensor_names())
        total = 0
        for layer in range(self.n_layers):
            for base in (key_name(layer), value_name(layer)):
                if f"{base}.q" in names:
                    total += sum(self.tensor(n).nbytes for n in names if n.startswith(f"{base}."))
                else:
                    total += self.tensor(base).nbytes
        return total

    def logits(self) -> torch.Tensor | None:
        """Full last-position logits per step, `[steps, vocab]` float32, or None if not recorded."""
        if self._logits is not None:
            return self._logits
        if self.path is None or not (self.path / LOGITS_FILE).is_file():
            return None
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            self._logits = load_file(str(self.path / LOGITS_FILE))["logits"]
        except (SafetensorError, OSError, KeyError) as err:
            raise SnapshotError(f"{self.path / LOGITS_FILE} is truncated or corrupt ({first_line(err)})") from None
        return self._logits

    def _check_layer(self, layer: int) -> None:
        if not 0 <= layer < self.n_layers:
            raise SnapshotError(f"layer {layer} out of range: snapshot has {self.n_layers} layers")

    # ---- writing ---------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Write atomically to `path` (a folder); an existing snapshot there is replaced."""
        from safetensors.torch import save_file

        path = check_snapshot_target(path)
        with atomic_dir(path) as tmp:
            if self._tensors is None and self.path is not None:
                shutil.copyfile(self.path / KV_FILE, tmp / KV_FILE)
            else:
                save_file(_unshared(self._tensors), str(tmp / KV_FILE), metadata={"format": FORMAT})
            logits = self.logits()
            if logits is not None:
                save_file({"logits": logits.float().contiguous()}, str(tmp / LOGITS_FILE), metadata={"format": FORMAT})
            (tmp / META_FILE).write_text(json.dumps(self.meta, indent=1) + "\n")
        return path

    def __repr__(self) -> str:
        where = f" at {self.path}" if self.path else ""
        return f"Snapshot({self.n_layers} layers, {len(self.token_ids)} tokens, run={self.run!r}{where})"


def check_snapshot_target(path: str | Path) -> Path:
    """`path` may become a snapshot: it is new, an empty folder or a snapshot (which is replaced)."""
    path = Path(path)
    if path.exists() and (not path.is_dir() or (any(path.iterdir()) and not (path / META_FILE).is_file())):
        raise SnapshotError(f"refusing to overwrite {path}: it exists and is not a kvlab snapshot")
    return path


_FLOAT_DTYPES = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"}


def check_cache_tensors(kv_path: Path, n_layers: int, shape_of, dtype_of, model: dict[str, Any]) -> None:
    """The K/V tensors of a file another tool wrote, checked by name, shape and dtype.

    Every `layers.{i}.keys` / `.values` must be a 4-D float tensor `[batch, kv_heads, seq,
    head_dim]`; keys and values of a layer share batch, heads and positions; all layers share
    one shape and dtype; and where meta.json's `model` gives `n_kv_heads` / `head_dim`, they match.
    """
    first: tuple[tuple[int, ...], str] | None = None
    for i in range(n_layers):
        shapes = {}
        for name in (key_name(i), value_name(i)):
            shape, dtype = shape_of(name), str(dtype_of(name))
            if len(shape) != 4:
                raise SnapshotError(f"{kv_path}: {name} has shape {list(shape)}; kvlab reads "
                                    "[batch, kv_heads, seq, head_dim]")
            if dtype not in _FLOAT_DTYPES:
                raise SnapshotError(f"{kv_path}: {name} is {dtype}; a cache tensor is a float "
                                    f"({', '.join(sorted(_FLOAT_DTYPES))})")
            if first is None:
                first = (tuple(shape), dtype)
            elif (tuple(shape[:3]), dtype) != (first[0][:3], first[1]):
                raise SnapshotError(f"{kv_path}: {name} is {dtype} {list(shape)}, layers.0.keys {first[1]} "
                                    f"{list(first[0])}: every layer of a cache has one batch, heads, positions and dtype")
            shapes[name] = tuple(shape)
        for field, axis in (("n_kv_heads", 1), ("head_dim", 3)):
            want = model.get(field)
            have = shapes[key_name(i)][axis]
            if isinstance(want, int) and have != want:
                raise SnapshotError(f"{kv_path}: {key_name(i)} has {have} on its {field} axis, meta.json's model "
                                    f"{want}")


def read_meta(path: Path) -> dict[str, Any]:
    """meta.json of a snapshot folder, with its format checked."""
    meta_path = path / META_FILE
    if not meta_path.is_file():
        raise SnapshotError(f"{path} is not a kvlab snapshot (no {META_FILE})")
    try:
        meta = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise SnapshotError(f"{meta_path} is truncated or corrupt ({err})") from None
    if not isinstance(meta, dict):
        raise SnapshotError(f"{meta_path} is not a kvlab snapshot (not a JSON object)")
    fmt = meta.get("format")
    name, _, version = str(fmt).partition("/")
    if name != FORMAT_NAME or not version.isdigit():
        raise SnapshotError(f"{path} is not a kvlab snapshot (format {fmt!r})")
    if int(version) > FORMAT_VERSION:
        raise SnapshotError(f"{path} was written by a newer kvlab ({fmt}); this kvlab reads up to {FORMAT}: "
                            "upgrade kvlab")
    return meta


def _unshared(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Contiguous tensors with no two sharing storage, as safetensors requires: a cache may hand
    over one tensor under two names (a mixed cache's hot window is also its whole view while
    nothing is quantized yet)."""
    seen: set[int] = set()
    out = {}
    for name, t in tensors.items():
        t = t.contiguous()
        key = t.untyped_storage().data_ptr()
        if t.numel() and key in seen:
            t = t.clone()
        seen.add(key)
        out[name] = t
    return out
