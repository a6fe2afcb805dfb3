"""The ChunkStore contract, run against every backend (memory, local folder, real Redis)."""

from __future__ import annotations

import dataclasses
import subprocess
import time

import pytest

from kvlab.fusion.store import CorruptChunkError, open_store
from tests.fusion.store.synthetic import flip_stored_byte, make_chunk, make_key, same_chunk


def test_round_trip_is_bit_exact_and_put_is_idempotent(store_url):
    with open_store(store_url) as store:
        keys = [make_key(n) for n in range(3)] + [make_key(7, dtype="bfloat16", base=5, prefix="ab")]
        for key in keys:
            assert store.get(key) is None
            assert store.put(key, make_chunk(key)) is True
            assert store.put(key, make_chunk(key)) is False  # already there: stored once
        for key in keys:
            assert same_chunk(store.get(key), make_chunk(key))
        listed = {info.digest: info for info in store.entries()}
        assert set(listed) == {k.digest() for k in keys}
        bf16 = listed[keys[-1].digest()]
        assert (bf16.dtype, bf16.n_tokens, bf16.position_base) == ("bfloat16", len(keys[-1].token_ids), 5)
        stats = store.stats()
        assert stats["entries"] == 4 and stats["bytes"] == sum(i.nbytes for i in listed.values()) > 0
        assert {(m["dtype"], m["entries"]) for m in stats["models"]} == {("float32", 3), ("bfloat16", 1)}


def test_a_chunk_for_another_model_dtype_base_or_prefix_is_never_served(store_url):
    with open_store(store_url) as store:
        key = make_key(1)
        store.put(key, make_chunk(key))
        for other in (dataclasses.replace(key, fingerprint="fp-other"), dataclasses.replace(key, dtype="bfloat16"),
                      dataclasses.replace(key, position_base=3), dataclasses.replace(key, prefix_digest="cd"),
                      dataclasses.replace(key, token_ids=key.token_ids[:-1])):
            assert store.get(other) is None


def test_a_flipped_byte_is_refused_reported_and_repairable(store_url):
    with open_store(store_url) as store:
        keys = [make_key(n) for n in range(3)]
        for key in keys:
            store.put(key, make_chunk(key))
        flip_stored_byte(store, keys[1])
        with pytest.raises(CorruptChunkError, match="fails its checksum"):
            store.get(keys[1])
        assert same_chunk(store.get(keys[0]), make_chunk(keys[0]))  # the others are untouched
        report = store.verify()
        assert not report.ok and report.checked == 3
        assert [p["digest"] for p in report.problems] == [keys[1].digest()]
        repaired = store.verify(repair=True)
        assert repaired.ok and repaired.removed == 1 and store.get(keys[1]) is None
        assert store.put(keys[1], make_chunk(keys[1])) and same_chunk(store.get(keys[1]), make_chunk(keys[1]))
        assert store.verify().ok


def test_a_chunk_that_no_longer_matches_its_checksum_is_not_stored(store_url):
    with open_store(store_url) as store:
        key = make_key(2)
        chunk = make_chunk(key)
        chunk.keys[0][0, 0, 0, 0] += 1.0
        with pytest.raises(CorruptChunkError, match="refusing to store"):
            store.put(key, chunk)
        assert store.get(key) is None and store.stats()["entries"] == 0


def test_delete_removes_one_entry(store_url):
    with open_store(store_url) as store:
        keys = [make_key(n) for n in range(3)]
        for key in keys:
            store.put(key, make_chunk(key))
        assert store.delete(keys[0]) and not store.delete(keys[0])
        assert {i.digest for i in store.entries()} == {keys[1].digest(), keys[2].digest()}
        assert store.get(keys[0]) is None and store.verify().ok


@pytest.mark.parametrize("backend", ["local", "redis"])
def test_claims_exclude_other_handles_until_released_or_owner_dead(backend, tmp_path, request):
    url = str(tmp_path / "store") if backend == "local" else request.getfixturevalue("fresh_redis")
    key = make_key(4)
    with open_store(url) as first, open_store(url) as second:
        assert first.claim(key) and first.claim(key)  # renewing one's own claim
        assert not second.claim(key)
        first.release(key)
        assert second.claim(key) and not first.claim(key)
        second.release(key)
        # A claim left by a process that has exited is taken over at once.
        exited = subprocess.Popen(["true"])
        exited.wait()
        dead_owner = f"{first._owner.split(':')[0]}:{exited.pid}:deadbeef"
        if backend == "local":
            with first._write() as db:
                db.execute("INSERT OR REPLACE INTO claims VALUES (?, ?, ?)", (key.digest(), dead_owner, 1e12))
        else:
            first._r.set(first._name(key.digest(), "claim"), dead_owner, px=600_000)
        assert second.claim(key) and not first.claim(key)
        assert first.claim(make_key(5), ttl_s=0.001)
        time.sleep(0.02)
        assert second.claim(make_key(5))  # an expired claim is free
