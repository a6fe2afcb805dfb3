"""The chunk-store interface: every backend keeps the same contract.

- `put` is atomic: a reader sees the whole chunk or none of it.
- `get` verifies the checksum; a damaged entry raises `CorruptChunkError` (the caller may
  recompute and `put` again, which replaces it).
- An entry is returned only for its exact key: another model, dtype, prefix or position base
  is a different key, and the entry's own metadata is checked against the key on read.
- `claim` / `release` let processes that share a store agree who computes a missing chunk, so
  each chunk is computed once; a claim whose owner died (or whose time ran out) can be taken.
- `verify` reads every entry back; `gc` removes leftovers of interrupted writes and enforces
  a capacity; `entries` lists what is stored (`kvlab fuse store ls`).
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

from kvlab.errors import KvlabError
from kvlab.fusion.chunks import ChunkKey, ChunkKV, is_legacy_checksum


class StoreError(KvlabError):
    """A store that cannot be opened or used (bad URL, unreachable server, wrong format)."""


class CorruptChunkError(StoreError):
    """A stored chunk whose bytes no longer match its checksum."""


@contextlib.contextmanager
def store_errors(errors: type[BaseException] | tuple[type[BaseException], ...], what: str) -> Iterator[None]:
    """Turn a backend's own failures (lost server, unusable index) into one StoreError line."""
    try:
        yield
    except errors as err:
        text = str(err).strip()
        raise StoreError(f"{what}: {text.splitlines()[0] if text else type(err).__name__}") from None


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


@dataclass
class VerifyReport:
    """What `kvlab fuse store verify` found: entries read back, the damaged ones, leftovers."""

    url: str
    checked: int = 0
    problems: list[dict[str, str]] = field(default_factory=list)  # {"digest", "error"}
    removed: int = 0  # damaged entries deleted (with repair)
    legacy: int = 0  # sound entries with the SHA-256 checksum of older stores
    migrated: int = 0  # of those, rewritten with the current checksum (with repair)
    stray: int = 0  # leftovers of interrupted writes: not damage, `gc` removes them

    @property
    def ok(self) -> bool:
        return len(self.problems) == self.removed

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ok": self.ok}


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
        return {"url": self.url, "entries": len(infos), "bytes": sum(i.nbytes for i in infos),
                "models": _model_counts(infos)}

    # Added after the first draft; every method below has a default, so older backends still work.

    def read_entry(self, digest: str) -> tuple[ChunkKey, ChunkKV]:
        """The entry named `digest` with its own key, verified (what `verify` reads).

        KeyError when there is no such entry; CorruptChunkError when it is damaged.
        """
        raise NotImplementedError(f"{type(self).__name__} cannot read entries by name")

    def delete_digest(self, digest: str) -> bool:
        """Remove the entry named `digest` (used to drop damaged entries whose key is unknown)."""
        raise NotImplementedError(f"{type(self).__name__} cannot delete entries by name")

    def claim(self, key: ChunkKey, ttl_s: float = 600.0) -> bool:
        """Try to become the one process that computes `key`; False while another handle holds it.

        Claiming again through the same handle renews the claim. A store used by one process
        only (memory) needs no claims and always says yes.
        """
        return True

    def release(self, key: ChunkKey) -> None:
        """Give up a claim taken with `claim` (after `put`, or on failure)."""

    def verify(self, repair: bool = False, on_entry: Callable[[], None] | None = None) -> VerifyReport:
        """Read every entry back and check it; with `repair`, delete the damaged ones."""
        report = VerifyReport(self.url)
        for info in list(self.entries()):
            report.checked += 1
            try:
                key, chunk = self.read_entry(info.digest)
            except KeyError:
                report.checked -= 1  # removed meanwhile (evicted or expired): not damage
            except CorruptChunkError as err:
                report.problems.append({"digest": info.digest, "error": str(err)})
                if repair and self.delete_digest(info.digest):
                    report.removed += 1
            else:
                if is_legacy_checksum(chunk.meta.get("checksum")):
                    report.legacy += 1
                    if repair and self.rewrite(key, chunk):
                        report.migrated += 1
            if on_entry is not None:
                on_entry()
        return report

    def rewrite(self, key: ChunkKey, chunk: ChunkKV) -> bool:
        """Store a verified entry again in the current format (its checksum resealed). The old entry
        is deleted first: a crash in between loses one cache entry, which the next use recomputes."""
        self.delete(key)
        return self.put(key, chunk)

    def gc(self, capacity: int | None = None, min_age_s: float = 3600.0) -> dict[str, Any]:
        """Remove leftovers older than `min_age_s` and evict least recently used entries down to
        `capacity` bytes (when given). Returns what was removed."""
        return {"url": self.url, "removed_stray": 0, "evicted": 0, "evicted_bytes": 0}

    def close(self) -> None:
        """Release connections and handles."""

    def __enter__(self) -> "ChunkStore":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def check_entry(key: ChunkKey, chunk: ChunkKV, where: str) -> ChunkKV:
    """Verify a chunk read back for `key`: checksum and identity. Raise CorruptChunkError."""
    expected = chunk.meta.get("checksum")
    if expected is None or not chunk.checksum_matches(expected):
        raise CorruptChunkError(f"chunk {key.digest()[:12]} in {where} fails its checksum")
    identity = [("fingerprint", key.fingerprint), ("dtype", key.dtype),
                ("position_base", key.position_base), ("n_tokens", len(key.token_ids))]
    if "prefix_digest" in chunk.meta:
        identity.append(("prefix_digest", key.prefix_digest))
    if chunk.n_tokens != len(key.token_ids):
        raise CorruptChunkError(
            f"chunk {key.digest()[:12]} in {where} holds {chunk.n_tokens} tokens, expected {len(key.token_ids)}"
        )
    for field_name, want in identity:
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
        from kvlab.fusion.store.codec import sealed_meta

        chunk.meta["checksum"] = sealed_meta(chunk)["checksum"]
        self._data[digest] = (key, chunk)
        return True

    def contains(self, key: ChunkKey) -> bool:
        return key.digest() in self._data

    def delete(self, key: ChunkKey) -> bool:
        return self._data.pop(key.digest(), None) is not None

    def entries(self) -> Iterator[EntryInfo]:
        for digest, (key, chunk) in list(self._data.items()):
            yield EntryInfo(digest, chunk.meta.get("model", ""), key.dtype, len(key.token_ids), key.position_base,
                            chunk.nbytes(), chunk.meta.get("created", ""))

    def read_entry(self, digest: str) -> tuple[ChunkKey, ChunkKV]:
        key, chunk = self._data[digest]
        return key, check_entry(key, chunk, self.url)

    def delete_digest(self, digest: str) -> bool:
        return self._data.pop(digest, None) is not None


def _model_counts(infos: list[EntryInfo]) -> list[dict[str, Any]]:
    """Entries and bytes per (model, dtype), for `stats`."""
    groups: dict[tuple[str, str], list[int]] = {}
    for info in infos:
        group = groups.setdefault((info.model, info.dtype), [0, 0])
        group[0] += 1
        group[1] += info.nbytes
    return [{"model": m, "dtype": d, "entries": n, "bytes": b} for (m, d), (n, b) in sorted(groups.items())]


def open_store(url: str, *, create: bool = True) -> ChunkStore:
    """A store from its URL: a folder path (LocalStore), `redis://host:port/db`, or `memory://`.

    `file://PATH?capacity=SIZE` bounds a LocalStore (e.g. `capacity=20GB`);
    `redis://host:port/db?ttl=SECONDS&prefix=NAME` sets a RedisStore's expiry and key prefix.
    With `create=False` a folder must already be a store (see LocalStore).
    """
    if url.startswith("memory://"):
        return MemoryStore(url)
    if url.startswith("redis://") or url.startswith("rediss://"):
        from kvlab.fusion.store.redis import RedisStore

        return RedisStore(url)
    if "://" in url and not url.startswith("file://"):
        raise StoreError(f"unknown store URL {url!r}: use a folder path, file://PATH, redis://host:port/db or memory://")
    from kvlab.fusion.store.local import LocalStore

    capacity = None
    if url.startswith("file://"):
        from urllib.parse import parse_qs, urlsplit

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
    import re

    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-z]*)\s*", str(text).lower())
    if match is None or match.group(2) not in _SIZE_UNITS:
        raise StoreError(f"bad size {text!r}: use a number of bytes with an optional unit "
                         f"(KB, MB, GB, TB, KiB, MiB, GiB, TiB)")
    return int(float(match.group(1)) * _SIZE_UNITS[match.group(2)])
