"""RedisStore specifics: keys written together with one expiry, parts, half pairs, URL options, no server."""

from __future__ import annotations

import json

import pytest

from kvlab.fusion.store import CorruptChunkError, StoreError, open_store
from tests.fusion.store.synthetic import make_chunk, make_key, same_chunk


def test_a_chunk_is_two_keys_written_together_with_one_expiry(fresh_redis):
    key = make_key(1)
    with open_store(f"{fresh_redis}?ttl=100&prefix=test:kv") as store:
        assert store.put(key, make_chunk(key))
        names = sorted(n.decode() for n in store._r.keys("*"))
        assert names == [f"test:kv:{key.digest()}:data", f"test:kv:{key.digest()}:meta"]
        assert all(0 < store._r.ttl(n) <= 100 for n in names)
        assert store.stats()["ttl"] == 100
    with open_store(fresh_redis) as other_prefix:
        assert other_prefix.get(key) is None and other_prefix.stats()["entries"] == 0


def test_half_a_pair_is_absent_counted_and_collected(fresh_redis):
    keys = [make_key(n) for n in range(3)]
    with open_store(fresh_redis) as store:
        for key in keys:
            store.put(key, make_chunk(key))
        store._r.delete(store._name(keys[0].digest(), "data"))  # as if one key expired first
        store._r.delete(store._name(keys[1].digest(), "meta"))
        assert store.get(keys[0]) is None and store.get(keys[1]) is None
        report = store.verify()
        assert report.ok and report.checked == 1 and report.stray == 2
        assert store.gc()["removed_stray"] == 2 and store.verify().stray == 0
        assert store.put(keys[0], make_chunk(keys[0])) and same_chunk(store.get(keys[0]), make_chunk(keys[0]))


def test_a_chunk_longer_than_a_part_is_stored_in_parts_and_read_whole(fresh_redis):
    key = make_key(4)
    with open_store(f"{fresh_redis}?part=1000&ttl=100") as store:
        assert store.put(key, make_chunk(key))
        data = store._name(key.digest(), "data")
        names = sorted(n.decode() for n in store._r.keys("*:data*"))
        assert names == [data, f"{data}:1", f"{data}:2"]  # 2,124 bytes in parts of 1,000
        assert all(0 < store._r.ttl(n) <= 100 for n in names)
        assert same_chunk(store.get(key), make_chunk(key))
        reader, store._reader = store._reader, None  # as a rediss:// store reads: through redis-py
        assert same_chunk(store.get(key), make_chunk(key))
        store._reader = reader
        store._r.delete(f"{data}:2")
        with pytest.raises(CorruptChunkError, match="a part missing or of the wrong size"):
            store.get(key)
        assert store.delete(key) and store._r.keys("*") == []


def test_an_entry_written_before_parts_is_still_read(fresh_redis):
    key = make_key(5)
    with open_store(fresh_redis) as store:
        store.put(key, make_chunk(key))
        meta = store._name(key.digest(), "meta")
        row = json.loads(store._r.get(meta))
        del row["parts"]  # the metadata of an entry written as one value
        store._r.set(meta, json.dumps(row))
        assert same_chunk(store.get(key), make_chunk(key)) and store.verify().ok


def test_parts_left_without_their_metadata_are_counted_and_collected(fresh_redis):
    keys = [make_key(6), make_key(7)]
    with open_store(f"{fresh_redis}?part=500") as store:
        for key in keys:
            store.put(key, make_chunk(key))
        left = len(store._r.keys(f"*{keys[0].digest()}:data:*"))
        assert left >= 2  # the first chunk's further parts
        store._r.delete(store._name(keys[0].digest(), "meta"), store._name(keys[0].digest(), "data"))
        assert store.get(keys[0]) is None and store.verify().stray == left
        assert store.gc()["removed_stray"] == left and store.verify().ok
        assert store._r.keys(f"*{keys[0].digest()}*") == [] and store._r.keys(f"*{keys[1].digest()}:data:*") != []
        assert same_chunk(store.get(keys[1]), make_chunk(keys[1]))


def test_gc_with_a_capacity_evicts_the_longest_idle(fresh_redis):
    with open_store(fresh_redis) as store:
        keys = [make_key(3 * n) for n in range(3)]
        for key in keys:
            store.put(key, make_chunk(key))
        result = store.gc(capacity=store.stats()["bytes"] - 1)
        assert result["evicted"] == 1 and store.stats()["entries"] == 2


@pytest.mark.parametrize("url, message", [
    ("redis://127.0.0.1:1/0", "cannot reach the Redis store at redis://127.0.0.1:1/0"),
    ("redis://127.0.0.1:1/0?ttl=soon", "ttl in .* must be a whole number"),
    ("redis://127.0.0.1:1/0?ttl=0", "ttl must be a positive"),
    ("redis://127.0.0.1:1/0?color=red", "unknown option 'color'"),
    ("redis://127.0.0.1:1/0?part=0", "part must be a positive"),
    ("redis://127.0.0.1:1/0?part=1MB", "part in .* must be a whole number of bytes"),
    ("s3://bucket/x", "unknown store URL"),
    ("file:///tmp/x?size=1", "unknown option 'size'"),
    ("file:///tmp/x?capacity=lots", "bad size 'lots'"),
])
def test_bad_urls_and_unreachable_servers_are_one_clear_error(url, message):
    with pytest.raises(StoreError, match=message):
        open_store(url)
