"""The raw Redis reader against redis-py's own answers, on a real server."""

import os
import shutil
import socket
import subprocess
import time

import pytest
import redis

from kvlab.fusion.store import StoreError, open_store
from kvlab.fusion.store.resp import BulkReader, RespError
from tests.conftest import _free_port
from tests.fusion.store.synthetic import make_chunk, make_key, same_chunk


def reader_for(url: str, db: int = 0, **auth) -> BulkReader:
    host, port = url.removeprefix("redis://").split("/")[0].split(":")
    return BulkReader(host, int(port), db, **auth)


def test_values_of_every_size_arrive_as_redis_py_reads_them(fresh_redis):
    client = redis.Redis.from_url(fresh_redis.replace("/0", "/3"))
    values = {f"k{n}": os.urandom(n) for n in (0, 1, 4095, 4096, 100_000, 3_000_001)}
    client.mset(values)
    reader = reader_for(fresh_redis, db=3)
    try:
        for _ in range(2):  # the connection is reused
            got = reader.mget(*values, "missing")
            assert got[-1] is None
            assert [g.numpy().tobytes() for g in got[:-1]] == [client.get(name) for name in values]
            assert all(g.numpy().flags.writeable for g in got[:-1])
        assert reader_for(fresh_redis, db=0).mget("k1") == [None]  # SELECT took effect
    finally:
        reader.close()
        client.close()


def test_a_server_error_is_raised_and_the_connection_dropped(fresh_redis):
    reader = reader_for(fresh_redis, password="wrong")  # this server has no password
    with pytest.raises(RespError, match="AUTH"):
        reader.mget("x")
    assert reader._sock is None


def start_server(folder, *extra):
    """A throwaway redis-server on a free port (skips without redis-server): (process, port)."""
    exe = shutil.which("redis-server")
    if exe is None:
        pytest.skip("redis-server is not installed")
    port = _free_port()
    proc = subprocess.Popen([exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                             "--dir", str(folder), *extra], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return proc, port
        except OSError:
            time.sleep(0.05)
    proc.kill()
    pytest.fail("redis-server did not start")


def test_a_password_protected_server(tmp_path):
    proc, port = start_server(tmp_path, "--requirepass", "s3cret")
    try:
        key = make_key(1)
        with open_store(f"redis://:s3cret@127.0.0.1:{port}/2") as store:
            assert store._reader is not None
            store.put(key, make_chunk(key))
            assert same_chunk(store.get(key), make_chunk(key))
        with pytest.raises(RespError, match="WRONGPASS|invalid"):
            BulkReader("127.0.0.1", port, 2, password="nope").mget(key.digest())
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_a_server_gone_between_reads_is_one_store_error(tmp_path):
    proc, port = start_server(tmp_path)
    url = f"redis://127.0.0.1:{port}/0"
    try:
        store = open_store(url)
        key = make_key(2)
        store.put(key, make_chunk(key))
        assert store.get(key) is not None
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    with pytest.raises(StoreError, match=f"Redis store redis://127.0.0.1:{port}/0"):
        store.get(key)
    store.close()


def test_threads_share_one_reader_and_a_forked_child_opens_its_own(fresh_redis):
    import multiprocessing
    import threading

    client = redis.Redis.from_url(fresh_redis)
    values = {f"t{i}": os.urandom(1_000_000 + i) for i in range(4)}
    client.mset(values)
    reader = reader_for(fresh_redis)
    failures = []

    def read(name):
        for _ in range(10):
            (got,) = reader.mget(name)
            if got.numpy().tobytes() != values[name]:
                failures.append(name)

    threads = [threading.Thread(target=read, args=(name,)) for name in values]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert failures == []
    parent_socket = reader._sock
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_read_in_child, args=(reader, queue, parent_socket.fileno()))
    child.start()
    child.join(30)
    assert queue.get(timeout=5) == (True, True)
    assert reader.mget("t0")[0].numpy().tobytes() == values["t0"] and reader._sock is parent_socket
    reader.close()
    client.close()


def _read_in_child(reader, queue, parent_fd):
    (got,) = reader.mget("t1")
    queue.put((len(got) == 1_000_001, reader._sock.fileno() != parent_fd))
