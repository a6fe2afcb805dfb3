"""LocalStore: durable index, LRU capacity, names confined to the folder, leftovers, many processes."""

from __future__ import annotations

import json
import multiprocessing
import shutil
from dataclasses import asdict

import pytest
import torch

from kvlab.fusion.store import CorruptChunkError, StoreError, open_store
from kvlab.fusion.store.local import LocalStore
from tests.fusion.store.synthetic import hammer, make_chunk, make_key, same_chunk


def test_the_index_survives_a_restart(tmp_path):
    keys = [make_key(n) for n in range(4)]
    with LocalStore(tmp_path / "s") as store:
        for key in keys:
            store.put(key, make_chunk(key))
        before = list(store.entries())
    with open_store(f"file://{tmp_path / 's'}") as again:
        assert list(again.entries()) == before
        assert all(same_chunk(again.get(k), make_chunk(k)) for k in keys)


def test_capacity_evicts_the_least_recently_used(tmp_path):
    keys = [make_key(3 * n) for n in range(4)]  # all four tokens long: sizes equal within a few bytes
    with LocalStore(tmp_path / "s") as store:
        store.put(keys[0], make_chunk(keys[0]))
        one = store.stats()["bytes"]
        store.set_capacity(3 * one + 64)
        for key in keys[1:3]:
            store.put(key, make_chunk(key))
        assert store.get(keys[0]) is not None  # now keys[1] is the least recently used
        store.put(keys[3], make_chunk(keys[3]))
        assert {i.digest for i in store.entries()} == {keys[0].digest(), keys[2].digest(), keys[3].digest()}
        assert not store._path(keys[1].digest()).exists()
        assert store.stats()["bytes"] <= store.capacity
    with open_store(f"file://{tmp_path / 's'}?capacity={one + 64}") as shrunk:  # the URL sets a capacity
        assert shrunk.stats()["entries"] == 1 and shrunk.capacity == one + 64
        assert [i.digest for i in shrunk.entries()] == [keys[3].digest()]
        result = shrunk.gc(capacity=0)
        assert result["evicted"] == 1 and shrunk.stats()["entries"] == 0


def test_names_never_leave_the_folder(tmp_path):
    store = LocalStore(tmp_path / "s")
    key = make_key(1)
    store.put(key, make_chunk(key))
    for name in ("../../etc/passwd", "..", key.digest()[:-1] + "/", key.digest().upper(), ""):
        with pytest.raises(StoreError, match="not a chunk name"):
            store._path(name)
    # An index row whose name is not a digest (a tampered index) is reported, never opened.
    with store._write() as db:
        db.execute("INSERT INTO chunks SELECT '../../outside', model, fingerprint, dtype, n_tokens, position_base, "
                   "prefix_digest, nbytes, checksum, created, last_used FROM chunks")
    report = store.verify(repair=True)
    assert [p["digest"] for p in report.problems] == ["../../outside"] and report.ok
    assert [i.digest for i in store.entries()] == [key.digest()]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s"]


def test_a_folder_that_is_not_a_store_is_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(StoreError, match="not a kvlab chunk store"):
        open_store(str(tmp_path))
    with pytest.raises(StoreError, match="is a file"):
        open_store(str(tmp_path / "notes.txt"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_a_file_holding_another_chunk_is_refused(tmp_path):
    store = LocalStore(tmp_path / "s")
    a, b = make_key(1), make_key(2)
    store.put(a, make_chunk(a))
    store.put(b, make_chunk(b))
    shutil.copyfile(store._path(a.digest()), store._path(b.digest()))
    with pytest.raises(CorruptChunkError, match="another chunk"):
        store.get(b)
    assert same_chunk(store.get(a), make_chunk(a))
    with store._write() as db:  # an index row relabelled for another model is refused too
        db.execute("UPDATE chunks SET fingerprint = 'fp-other' WHERE digest = ?", (a.digest(),))
    with pytest.raises(CorruptChunkError, match="under another model"):
        store.get(a)


def test_leftovers_of_interrupted_writes_are_harmless_and_collected(tmp_path):
    store = LocalStore(tmp_path / "s")
    keys = [make_key(n) for n in range(3)]
    for key in keys:
        store.put(key, make_chunk(key))
    orphan = make_key(9)
    folder = store._path(keys[0].digest()).parent
    (folder / f".{keys[0].digest()}.x1.tmp").write_bytes(b"half a chunk")  # killed while writing
    store._path(orphan.digest()).parent.mkdir(exist_ok=True)
    shutil.copyfile(store._path(keys[0].digest()), store._path(orphan.digest()))  # killed before its row
    store._path(keys[2].digest()).unlink()  # killed while evicting: a row without its file
    assert store.get(orphan) is None and store.get(keys[2]) is None and not store.put(keys[0], make_chunk(keys[0]))
    report = store.verify()
    assert report.ok and report.checked == 2 and report.stray == 3
    assert store.gc(min_age_s=3600)["removed_stray"] == 2  # the young temporary file may be a live write
    assert store.gc(min_age_s=0)["removed_stray"] == 1
    assert store.verify().stray == 0 and store.stats()["entries"] == 2
    assert store.put(keys[2], make_chunk(keys[2])) and same_chunk(store.get(keys[2]), make_chunk(keys[2]))


def test_processes_writing_and_reading_at_once(tmp_path):
    """Two spawned processes and this one use the store at the same time."""
    url, n_keys = str(tmp_path / "s"), 24
    LocalStore(url).close()
    with multiprocessing.get_context("spawn").Pool(2) as pool:
        for phase in ("warm-up", "fill", "mixed"):
            if phase == "mixed":
                with LocalStore(url) as store:
                    store.set_capacity(store.stats()["bytes"] // 2)
            pending = pool.starmap_async(hammer, [(url, seed, n_keys, phase) for seed in (1, 2)])
            counts = [hammer(url, 0, n_keys, phase)] + pending.get(timeout=300)
            if phase == "fill":
                assert sum(c["stored"] for c in counts) == n_keys  # each chunk stored by exactly one process
                with LocalStore(url) as store:
                    assert store.stats()["entries"] == n_keys and store.verify().ok
    assert sum(c["hits"] for c in counts) > 0 and sum(c["stored"] for c in counts) > 0
    with LocalStore(url) as store:
        report = store.verify()
        assert report.ok and report.stray == 0
        assert store.stats()["bytes"] <= store.capacity


def test_chunk_files_are_plain_safetensors_both_ways(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save

    from kvlab.fusion.store import codec

    store = LocalStore(tmp_path / "s")
    key = make_key(5, dtype="bfloat16")
    chunk = make_chunk(key)
    store.put(key, chunk)
    with safe_open(store._path(key.digest()), "pt") as handle:  # what we write, safetensors reads
        assert handle.metadata()["format"] == codec.FORMAT
        assert all(torch.equal(handle.get_tensor(n), t) for n, t in chunk.tensors().items())
    header = {"format": codec.FORMAT, "key": json.dumps(asdict(key)), "meta": json.dumps(chunk.meta)}
    theirs = save(chunk.tensors(), metadata=header)  # what safetensors writes, we read
    assert len(theirs) == store._path(key.digest()).stat().st_size  # the same layout (header key order may differ)
    back_key, back = codec.decode(bytearray(theirs), "test")
    assert back_key == key and same_chunk(back, chunk)
    for damaged in (theirs[:-1], theirs[:20], theirs + b"\0", b"\xff" * 8 + theirs[8:]):
        with pytest.raises(CorruptChunkError, match="not a readable kvlab chunk"):
            codec.decode(bytearray(damaged), "test")


def test_a_damaged_index_is_one_clear_error(tmp_path):
    store = LocalStore(tmp_path / "s")
    key = make_key(1)
    store.put(key, make_chunk(key))
    store.close()
    (tmp_path / "s" / "index.sqlite").write_bytes(b"this is not a database" * 100)
    with pytest.raises(StoreError, match="index of store .*: file is not a database"):
        LocalStore(tmp_path / "s")


def test_a_store_in_a_read_only_folder_is_read_and_a_missing_one_is_not_made(tmp_path, read_only_dir, cli):
    keys = [make_key(n) for n in range(3)]
    with LocalStore(tmp_path / "s") as store:
        for key in keys:
            store.put(key, make_chunk(key))
        entries = list(store.entries())
    for folder in [*sorted((tmp_path / "s").rglob("*")), tmp_path / "s"]:
        if folder.is_dir():
            read_only_dir(folder)
    with open_store(str(tmp_path / "s"), create=False) as store:
        assert store.read_only and list(store.entries()) == entries
        assert all(same_chunk(store.get(k), make_chunk(k)) for k in keys)
    code, out, err = cli("fuse", "store", "stats", tmp_path / "s")
    assert code == 0 and "3 chunks" in out, err
    code, out, err = cli("fuse", "store", "verify", tmp_path / "s", "--quiet")
    assert code == 0 and "3 chunks checked, 0 damaged" in out, err

    with pytest.raises(StoreError, match="does not exist"):
        open_store(str(tmp_path / "typo"), create=False)
    assert not (tmp_path / "typo").exists()


def test_chunk_files_follow_the_umask(tmp_path):
    import os
    import stat

    old = os.umask(0o022)
    try:
        with LocalStore(tmp_path / "s") as store:
            key = make_key(1)
            store.put(key, make_chunk(key))
    finally:
        os.umask(old)
    files = [p for p in (tmp_path / "s" / "chunks").rglob("*.safetensors")]
    assert files and all(stat.S_IMODE(p.stat().st_mode) == 0o644 for p in files)
    assert stat.S_IMODE((tmp_path / "s" / "kvlab-store.json").stat().st_mode) == 0o644
