"""Synthetic chunks whose values follow from their key, so any process can check what it reads,
and ways to damage a stored chunk the way a disk or a stray write would."""

from __future__ import annotations

import hashlib

import torch

from kvlab.fusion.chunks import ChunkKey, ChunkKV


def make_key(n: int, *, model: str = "fp-test", dtype: str = "float32", base: int = 0, prefix: str = "") -> ChunkKey:
    """The key of synthetic chunk number `n`."""
    return ChunkKey(model, dtype, tuple(range(n, n + 4 + n % 3)), base, prefix)


def make_chunk(key: ChunkKey, *, layers: int = 2, kv_heads: int = 2, head_dim: int = 8) -> ChunkKV:
    """A chunk whose tensors are a pure function of its key, with the metadata a store checks."""
    seed = int(hashlib.sha256(key.digest().encode()).hexdigest()[:8], 16)
    gen = torch.Generator().manual_seed(seed)
    n = len(key.token_ids)
    shape = (1, kv_heads, n, head_dim)
    dtype = getattr(torch, key.dtype)
    chunk = ChunkKV(
        keys=[torch.randn(shape, generator=gen).to(dtype) for _ in range(layers)],
        values=[torch.randn(shape, generator=gen).to(dtype) for _ in range(layers)],
        surprisal=torch.rand(n, generator=gen),
        meta={"model": "synthetic", "fingerprint": key.fingerprint, "dtype": key.dtype, "n_tokens": n,
              "position_base": key.position_base, "prefix_digest": key.prefix_digest,
              "created": "2026-01-01T00:00:00+00:00"},
    )
    chunk.meta["checksum"] = chunk.checksum()
    return chunk


def same_chunk(a: ChunkKV, b: ChunkKV) -> bool:
    """Bit-for-bit equal tensors (NaNs equal)."""
    ta, tb = a.tensors(), b.tensors()
    return ta.keys() == tb.keys() and all(
        ta[k].dtype == tb[k].dtype and torch.equal(ta[k].reshape(-1).view(torch.uint8), tb[k].reshape(-1).view(torch.uint8)) for k in ta
    )


def flip_stored_byte(store, key: ChunkKey, offset: int = -1) -> None:
    """Flip one byte of the stored chunk (by default its last, inside the tensor data)."""
    from kvlab.fusion.store import MemoryStore
    from kvlab.fusion.store.local import LocalStore
    from kvlab.fusion.store.redis import RedisStore

    digest = key.digest()
    if isinstance(store, MemoryStore):
        tensor = store._data[digest][1].values[-1]
        tensor.reshape(-1).view(torch.uint8)[offset] ^= 0x10
    elif isinstance(store, LocalStore):
        path = store._path(digest)
        data = bytearray(path.read_bytes())
        data[offset] ^= 0x10
        path.write_bytes(bytes(data))
    elif isinstance(store, RedisStore):
        name = store._name(digest, "data")
        data = bytearray(store._r.get(name))
        data[offset] ^= 0x10
        store._r.set(name, bytes(data), keepttl=True)
    else:
        raise TypeError(type(store))
