"""Chunk stores: where precomputed chunk caches live (a folder, Redis, or memory)."""

from kvlab.fusion.store.base import (
    ChunkStore,
    CorruptChunkError,
    EntryInfo,
    MemoryStore,
    StoreError,
    VerifyReport,
    check_entry,
    open_store,
    parse_size,
)

__all__ = [
    "ChunkStore", "CorruptChunkError", "EntryInfo", "MemoryStore", "StoreError", "VerifyReport", "check_entry",
    "open_store", "parse_size",
]
