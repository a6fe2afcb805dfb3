"""Chunk stores: where precomputed chunk caches live (a folder, Redis, or memory)."""

from kvlab.fusion.store.base import ChunkStore
from kvlab.fusion.store.errors import CorruptChunkError, StoreError
from kvlab.fusion.store.memory import MemoryStore
from kvlab.fusion.store.open import open_store, parse_size

__all__ = ["ChunkStore", "CorruptChunkError", "MemoryStore", "StoreError", "open_store", "parse_size"]
