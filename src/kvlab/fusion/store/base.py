"""The chunk-store interface: every backend keeps the same contract.

- `put` is atomic: a reader sees the whole chunk or none of it.
- `get` verifies the checksum; a damaged entry raises `CorruptChunkError` (the caller may
  recompute and `put` again, which replaces it).
- An entry is returned only for its exact key: another model, dtype, prefix or position base
  is a different key, and the entry's own metadata is checked against the key on read.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from kvlab.errors import KvlabError
from kvlab.fusion.chunks import ChunkKey, ChunkKV


class StoreError(KvlabError):
    """A store that cannot be opened or used (bad URL, unreachable server, wrong format)."""


class CorruptChunkError(StoreError):
    """A stored chunk whose bytes no longer match its checksum."""


@dataclass(frozen=True)
class EntryInfo:
    """One row of `kvlab fuse store ls`."""

    digest: str
    model: str
    dtype: str
    n_tokens: int
    position_base: int
    nbytes: int
    created: str
    last_used: str | None = None


class ChunkStore(ABC):
    """A place to keep chunk caches, named by a URL."""

    url: str

    @abstractmethod
    def get(self, key: ChunkKey) -> ChunkKV | None:
        """The chunk for `key`, verified; None when absent."""

    @abstractmethod
    def put(self, key: ChunkKey, chunk: ChunkKV) -> bool:
        """Store `chunk` under `key`; False when an intact entry was already there."""

    @abstractmethod
    def contains(self, key: ChunkKey) -> bool: ...

    @abstractmethod
    def delete(self, key: ChunkKey) -> bool: ...

    @abstractmethod
    def entries(self) -> Iterator[EntryInfo]: ...

    def stats(self) -> dict[str, Any]:
        infos = list(self.entries())
        return {"url": self.url, "entries": len(infos), "bytes": sum(i.nbytes for i in infos)}

    def close(self) -> None:
        """Release connections and handles."""

    def __enter__(self) -> "ChunkStore":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def check_entry(key: ChunkKey, chunk: ChunkKV, where: str) -> ChunkKV:
    """Verify a chunk read back for `key`: checksum and identity. Raise CorruptChunkError."""
    expected = chunk.meta.get("checksum")
    if expected is None or chunk.checksum() != expected:
        raise CorruptChunkError(f"chunk {key.digest()[:12]} in {where} fails its checksum")
    for field_name, want in (("fingerprint", key.fingerprint), ("dtype", key.dtype),
                             ("position_base", key.position_base), ("n_tokens", len(key.token_ids))):
        if chunk.meta.get(field_name) != want:
            raise CorruptChunkError(
                f"chunk {key.digest()[:12]} in {where} has {field_name}={chunk.meta.get(field_name)!r}, expected {want!r}"
            )
    return chunk


class MemoryStore(ChunkStore):
    """A store in this process's memory (`memory://`), for tests and one-off runs."""

    def __init__(self, url: str = "memory://") -> None:
        self.url = url
        self._data: dict[str, tuple[ChunkKey, ChunkKV]] = {}

    def get(self, key: ChunkKey) -> ChunkKV | None:
        item = self._data.get(key.digest())
        return None if item is None else check_entry(key, item[1], self.url)

    def put(self, key: ChunkKey, chunk: ChunkKV) -> bool:
        digest = key.digest()
        if digest in self._data:
            return False
        chunk.meta.setdefault("checksum", chunk.checksum())
        self._data[digest] = (key, chunk)
        return True

    def contains(self, key: ChunkKey) -> bool:
        return key.digest() in self._data

    def delete(self, key: ChunkKey) -> bool:
        return self._data.pop(key.digest(), None) is not None

    def entries(self) -> Iterator[EntryInfo]:
        for digest, (key, chunk) in self._data.items():
            yield EntryInfo(digest, chunk.meta.get("model", ""), key.dtype, len(key.token_ids), key.position_base,
                            chunk.nbytes(), chunk.meta.get("created", ""))


def open_store(url: str) -> ChunkStore:
    """A store from its URL: a folder path (LocalStore), `redis://host:port/db`, or `memory://`."""
    if url.startswith("memory://"):
        return MemoryStore(url)
    if url.startswith("redis://"):
        from kvlab.fusion.store.redis import RedisStore

        return RedisStore(url)
    if "://" in url and not url.startswith("file://"):
        raise StoreError(f"unknown store URL {url!r}: use a folder path, file://PATH, redis://host:port/db or memory://")
    from kvlab.fusion.store.local import LocalStore

    return LocalStore(url.removeprefix("file://"))
