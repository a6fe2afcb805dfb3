"""Synthetic chunks whose values follow from their key, so any process can check what it reads,
and ways to damage a stored chunk the way a disk or a stray write would."""

from __future__ import annotations

import hashlib
import json
import random

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
    def raw(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(-1).view(torch.uint8)

    return ta.keys() == tb.keys() and all(ta[k].dtype == tb[k].dtype and torch.equal(raw(ta[k]), raw(tb[k])) for k in ta)


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
    elif isinstance(store, RedisStore):  # the last part holds the end of the tensor data
        row = json.loads(store._r.get(store._name(digest, "meta")))
        name = store._part_names(digest, len(row.get("parts", [0])))[-1]
        data = bytearray(store._r.get(name))
        data[offset] ^= 0x10
        store._r.set(name, bytes(data), keepttl=True)
    else:
        raise TypeError(type(store))


def hammer(url: str, seed: int, n_keys: int, phase: str) -> dict[str, int]:
    """One process's share of the multi-process test; asserts every chunk it reads back."""
    from kvlab.fusion.store import open_store

    torch.set_num_threads(1)
    rng = random.Random(seed)
    counts = {"stored": 0, "hits": 0, "misses": 0}
    with open_store(url) as store:
        if phase == "warm-up":  # the processes are started and importing is done: nothing to time
            return counts
        if phase == "fill":  # every process writes every chunk, in its own order
            order = list(range(n_keys))
            rng.shuffle(order)
            for n in order:
                counts["stored"] += store.put(make_key(n), make_chunk(make_key(n)))
        else:  # mixed reads and writes while a capacity forces evictions
            for _ in range(4 * n_keys):
                key = make_key(rng.randrange(2 * n_keys))
                if rng.random() < 0.5:
                    counts["stored"] += store.put(key, make_chunk(key))
                else:
                    got = store.get(key)
                    if got is None:
                        counts["misses"] += 1
                    else:
                        assert same_chunk(got, make_chunk(key))
                        counts["hits"] += 1
    return counts


_WORDS = "the cat sat on a mat while rain fell over quiet hills and rivers ran down to the sea".split()


def task_record(n: int, sentences: int = 8) -> dict:
    """Task number `n` in kvlab's task-file form: its text depends on `n` only."""
    rng = random.Random(n)

    def sentence() -> str:
        words = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(3, 9)))
        return words.capitalize() + rng.choice([".", "!", "?"])

    chunks = [" ".join(sentence() for _ in range(sentences)) for _ in range(2)]
    return {"id": f"t{n}", "chunks": chunks, "question": "Where did the rivers run?", "answers": ["to the sea"]}


def write_tasks(path, numbers, sentences: int = 8):
    """A task file holding the texts of tasks `numbers` (overlapping files share those chunks);
    a number given twice is a second task with the same documents."""
    with open(path, "w") as handle:
        for line, n in enumerate(numbers):
            handle.write(json.dumps({**task_record(n, sentences), "id": f"t{n}-{line}"}) + "\n")
    return path
