"""Stores written with the SHA-256 checksum of kvlab.chunk/1 before xxh3: still read, still verified,
rewritten by `fuse store verify --repair`."""

import json
import shutil
import sqlite3
from pathlib import Path

import pytest

from kvlab.fusion.chunks import CHECKSUM_PREFIX, ChunkKV, is_legacy_checksum
from kvlab.fusion.store import CorruptChunkError, open_store
from tests.fusion.store.synthetic import make_chunk, make_key, same_chunk

# Written by kvlab's LocalStore before the checksum changed (synthetic chunks 0, 1, 2).
LEGACY_STORE = Path(__file__).parent / "data" / "store-kvlab-chunk-1-sha256"


@pytest.fixture
def legacy_copy(tmp_path):
    folder = tmp_path / "old"
    shutil.copytree(LEGACY_STORE, folder)
    return folder


def test_a_store_written_before_xxh3_is_read_and_still_verified(legacy_copy):
    with open_store(str(legacy_copy)) as store:
        for n in range(3):
            got = store.get(make_key(n))
            assert is_legacy_checksum(got.meta["checksum"]) and same_chunk(got, make_chunk(make_key(n)))
    victim = next(legacy_copy.glob("chunks/*/*.safetensors"))
    data = bytearray(victim.read_bytes())
    data[-3] ^= 0x10  # a flipped bit in the last tensor
    victim.write_bytes(bytes(data))
    with open_store(str(legacy_copy)) as store:
        damaged = [n for n in range(3) if make_key(n).digest() == victim.stem]
        with pytest.raises(CorruptChunkError, match="fails its checksum"):
            store.get(make_key(damaged[0]))


def test_verify_repair_rewrites_an_old_store_with_the_new_checksum(legacy_copy, cli):
    code, out, err = cli("fuse", "store", "verify", legacy_copy, "--json", "-")
    assert code == 0, err
    report = json.loads(out)
    assert (report["checked"], report["legacy"], report["migrated"], report["problems"]) == (3, 3, 0, [])
    code, out, err = cli("fuse", "store", "verify", "--repair", legacy_copy, "--json", "-")
    assert code == 0, err
    assert (json.loads(out)["legacy"], json.loads(out)["migrated"]) == (3, 3)
    db = sqlite3.connect(legacy_copy / "index.sqlite")
    assert all(c.startswith(CHECKSUM_PREFIX) for (c,) in db.execute("SELECT checksum FROM chunks"))
    db.close()
    with open_store(str(legacy_copy)) as store:
        for n in range(3):
            got = store.get(make_key(n))
            assert got.meta["checksum"].startswith(CHECKSUM_PREFIX) and same_chunk(got, make_chunk(make_key(n)))
        assert store.verify().legacy == 0


def test_every_backend_reads_and_migrates_entries_sealed_the_old_way(store_url, monkeypatch):
    key = make_key(5)
    with open_store(store_url) as store:  # one handle: memory:// lives as long as it
        with monkeypatch.context() as patch:
            patch.setattr(ChunkKV, "checksum", ChunkKV.legacy_checksum)  # how every writer sealed chunks before
            chunk = make_chunk(key)
            store.put(key, chunk)
        got = store.get(key)
        assert is_legacy_checksum(got.meta["checksum"]) and same_chunk(got, chunk)
        report = store.verify(repair=True)
        assert (report.legacy, report.migrated, report.problems) == (1, 1, [])
        assert store.get(key).meta["checksum"] == chunk.checksum() and store.verify().legacy == 0
