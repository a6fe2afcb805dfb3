"""RedisStore specifics: two keys per chunk with one expiry, half pairs, URL options, no server."""

from __future__ import annotations

import pytest

from kvlab.fusion.store import StoreError, open_store
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
    ("s3://bucket/x", "unknown store URL"),
    ("file:///tmp/x?size=1", "unknown option 'size'"),
    ("file:///tmp/x?capacity=lots", "bad size 'lots'"),
])
def test_bad_urls_and_unreachable_servers_are_one_clear_error(url, message):
    with pytest.raises(StoreError, match=message):
        open_store(url)
