"""RedisStore: chunk caches on a Redis server, for many workers (and machines) sharing one store.

A chunk's keys are written together in one MULTI/EXEC transaction (WATCHed, so two writers of
the same chunk store it once), with the same optional expiry:

    PREFIX:DIGEST:data    the chunk's bytes (the same safetensors payload LocalStore files hold),
                          or their first `part` bytes
    PREFIX:DIGEST:data:I  the I-th further part, where the bytes are longer than `part`
    PREFIX:DIGEST:meta    JSON: model, fingerprint, dtype, n_tokens, position_base, nbytes, the
                          parts' sizes, ...
    PREFIX:DIGEST:claim   who is computing the chunk (SET NX with an expiry)

Why parts: Redis answers a GET by copying the value into a reply buffer first, and a buffer of
tens of megabytes is fresh memory on every read; parts of a megabyte reuse the server's
allocations (bench/store_throughput.py: RedisStore reads from 0.43x to 0.49-0.50x of `torch.load`,
BENCHMARKS.md). Entries written before
parts existed (no sizes in their metadata) are one `data` key and are read as they are.

URL: `redis://[user:password@]host:port/db[?ttl=SECONDS&prefix=NAME&part=BYTES]` (prefix defaults to
`kvlab:chunk`, part to 1 MiB). A reader that finds the metadata or the first part without the other treats
the chunk as absent; `verify` counts such halves (and parts left without their metadata), `gc`
removes them. A later part missing or of the wrong size makes the entry damaged.

Reads of chunks go through `kvlab.fusion.store.resp.BulkReader` (a connection of its own that
receives the bytes straight into the tensor buffer) on plain `redis://host:port/db` URLs; a
`rediss://` URL or one with other server options reads through redis-py.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from typing import Any
from urllib.parse import parse_qs, unquote, urlencode, urlsplit, urlunsplit

import redis
import torch

from kvlab.fusion.chunks import ChunkKey, ChunkKV
from kvlab.fusion.store import codec
from kvlab.fusion.store.base import ChunkStore, EntryInfo, check_entry
from kvlab.fusion.store.claims import new_owner, owner_is_dead
from kvlab.fusion.store.errors import CorruptChunkError, StoreError, store_errors
from kvlab.fusion.store.resp import BulkReader, RespError

DEFAULT_PREFIX = "kvlab:chunk"
DEFAULT_PART = 1 << 20
_OPTIONS = {"ttl", "prefix", "part"}
# Replace a claim only if it still names the owner we found dead (or release only our own).
_SWAP_CLAIM = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3]) return 1 end
return 0
"""
_RELEASE_CLAIM = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0"


class RedisStore(ChunkStore):
    """Chunk caches on a Redis server; `ttl` (seconds) makes entries expire."""

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        query = parse_qs(parts.query)
        unknown = sorted(set(query) - _OPTIONS)
        if unknown:
            allowed = ", ".join(sorted(_OPTIONS))
            raise StoreError(f"unknown option {unknown[0]!r} in store URL {url!r}: allowed: {allowed}")
        try:
            self.ttl = int(query["ttl"][-1]) if "ttl" in query else None
        except ValueError:
            raise StoreError(f"ttl in {url!r} must be a whole number of seconds") from None
        if self.ttl is not None and self.ttl <= 0:
            raise StoreError(f"ttl must be a positive number of seconds, not {self.ttl}")
        try:
            self.part = int(query["part"][-1]) if "part" in query else DEFAULT_PART
        except ValueError:
            raise StoreError(f"part in {url!r} must be a whole number of bytes") from None
        if self.part <= 0:
            raise StoreError(f"part must be a positive number of bytes, not {self.part}")
        self.prefix = query.get("prefix", [DEFAULT_PREFIX])[-1]
        if not self.prefix or any(c in self.prefix for c in "*?[]"):
            raise StoreError(f"bad key prefix {self.prefix!r} in {url!r}")
        kept = {k: v for k, v in query.items() if k not in _OPTIONS}
        server_url = urlunsplit(parts._replace(query=urlencode(kept, doseq=True)))
        host = parts.hostname or "localhost"
        self.url = urlunsplit(parts._replace(netloc=f"{host}:{parts.port or 6379}"))
        self._owner = new_owner()
        with store_errors((redis.RedisError, ValueError), f"cannot reach the Redis store at {self.url}"):
            self._r = redis.Redis.from_url(server_url, socket_connect_timeout=5, socket_timeout=60,
                                           socket_read_size=1 << 20)  # chunks are megabytes: read big pieces
            self._r.ping()
        self._reader = _bulk_reader(parts, kept)
        self._swap_claim = self._r.register_script(_SWAP_CLAIM)
        self._release_claim = self._r.register_script(_RELEASE_CLAIM)

    def _name(self, digest: str, part: str) -> str:
        if not codec.is_digest(digest):
            raise StoreError(f"{digest!r} is not a chunk name (64 hex digits)")
        return f"{self.prefix}:{digest}:{part}"

    def _part_names(self, digest: str, count: int) -> list[str]:
        first = self._name(digest, "data")
        return [first] + [f"{first}:{i}" for i in range(1, count)]

    def _errors(self):
        """A lost connection or a server refusal is one clear error."""
        return store_errors(redis.RedisError, f"Redis store {self.url}")

    def close(self) -> None:
        with contextlib.suppress(redis.RedisError):
            self._r.close()
        if self._reader is not None:
            self._reader.close()

    # -- the contract ---------------------------------------------------------------------

    def put(self, key: ChunkKey, chunk: ChunkKV) -> bool:
        digest = key.digest()
        parts, meta = codec.encode_parts(key, chunk)
        data = memoryview(b"".join(parts))
        pieces = [data[i:i + self.part] for i in range(0, len(data), self.part)] or [data]
        row = {"model": str(meta.get("model", "")), "fingerprint": key.fingerprint, "dtype": key.dtype,
               "n_tokens": len(key.token_ids), "position_base": key.position_base,
               "prefix_digest": key.prefix_digest, "nbytes": len(data), "parts": [len(p) for p in pieces],
               "checksum": meta["checksum"], "created": str(meta.get("created", ""))}
        meta_key, data_key = self._name(digest, "meta"), self._name(digest, "data")
        with self._errors(), self._r.pipeline(transaction=True) as pipe:
            for _ in range(10):
                try:
                    pipe.watch(meta_key, data_key)
                    if pipe.exists(meta_key, data_key) == 2:
                        return False
                    pipe.multi()
                    for name, piece in zip(self._part_names(digest, len(pieces)), pieces):
                        pipe.set(name, piece, ex=self.ttl)
                    pipe.set(meta_key, json.dumps(row), ex=self.ttl)
                    pipe.execute()
                    return True
                except redis.WatchError:
                    continue  # another writer touched the pair: look again
        raise StoreError(f"Redis store {self.url}: chunk {digest[:12]} kept changing while being written")

    def get(self, key: ChunkKey) -> ChunkKV | None:
        digest = key.digest()
        found = self._load(digest)
        if found is None:
            return None
        row, stored_key, chunk = found
        wanted = codec.identity(key)
        if _identity(row) != wanted or stored_key != key:
            raise CorruptChunkError(f"chunk {digest[:12]} in {self.url} was stored for another model, dtype "
                                    f"or prefix: {_identity(row)[:2]} instead of {wanted[:2]}")
        return check_entry(key, chunk, self.url)

    def _load(self, digest: str) -> tuple[dict[str, Any], ChunkKey, ChunkKV] | None:
        where = f"chunk {digest[:12]} in {self.url}"
        meta_key = self._name(digest, "meta")
        if self._reader is not None:
            with store_errors((RespError, OSError), f"Redis store {self.url}"):
                meta_raw = self._reader.mget(meta_key)[0]
        else:
            with self._errors():
                meta_raw = self._r.get(meta_key)
        if meta_raw is None:
            return None
        try:
            row = json.loads(meta_raw.numpy().tobytes() if isinstance(meta_raw, torch.Tensor) else meta_raw)
            _identity(row)
            sizes = _part_sizes(row)
        except (ValueError, KeyError, TypeError):
            raise CorruptChunkError(f"{where} has unreadable metadata") from None
        names = self._part_names(digest, len(sizes))
        if self._reader is not None:
            with store_errors((RespError, OSError), f"Redis store {self.url}"):
                data, lengths = self._reader.mget_into(names, sizes)  # a writable uint8 tensor, read once
        else:
            with self._errors():
                values = self._r.mget(names)
            lengths = [-1 if v is None else len(v) for v in values]
            data = bytearray().join(v for v in values if v is not None)  # one writable copy: the tensors are views
        if lengths[0] < 0:
            return None  # the metadata without the data: half a pair
        if lengths != sizes:
            raise CorruptChunkError(f"{where} has a part missing or of the wrong size")
        stored_key, chunk = codec.decode(data, where)
        return row, stored_key, chunk

    def delete_digest(self, digest: str) -> bool:
        with self._errors():
            raw = self._r.get(self._name(digest, "meta"))
            try:
                count = len(_part_sizes(json.loads(raw))) if raw is not None else 1
            except (ValueError, KeyError, TypeError):
                count = 1  # unreadable metadata: further parts are left for gc
            return self._r.delete(self._name(digest, "meta"), *self._part_names(digest, count)) > 0

    def read_entry(self, digest: str) -> tuple[ChunkKey, ChunkKV]:
        found = self._load(digest)
        if found is None:
            raise KeyError(digest)
        row, key, chunk = found
        where = f"chunk {digest[:12]} in {self.url}"
        if key.digest() != digest:
            raise CorruptChunkError(f"{where} holds the key of another chunk")
        if _identity(row) != codec.identity(key):
            raise CorruptChunkError(f"{where} does not match its metadata")
        return key, check_entry(key, chunk, self.url)

    def _digests(self, part: str) -> Iterator[str]:
        with self._errors():
            for name in self._r.scan_iter(match=f"{self.prefix}:*:{part}", count=1000):
                digest = name.decode(errors="replace")[len(self.prefix) + 1:-len(part) - 1]
                if codec.is_digest(digest):
                    yield digest

    def entries(self) -> Iterator[EntryInfo]:
        digests = sorted(self._digests("meta"))
        for start in range(0, len(digests), 500):
            batch = digests[start:start + 500]
            with self._errors():
                rows = self._r.mget([self._name(d, "meta") for d in batch])
            for digest, raw in zip(batch, rows):
                if raw is None:
                    continue
                try:
                    row = json.loads(raw)
                    yield EntryInfo(digest, row["model"], row["dtype"], int(row["n_tokens"]),
                                    int(row["position_base"]), int(row["nbytes"]), row["created"])
                except (ValueError, KeyError, TypeError):
                    yield EntryInfo(digest, "?", "?", 0, 0, 0, "")

    def stats(self) -> dict[str, Any]:
        with self._errors():
            memory = self._r.info("memory").get("used_memory")
        return {**super().stats(), "ttl": self.ttl, "prefix": self.prefix, "server_used_memory": memory,
                "leftovers": self.count_leftovers()}

    # -- claims ---------------------------------------------------------------------------

    def claim(self, key: ChunkKey, ttl_s: float = 600.0) -> bool:
        name, ms = self._name(key.digest(), "claim"), max(1, int(ttl_s * 1000))
        with self._errors():
            if self._r.set(name, self._owner, nx=True, px=ms):
                return True
            holder = self._r.get(name)
            if holder is None:
                return bool(self._r.set(name, self._owner, nx=True, px=ms))
            holder_text = holder.decode(errors="replace")
            if holder_text == self._owner:
                return True
            if owner_is_dead(holder_text):
                return bool(self._swap_claim(keys=[name], args=[holder, self._owner, ms]))
        return False

    def release(self, key: ChunkKey) -> None:
        with self._errors():
            self._release_claim(keys=[self._name(key.digest(), "claim")], args=[self._owner])

    # -- upkeep ---------------------------------------------------------------------------

    def _halves(self) -> list[str]:
        """Names of keys whose partner is missing (an expiry or a hand-made deletion between them),
        and further parts of chunks without metadata."""
        metas, datas = set(self._digests("meta")), set(self._digests("data"))
        with self._errors():
            parts = [name.decode(errors="replace") for name in
                     self._r.scan_iter(match=f"{self.prefix}:*:data:*", count=1000)]
        orphans = [name for name in parts if name[len(self.prefix) + 1:].split(":", 1)[0] not in metas]
        return ([self._name(d, "meta") for d in metas - datas] + [self._name(d, "data") for d in datas - metas]
                + orphans)

    def count_leftovers(self) -> int:
        return len(self._halves())

    def gc(self, capacity: int | None = None, min_age_s: float = 3600.0) -> dict[str, Any]:
        """Remove half-written pairs and claims of dead owners; with `capacity`, evict the chunks
        idle longest (Redis's own idle clock) until the rest fits."""
        halves = self._halves()
        with self._errors():
            removed = self._r.delete(*halves) if halves else 0
            released = 0
            for digest in list(self._digests("claim")):
                holder = self._r.get(self._name(digest, "claim"))
                if holder is not None and owner_is_dead(holder.decode(errors="replace")):
                    released += int(self._release_claim(keys=[self._name(digest, "claim")], args=[holder]))
            evicted = freed = 0
            if capacity is not None:
                infos = list(self.entries())
                total = sum(i.nbytes for i in infos)
                idle = {i.digest: self._idle_s(i.digest) for i in infos}
                for info in sorted(infos, key=lambda i: -idle[i.digest]):
                    if total <= capacity:
                        break
                    if self.delete_digest(info.digest):
                        total -= info.nbytes
                        evicted += 1
                        freed += info.nbytes
        return {"url": self.url, "removed_stray": removed, "released_claims": released, "evicted": evicted,
                "evicted_bytes": freed, "capacity": capacity}

    def _idle_s(self, digest: str) -> float:
        try:
            return float(self._r.object("idletime", self._name(digest, "data")) or 0)
        except redis.ResponseError:  # an LFU eviction policy has no idle clock
            return 0.0


def _bulk_reader(parts, server_options: dict) -> BulkReader | None:
    """The raw reader for a plain `redis://host:port/db` URL; None where redis-py must read (TLS,
    other server options, a database path that is not a number)."""
    db_text = parts.path.strip("/") or "0"
    if parts.scheme != "redis" or server_options or not db_text.isdigit():
        return None
    return BulkReader(parts.hostname or "localhost", parts.port or 6379, int(db_text),
                      unquote(parts.username) if parts.username else None,
                      unquote(parts.password) if parts.password is not None else None, timeout=60.0)


def _part_sizes(row: dict[str, Any]) -> list[int]:
    """The sizes of a chunk's parts from its metadata (one part where it names none); ValueError if they do not add up."""
    sizes = [int(n) for n in row.get("parts", [row["nbytes"]])]
    if not sizes or any(n < 0 for n in sizes) or sum(sizes) != int(row["nbytes"]):
        raise ValueError("part sizes do not add up to the chunk's size")
    return sizes


def _identity(row: dict[str, Any]) -> tuple:
    return (row["fingerprint"], row["dtype"], int(row["n_tokens"]), int(row["position_base"]), row["prefix_digest"])
