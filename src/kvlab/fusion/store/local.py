"""LocalStore: a folder of safetensors chunk files with a SQLite index, shared by processes.

    STORE/kvlab-store.json              format marker: a folder without it is never written to
    STORE/index.sqlite (WAL)            one row per entry, the claims, the capacity
    STORE/chunks/ab/abcd...ef.safetensors   one file per chunk, named by its key's digest

Writers serialise the chunk to a temporary file outside any lock, then take the index's write
lock (BEGIN IMMEDIATE) only to rename the file into place and insert its row, so two processes
putting the same chunk store it once. Eviction and deletion unlink files inside that lock too.
A crash leaves at worst a temporary file, a file without a row or a row without a file: readers
treat the last two as absent, `verify` counts them as leftovers, `gc` removes them.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import sqlite3
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

from kvlab.atomic import file_mode
from kvlab.fusion.chunks import ChunkKey, ChunkKV
from kvlab.fusion.store import codec
from kvlab.fusion.store.base import ChunkStore, EntryInfo, check_entry
from kvlab.fusion.store.claims import new_owner, owner_is_dead
from kvlab.fusion.store.errors import CorruptChunkError, StoreError, store_errors

STORE_FORMAT = "kvlab.chunkstore/1"
MARKER = "kvlab-store.json"
INDEX = "index.sqlite"
CHUNKS = "chunks"
_OWN_NAMES = {MARKER, INDEX, f"{INDEX}-wal", f"{INDEX}-shm", f"{INDEX}-journal", CHUNKS}
_SCHEMA = """
CREATE TABLE IF NOT EXISTS chunks (
    digest TEXT PRIMARY KEY, model TEXT NOT NULL, fingerprint TEXT NOT NULL, dtype TEXT NOT NULL,
    n_tokens INTEGER NOT NULL, position_base INTEGER NOT NULL, prefix_digest TEXT NOT NULL,
    nbytes INTEGER NOT NULL, checksum TEXT NOT NULL, created TEXT NOT NULL, last_used REAL NOT NULL);
CREATE INDEX IF NOT EXISTS chunks_by_last_used ON chunks (last_used);
CREATE TABLE IF NOT EXISTS claims (digest TEXT PRIMARY KEY, owner TEXT NOT NULL, expires REAL NOT NULL);
CREATE TABLE IF NOT EXISTS settings (name TEXT PRIMARY KEY, value TEXT NOT NULL);
"""
_ROW = "digest, model, fingerprint, dtype, n_tokens, position_base, prefix_digest, nbytes, checksum, created, last_used"


class LocalStore(ChunkStore):
    """Chunk caches in a folder; `capacity` (bytes) bounds it with least-recently-used eviction.

    The capacity is kept in the index, so every process sharing the folder enforces the same
    one; passing `capacity` sets it, None keeps what the folder has (unbounded at first).
    """

    def __init__(self, path: str | os.PathLike, capacity: int | None = None, *, durable: bool = True,
                 create: bool = True) -> None:
        """`create=False` opens an existing store only (what commands that look after a store want:
        a mistyped path is an error, not a new empty store); one in a folder this process cannot
        write is then opened read-only."""
        self.root = Path(path).expanduser().absolute()
        self.url = str(self.root)
        self.durable = durable
        self.create = create
        self.read_only = False
        self._owner = new_owner()
        self._lock = threading.RLock()
        self._db: sqlite3.Connection | None = None
        self._db_pid = -1
        self._adopt_folder()
        if capacity is not None:
            self.set_capacity(capacity)

    # -- folder and index ---------------------------------------------------------------

    def _adopt_folder(self) -> None:
        """Create the store, or check that an existing folder is one (never write into another folder)."""
        if self.root.exists() and not self.root.is_dir():
            raise StoreError(f"store {self.url} is a file, not a folder")
        marker = self.root / MARKER
        if not self.create:
            if not self.root.is_dir():
                raise StoreError(f"store {self.url} does not exist")
            if not marker.is_file():
                raise StoreError(f"{self.url} is not a kvlab chunk store (no {MARKER})")
            self.read_only = not os.access(self.root, os.W_OK | os.X_OK)
        if self.root.is_dir() and not marker.is_file():
            foreign = [p.name for p in self.root.iterdir()
                       if p.name not in _OWN_NAMES and not p.name.startswith(f".{MARKER}.")]
            if foreign:
                raise StoreError(f"{self.url} is a folder that is not a kvlab chunk store "
                                 f"(it holds {foreign[0]!r}); give an empty or new folder")
        if not marker.is_file():
            from kvlab.atomic import write_text_atomic

            try:
                write_text_atomic(marker, json.dumps({"format": STORE_FORMAT}) + "\n")
            except OSError as err:
                raise StoreError(f"cannot create store {self.url}: {err.strerror or err}") from None
        try:
            found = json.loads(marker.read_text()).get("format")
        except (OSError, ValueError, AttributeError):
            found = None
        if found != STORE_FORMAT:
            raise StoreError(f"{self.url} is not a {STORE_FORMAT} store (marker says {found!r})")
        if self.read_only:
            if not (self.root / INDEX).is_file():
                raise StoreError(f"store {self.url} has no index ({INDEX})")
            return
        try:
            (self.root / CHUNKS).mkdir(exist_ok=True)
        except OSError as err:
            raise StoreError(f"cannot use store {self.url}: {err.strerror or err}") from None
        with self._write() as db:
            for statement in filter(str.strip, _SCHEMA.split(";")):
                db.execute(statement)

    def _conn(self) -> sqlite3.Connection:
        """This process's connection (a forked child opens its own)."""
        if self._db is None or self._db_pid != os.getpid():
            try:
                if self.read_only:  # no -shm / -wal can be made beside it: read the file as it is
                    uri = f"file:{quote(str(self.root / INDEX))}?mode=ro&immutable=1"
                    db = sqlite3.connect(uri, uri=True, isolation_level=None, check_same_thread=False)
                else:
                    db = sqlite3.connect(self.root / INDEX, timeout=60.0, isolation_level=None,
                                         check_same_thread=False)
                    db.execute("PRAGMA busy_timeout = 60000")
                    db.execute("PRAGMA journal_mode = WAL")
                    db.execute("PRAGMA synchronous = NORMAL")
            except sqlite3.Error as err:
                raise StoreError(f"cannot open the index of store {self.url}: {err}") from None
            self._db, self._db_pid = db, os.getpid()
        return self._db

    @contextlib.contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """A write transaction: holds the store's write lock across processes until it ends."""
        with self._lock, self._index_errors():
            db = self._conn()
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")

    def _read(self, sql: str, args: tuple = ()) -> list[tuple]:
        with self._lock, self._index_errors():
            return self._conn().execute(sql, args).fetchall()

    def _index_errors(self):
        """An index that cannot be read or written (read-only, disk full, damaged) is one clear error."""
        return store_errors(sqlite3.Error, f"the index of store {self.url} cannot be used")

    def close(self) -> None:
        with self._lock:
            if self._db is not None and self._db_pid == os.getpid():
                self._db.close()
            self._db = None

    def _path(self, digest: str) -> Path:
        """Where the entry named `digest` lives; only a validated digest ever becomes a path."""
        if not codec.is_digest(digest):
            raise StoreError(f"{digest!r} is not a chunk name (64 hex digits)")
        return self.root / CHUNKS / digest[:2] / f"{digest}.safetensors"

    # -- capacity -------------------------------------------------------------------------

    @property
    def capacity(self) -> int | None:
        rows = self._read("SELECT value FROM settings WHERE name = 'capacity'")
        return int(rows[0][0]) if rows else None

    def set_capacity(self, capacity: int | None) -> tuple[int, int]:
        """Bound the store to `capacity` bytes (None: unbounded) for every process that uses it,
        evicting the least recently used entries now if it holds more."""
        if capacity is not None and capacity < 0:
            raise StoreError(f"capacity must be at least 0 bytes, not {capacity}")
        with self._write() as db:
            if capacity is None:
                db.execute("DELETE FROM settings WHERE name = 'capacity'")
                return 0, 0
            db.execute("INSERT OR REPLACE INTO settings VALUES ('capacity', ?)", (str(int(capacity)),))
            return self._evict_over(db, int(capacity))

    def _evict_over(self, db: sqlite3.Connection, capacity: int, keep: str | None = None) -> tuple[int, int]:
        """Inside a write transaction: drop least recently used entries until the total fits."""
        total = db.execute("SELECT COALESCE(SUM(nbytes), 0) FROM chunks").fetchone()[0]
        evicted = freed = 0
        if total <= capacity:
            return 0, 0
        for digest, nbytes in db.execute("SELECT digest, nbytes FROM chunks ORDER BY last_used").fetchall():
            if total <= capacity:
                break
            if digest == keep:
                continue
            self._drop(db, digest)
            total -= nbytes
            evicted += 1
            freed += nbytes
        return evicted, freed

    def _drop(self, db: sqlite3.Connection, digest: str) -> None:
        db.execute("DELETE FROM chunks WHERE digest = ?", (digest,))
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._path(digest))

    # -- the contract ---------------------------------------------------------------------

    def put(self, key: ChunkKey, chunk: ChunkKV) -> bool:
        digest = key.digest()
        final = self._path(digest)
        if self._present(digest, final):
            return False
        parts, meta = codec.encode_parts(key, chunk)
        nbytes = sum(len(part) for part in parts)
        try:
            final.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{digest}.", suffix=".tmp", dir=final.parent)
            os.chmod(tmp, file_mode())  # mkstemp makes it owner-only: a shared store follows the umask
        except OSError as err:
            raise StoreError(f"cannot write to store {self.url}: {err.strerror or err}") from None
        try:
            try:
                with os.fdopen(fd, "wb") as handle:
                    handle.writelines(parts)
                    handle.flush()
                    if self.durable:
                        os.fsync(handle.fileno())
            except OSError as err:
                raise StoreError(f"cannot write chunk {digest[:12]} to store {self.url}: {err.strerror or err}") from None
            with self._write() as db:
                if self._present(digest, final, db):
                    return False
                os.replace(tmp, final)
                db.execute(f"INSERT OR REPLACE INTO chunks ({_ROW}) VALUES (?,?,?,?,?,?,?,?,?,?,?)", (
                    digest, str(meta.get("model", "")), key.fingerprint, key.dtype, len(key.token_ids),
                    key.position_base, key.prefix_digest, nbytes, meta["checksum"],
                    str(meta.get("created", "")), time.time()))
                capacity = db.execute("SELECT value FROM settings WHERE name = 'capacity'").fetchone()
                if capacity is not None:
                    self._evict_over(db, int(capacity[0]), keep=digest)
            return True
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)

    def _present(self, digest: str, path: Path, db: sqlite3.Connection | None = None) -> bool:
        """An indexed entry whose file is there with the indexed size."""
        sql, args = "SELECT nbytes FROM chunks WHERE digest = ?", (digest,)
        rows = db.execute(sql, args).fetchall() if db is not None else self._read(sql, args)
        if not rows:
            return False
        try:
            return path.stat().st_size == rows[0][0]
        except FileNotFoundError:
            return False

    def get(self, key: ChunkKey) -> ChunkKV | None:
        digest = key.digest()
        rows = self._read("SELECT fingerprint, dtype, n_tokens, position_base, prefix_digest FROM chunks "
                          "WHERE digest = ?", (digest,))
        if not rows:
            return None
        indexed = tuple(rows[0])
        wanted = codec.identity(key)
        if indexed != wanted:
            raise CorruptChunkError(f"the index of {self.url} files chunk {digest[:12]} under another model, "
                                    f"dtype or prefix: {indexed[:2]} instead of {wanted[:2]}")
        found = self._load(digest)
        if found is None:
            return None  # evicted or deleted since the index was read
        stored_key, chunk = found
        if stored_key != key:
            raise CorruptChunkError(f"chunk file {digest[:12]} in {self.url} holds another chunk's key")
        check_entry(key, chunk, self.url)
        with contextlib.suppress(StoreError):  # a read-only store still serves reads
            with self._write() as db:
                db.execute("UPDATE chunks SET last_used = ? WHERE digest = ?", (time.time(), digest))
        return chunk

    def _load(self, digest: str) -> tuple[ChunkKey, ChunkKV] | None:
        try:
            data = codec.read_file(self._path(digest))
        except FileNotFoundError:
            return None
        return codec.decode(data, f"chunk file {digest[:12]} in {self.url}")

    def delete_digest(self, digest: str) -> bool:
        with self._write() as db:
            had_row = db.execute("DELETE FROM chunks WHERE digest = ?", (digest,)).rowcount > 0
            if not codec.is_digest(digest):  # a tampered index row: drop the row, touch no file
                return had_row
            try:
                os.unlink(self._path(digest))
            except FileNotFoundError:
                return had_row
        return True

    def read_entry(self, digest: str) -> tuple[ChunkKey, ChunkKV]:
        if not codec.is_digest(digest):
            raise CorruptChunkError(f"the index of {self.url} names an entry {digest!r}, which is not a chunk name")
        rows = self._read("SELECT fingerprint, dtype, n_tokens, position_base, prefix_digest FROM chunks "
                          "WHERE digest = ?", (digest,))
        found = self._load(digest) if rows else None
        if found is None:
            raise KeyError(digest)
        key, chunk = found
        where = f"chunk file {digest[:12]} in {self.url}"
        if key.digest() != digest:
            raise CorruptChunkError(f"{where} holds the key of another chunk")
        if tuple(rows[0]) != codec.identity(key):
            raise CorruptChunkError(f"{where} does not match its index row")
        return key, check_entry(key, chunk, self.url)

    def entries(self) -> Iterator[EntryInfo]:
        rows = self._read("SELECT digest, model, dtype, n_tokens, position_base, nbytes, created, last_used "
                          "FROM chunks ORDER BY created, digest")
        for digest, model, dtype, n_tokens, base, nbytes, created, last_used in rows:
            used = _dt.datetime.fromtimestamp(last_used, _dt.timezone.utc).isoformat(timespec="seconds")
            yield EntryInfo(digest, model, dtype, n_tokens, base, nbytes, created, used)

    def stats(self) -> dict[str, Any]:
        return {**super().stats(), "capacity": self.capacity, "leftovers": self.count_leftovers()}

    # -- claims ---------------------------------------------------------------------------

    def claim(self, key: ChunkKey, ttl_s: float = 600.0) -> bool:
        digest, now = key.digest(), time.time()
        with self._write() as db:
            row = db.execute("SELECT owner, expires FROM claims WHERE digest = ?", (digest,)).fetchone()
            if row is not None and row[0] != self._owner and row[1] > now and not owner_is_dead(row[0]):
                return False
            db.execute("INSERT OR REPLACE INTO claims VALUES (?, ?, ?)", (digest, self._owner, now + ttl_s))
        return True

    def release(self, key: ChunkKey) -> None:
        with self._write() as db:
            db.execute("DELETE FROM claims WHERE digest = ? AND owner = ?", (key.digest(), self._owner))

    # -- upkeep ---------------------------------------------------------------------------

    def _leftovers(self, min_age_s: float, db: sqlite3.Connection) -> dict[str, list]:
        """Temporary files, files without a row and rows without a file, older than `min_age_s`."""
        cutoff = time.time() - min_age_s
        indexed = {row[0] for row in db.execute("SELECT digest FROM chunks").fetchall()}
        found: dict[str, list] = {"temporary": [], "unindexed": [], "missing": []}
        on_disk = set()
        for sub in sorted((self.root / CHUNKS).iterdir()):
            if not sub.is_dir():
                continue
            for path in sub.iterdir():
                name = path.name
                if name.endswith(".safetensors") and codec.is_digest(name.removesuffix(".safetensors")):
                    digest = name.removesuffix(".safetensors")
                    on_disk.add(digest)
                    if digest not in indexed and _mtime(path) < cutoff:
                        found["unindexed"].append(path)
                elif name.endswith(".tmp") and _mtime(path) < cutoff:
                    found["temporary"].append(path)
        found["missing"] = sorted(indexed - on_disk)
        return found

    def count_leftovers(self) -> int:
        with self._write() as db:  # no write is half-done while the lock is held
            return sum(len(v) for v in self._leftovers(0.0, db).values())

    def gc(self, capacity: int | None = None, min_age_s: float = 3600.0) -> dict[str, Any]:
        """Remove leftovers of interrupted writes, expired claims, and evict down to the capacity.

        Temporary files younger than `min_age_s` may belong to a write in progress and are kept;
        files without a row are checked under the write lock, where no write is half-done.
        """
        evicted, freed = self.set_capacity(capacity) if capacity is not None else (0, 0)
        with self._write() as db:
            found = self._leftovers(min_age_s, db)
            unindexed = self._leftovers(0.0, db)["unindexed"]
            for path in found["temporary"] + unindexed:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
            for digest in found["missing"]:
                db.execute("DELETE FROM chunks WHERE digest = ?", (digest,))
            now = time.time()
            stale = [(d, o) for d, o, e in db.execute("SELECT digest, owner, expires FROM claims").fetchall()
                     if e <= now or owner_is_dead(o)]
            db.executemany("DELETE FROM claims WHERE digest = ? AND owner = ?", stale)
            limit = db.execute("SELECT value FROM settings WHERE name = 'capacity'").fetchone()
            if limit is not None:
                more, more_bytes = self._evict_over(db, int(limit[0]))
                evicted, freed = evicted + more, freed + more_bytes
        return {"url": self.url, "removed_stray": len(found["temporary"]) + len(unindexed) + len(found["missing"]),
                "released_claims": len(stale), "evicted": evicted, "evicted_bytes": freed,
                "capacity": None if limit is None else int(limit[0])}


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except FileNotFoundError:
        return float("inf")
