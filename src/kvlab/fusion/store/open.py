"""A store from its URL: the one module that knows every backend.

Backends import the contract (`base`) and the errors; nothing below imports this module, so
the store package's imports run one way: errors <- base <- backends <- open_store.
"""

from __future__ import annotations

import re
from urllib.parse import parse_qs, urlsplit

from kvlab.fusion.store.base import ChunkStore
from kvlab.fusion.store.errors import StoreError
from kvlab.fusion.store.local import LocalStore
from kvlab.fusion.store.memory import MemoryStore


def open_store(url: str, *, create: bool = True) -> ChunkStore:
    """A store from its URL: a folder path (LocalStore), `redis://host:port/db`, or `memory://`.

    `file://PATH?capacity=SIZE` bounds a LocalStore (e.g. `capacity=20GB`);
    `redis://host:port/db?ttl=SECONDS&prefix=NAME` sets a RedisStore's expiry and key prefix.
    With `create=False` a folder must already be a store (see LocalStore).
    """
    if url.startswith("memory://"):
        return MemoryStore(url)
    if url.startswith("redis://") or url.startswith("rediss://"):
        from kvlab.fusion.store.redis import RedisStore  # redis-py loads only for Redis URLs

        return RedisStore(url)
    if "://" in url and not url.startswith("file://"):
        raise StoreError(f"unknown store URL {url!r}: use a folder path, file://PATH, redis://host:port/db or memory://")
    capacity = None
    if url.startswith("file://"):
        parts = urlsplit(url)
        query = parse_qs(parts.query)
        unknown = sorted(set(query) - {"capacity"})
        if unknown:
            raise StoreError(f"unknown option {unknown[0]!r} in store URL {url!r}: allowed: capacity")
        if "capacity" in query:
            capacity = parse_size(query["capacity"][-1])
        url = parts.netloc + parts.path
    return LocalStore(url, capacity=capacity, create=create)


_SIZE_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
               "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_size(text: str) -> int:
    """Bytes from '512MiB', '20GB', '1e9' or '1048576'; StoreError otherwise."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-z]*)\s*", str(text).lower())
    if match is None or match.group(2) not in _SIZE_UNITS:
        raise StoreError(f"bad size {text!r}: use a number of bytes with an optional unit "
                         f"(KB, MB, GB, TB, KiB, MiB, GiB, TiB)")
    return int(float(match.group(1)) * _SIZE_UNITS[match.group(2)])
