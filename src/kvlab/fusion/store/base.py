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

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

from kvlab.fusion.chunks import ChunkKey, ChunkKV, is_legacy_checksum
from kvlab.fusion.store.errors import CorruptChunkError


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

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


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

    def delete(self, key: ChunkKey) -> bool:
        return self.delete_digest(key.digest())

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
        report.stray = self.count_leftovers()
        return report

    def count_leftovers(self) -> int:
        """How many leftovers of interrupted writes the store holds (not damage: `gc` removes them)."""
        return 0

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


def _model_counts(infos: list[EntryInfo]) -> list[dict[str, Any]]:
    """Entries and bytes per (model, dtype), for `stats`."""
    groups: dict[tuple[str, str], list[int]] = {}
    for info in infos:
        group = groups.setdefault((info.model, info.dtype), [0, 0])
        group[0] += 1
        group[1] += info.nbytes
    return [{"model": m, "dtype": d, "entries": n, "bytes": b} for (m, d), (n, b) in sorted(groups.items())]
