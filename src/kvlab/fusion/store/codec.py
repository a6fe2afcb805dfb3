"""One stored chunk as bytes: a safetensors payload whose header also carries its key and metadata.

Both backends store exactly these bytes, so an entry can be checked on its own: the key in the
header must hash to the entry's name, and the tensors must match the checksum in the metadata.

    tensors   layers.{i}.keys, layers.{i}.values, [surprisal]   (ChunkKV.tensors())
    metadata  format = "kvlab.chunk/1", key = JSON of the ChunkKey, meta = JSON of ChunkKV.meta
"""

from __future__ import annotations

import json
import re
import struct
from typing import Any

from kvlab.fusion.chunks import ChunkKey, ChunkKV

FORMAT = "kvlab.chunk/1"
_DIGEST = re.compile(r"[0-9a-f]{64}")


def is_digest(name: str) -> bool:
    """True for a chunk name (64 lowercase hex digits): the only names a store turns into paths."""
    return isinstance(name, str) and _DIGEST.fullmatch(name) is not None


def key_to_dict(key: ChunkKey) -> dict[str, Any]:
    return {
        "fingerprint": key.fingerprint,
        "dtype": key.dtype,
        "token_ids": list(key.token_ids),
        "position_base": key.position_base,
        "prefix_digest": key.prefix_digest,
    }


def key_from_dict(data: dict[str, Any]) -> ChunkKey:
    return ChunkKey(
        fingerprint=str(data["fingerprint"]),
        dtype=str(data["dtype"]),
        token_ids=tuple(int(t) for t in data["token_ids"]),
        position_base=int(data["position_base"]),
        prefix_digest=str(data.get("prefix_digest", "")),
    )


def sealed_meta(chunk: ChunkKV) -> dict[str, Any]:
    """The chunk's metadata with a checksum that matches its tensors.

    A chunk that already carries a checksum must match it: a damaged chunk is refused before it
    reaches a store, not discovered by the first reader.
    """
    from kvlab.fusion.store.base import CorruptChunkError

    actual = chunk.checksum()
    stated = chunk.meta.get("checksum")
    if stated is not None and stated != actual:
        raise CorruptChunkError("refusing to store a chunk whose tensors no longer match its checksum")
    return {**chunk.meta, "checksum": actual}


def encode(key: ChunkKey, chunk: ChunkKV, meta: dict[str, Any] | None = None) -> bytes:
    """The stored bytes of `chunk` under `key` (`meta` defaults to `sealed_meta(chunk)`)."""
    from safetensors.torch import save

    meta = sealed_meta(chunk) if meta is None else meta
    header = {"format": FORMAT, "key": json.dumps(key_to_dict(key)), "meta": json.dumps(meta)}
    tensors = {name: t.detach().contiguous().cpu() for name, t in chunk.tensors().items()}
    return save(tensors, metadata=header)


def read_header(data: bytes | memoryview, where: str) -> tuple[ChunkKey, dict[str, Any]]:
    """Key and metadata from the header alone (no tensor is read)."""
    from kvlab.fusion.store.base import CorruptChunkError

    try:
        (size,) = struct.unpack("<Q", bytes(data[:8]))
        if size > len(data) - 8:
            raise ValueError("header runs past the end")
        header = json.loads(bytes(data[8:8 + size]))
        extra = header["__metadata__"]
        if extra.get("format") != FORMAT:
            raise ValueError(f"format {extra.get('format')!r}, expected {FORMAT!r}")
        return key_from_dict(json.loads(extra["key"])), json.loads(extra["meta"])
    except (struct.error, ValueError, KeyError, TypeError) as err:
        raise CorruptChunkError(f"{where} is not a readable kvlab chunk ({err})") from None


def decode(data: bytes, where: str) -> tuple[ChunkKey, ChunkKV]:
    """Key and chunk from stored bytes; CorruptChunkError when they cannot be parsed.

    The checksum is not checked here: `check_entry` does that for the key a caller asked for.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load

    from kvlab.fusion.store.base import CorruptChunkError

    key, meta = read_header(data, where)
    try:
        tensors = load(bytes(data))
    except (SafetensorError, ValueError, RuntimeError) as err:
        raise CorruptChunkError(f"{where} is not a readable kvlab chunk ({err})") from None
    if f"layers.{0}.keys" not in tensors:
        raise CorruptChunkError(f"{where} holds no layer tensors")
    try:
        return key, ChunkKV.from_tensors(tensors, meta)
    except KeyError as err:
        raise CorruptChunkError(f"{where} lacks tensor {err}") from None
