"""One stored chunk as bytes: a safetensors file whose header also carries its key and metadata.

Both backends store exactly these bytes, so an entry can be checked on its own: the key in the
header must hash to the entry's name, and the tensors must match the checksum in the metadata.

    tensors   layers.{i}.keys, layers.{i}.values, [surprisal]   (ChunkKV.tensors())
    metadata  format = "kvlab.chunk/1", key = JSON of the ChunkKey, meta = JSON of ChunkKV.meta

The layout is plain safetensors (8-byte little-endian header size, JSON header padded to 8
bytes, tensors back to back ordered by element size then name), so `safetensors.safe_open`
reads a stored chunk. It is written and read here directly: writes go out tensor by tensor
without first joining a copy of the whole chunk, and reads make tensors that are views of the
one buffer the bytes were read into.
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
from dataclasses import asdict
from typing import Any

import torch

from kvlab.fusion.chunks import ChunkKey, ChunkKV
from kvlab.fusion.store.errors import CorruptChunkError

FORMAT = "kvlab.chunk/1"
_DIGEST = re.compile(r"[0-9a-f]{64}")
_MAX_HEADER = 100 * 2**20
_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
}
_BY_NAME = {name: dtype for dtype, name in _DTYPES.items()}


def is_digest(name: str) -> bool:
    """True for a chunk name (64 lowercase hex digits): the only names a store turns into paths."""
    return isinstance(name, str) and _DIGEST.fullmatch(name) is not None


def key_from_dict(data: dict[str, Any]) -> ChunkKey:
    return ChunkKey(
        fingerprint=str(data["fingerprint"]),
        dtype=str(data["dtype"]),
        token_ids=tuple(int(t) for t in data["token_ids"]),
        position_base=int(data["position_base"]),
        prefix_digest=str(data.get("prefix_digest", "")),
    )


def identity(key: ChunkKey) -> tuple[str, str, int, int, str]:
    """What an index row records of a key: model fingerprint, dtype, length, position base, prefix."""
    return (key.fingerprint, key.dtype, len(key.token_ids), key.position_base, key.prefix_digest)


def sealed_meta(chunk: ChunkKV) -> dict[str, Any]:
    """The chunk's metadata with a checksum that matches its tensors.

    A chunk that already carries a checksum (of either scheme) must match it: a damaged chunk is
    refused before it reaches a store, not discovered by the first reader. The sealed checksum is
    always of the current scheme.
    """
    actual = chunk.checksum()
    stated = chunk.meta.get("checksum")
    if stated is not None and stated != actual and not chunk.checksum_matches(stated):
        raise CorruptChunkError("refusing to store a chunk whose tensors no longer match its checksum")
    return {**chunk.meta, "checksum": actual}


def encode_parts(key: ChunkKey, chunk: ChunkKV) -> tuple[list[bytes | memoryview], dict[str, Any]]:
    """The stored bytes of `chunk` under `key` as pieces to write in order, and its sealed metadata."""
    meta = sealed_meta(chunk)
    tensors = {name: t.detach().contiguous().cpu() for name, t in chunk.tensors().items()}
    unknown = sorted({str(t.dtype) for t in tensors.values() if t.dtype not in _DTYPES})
    if unknown:
        raise ValueError(f"cannot store tensors of dtype {unknown[0]}")
    header: dict[str, Any] = {"__metadata__": {"format": FORMAT, "key": json.dumps(asdict(key)),
                                               "meta": json.dumps(meta)}}
    parts: list[bytes | memoryview] = []
    offset = 0
    for name in sorted(tensors, key=lambda n: (-tensors[n].element_size(), n)):
        t = tensors[name]
        size = t.numel() * t.element_size()
        header[name] = {"dtype": _DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + size]}
        if size:
            parts.append(t.reshape(-1).view(torch.uint8).numpy().data)
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return [struct.pack("<Q", len(text)) + text, *parts], meta


def decode(data: torch.Tensor | bytearray, where: str) -> tuple[ChunkKey, ChunkKV]:
    """Key and chunk from stored bytes (a writable buffer or a uint8 tensor); the tensors are views of it.

    Any malformed header, offset or size is a CorruptChunkError; the checksum is not checked here
    (`check_entry` does that for the key a caller asked for).
    """
    buf = data if isinstance(data, torch.Tensor) else torch.frombuffer(data, dtype=torch.uint8)
    try:
        key, meta, tensors = _parse(buf)
    except (struct.error, ValueError, KeyError, TypeError, RuntimeError, OverflowError) as err:
        raise CorruptChunkError(f"{where} is not a readable kvlab chunk ({err})") from None
    if "layers.0.keys" not in tensors:
        raise CorruptChunkError(f"{where} holds no layer tensors")
    try:
        return key, ChunkKV.from_tensors(tensors, meta)
    except KeyError as err:
        raise CorruptChunkError(f"{where} lacks tensor {err}") from None


def _parse(buf: torch.Tensor) -> tuple[ChunkKey, dict[str, Any], dict[str, torch.Tensor]]:
    total = buf.numel()
    if total < 8:
        raise ValueError("shorter than a header")
    (size,) = struct.unpack("<Q", buf[:8].numpy().tobytes())
    if size > min(total - 8, _MAX_HEADER):
        raise ValueError("header runs past the end")
    header = json.loads(buf[8:8 + size].numpy().tobytes())
    extra = header.pop("__metadata__")
    if extra.get("format") != FORMAT:
        raise ValueError(f"format {extra.get('format')!r}, expected {FORMAT!r}")
    key, meta = key_from_dict(json.loads(extra["key"])), json.loads(extra["meta"])
    start, expected, tensors = 8 + size, 0, {}
    for name, info in sorted(header.items(), key=lambda item: item[1]["data_offsets"][0]):
        dtype, shape = _BY_NAME[info["dtype"]], [int(d) for d in info["shape"]]
        begin, end = (int(x) for x in info["data_offsets"])
        if any(d < 0 for d in shape):
            raise ValueError(f"tensor {name} has a negative dimension")
        if begin != expected or end - begin != math.prod(shape) * dtype.itemsize:
            raise ValueError(f"tensor {name} does not fit its offsets")
        if start + end > total:
            raise ValueError("truncated")
        raw = buf[start + begin:start + end]
        if (start + begin) % dtype.itemsize:
            raw = raw.clone()  # a file from elsewhere may leave a tensor unaligned
        tensors[name] = raw.view(dtype).reshape(shape)
        expected = end
    if start + expected != total:
        raise ValueError(f"{total - start - expected} bytes beyond the last tensor" if start + expected < total
                         else "truncated")
    return key, meta, tensors


def read_file(path) -> torch.Tensor:
    """A file's bytes read straight into a uint8 tensor (FileNotFoundError when it is gone)."""
    with open(path, "rb", buffering=0) as handle:
        size = os.fstat(handle.fileno()).st_size
        buf = torch.empty(size, dtype=torch.uint8)
        view, done = memoryview(buf.numpy()), 0
        while done < size:
            got = handle.readinto(view[done:])
            if not got:
                break
            done += got
    return buf[:done]
