"""The `memory://` backend: one process's chunks in a dict, checked on read like any other store's."""

from __future__ import annotations

from collections.abc import Iterator

from kvlab.fusion.chunks import ChunkKey, ChunkKV
from kvlab.fusion.store.base import ChunkStore, EntryInfo, check_entry
from kvlab.fusion.store.codec import sealed_meta


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
        chunk.meta["checksum"] = sealed_meta(chunk)["checksum"]
        self._data[digest] = (key, chunk)
        return True

    def entries(self) -> Iterator[EntryInfo]:
        for digest, (key, chunk) in list(self._data.items()):
            yield EntryInfo(digest, chunk.meta.get("model", ""), key.dtype, len(key.token_ids), key.position_base,
                            chunk.nbytes(), chunk.meta.get("created", ""))

    def read_entry(self, digest: str) -> tuple[ChunkKey, ChunkKV]:
        key, chunk = self._data[digest]
        return key, check_entry(key, chunk, self.url)

    def delete_digest(self, digest: str) -> bool:
        return self._data.pop(digest, None) is not None
