"""Shared fixtures: tiny models built once per session, the default model for slow tests, a Redis server."""

from __future__ import annotations

import functools
import shutil
import socket
import subprocess
import time

import pytest

import kvlab  # noqa: F401  (sets the offline environment before transformers loads)

TINY_FAMILIES = ["tiny-llama", "tiny-mha", "tiny-qwen2", "tiny-mistral"]


@functools.lru_cache(maxsize=None)
def tiny(name: str, run: str = ""):
    """A LoadedModel for a tiny spec, built once per (name, run)."""
    from kvlab.models import load_model

    return load_model(name, run)


@pytest.fixture(scope="session")
def smollm2():
    from kvlab.models import load_model

    return load_model("smollm2")


@pytest.fixture
def cli(capsys):
    """Run `kvlab ARGS...` in-process; returns (exit code, stdout, stderr)."""
    from kvlab.cli import main

    def run(*args: str):
        code = main([str(a) for a in args])
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return run


@pytest.fixture
def read_only_dir(tmp_path):
    """Make a folder read-only for this process, even as root (who ignores mode bits): mode 0555,
    and the immutable attribute where the process may set it. Skips where neither holds."""
    import os
    import shutil
    import subprocess

    made: list = []

    def make(path):
        os.chmod(path, 0o555)
        if os.geteuid() == 0 and shutil.which("chattr"):
            subprocess.run(["chattr", "+i", str(path)], capture_output=True)
        made.append(path)
        if os.access(path, os.W_OK):
            pytest.skip("cannot make a folder read-only here")
        return path

    yield make
    for path in made:
        if os.geteuid() == 0 and shutil.which("chattr"):
            subprocess.run(["chattr", "-i", str(path)], capture_output=True)
        os.chmod(path, 0o755)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory):
    """A throwaway redis-server on a free loopback port: no persistence, files in a tmp dir."""
    import redis

    exe = shutil.which("redis-server")
    if exe is None:
        pytest.skip("redis-server is not installed (`make test` installs it)")
    folder = tmp_path_factory.mktemp("redis")
    for _ in range(3):
        port = _free_port()
        proc = subprocess.Popen(
            [exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(folder), "--logfile", str(folder / "redis.log"), "--daemonize", "no"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        client = redis.Redis(host="127.0.0.1", port=port)
        deadline = time.monotonic() + 15
        while proc.poll() is None and time.monotonic() < deadline:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                time.sleep(0.05)
        if proc.poll() is None:
            break
    else:
        pytest.fail(f"redis-server did not start: {(folder / 'redis.log').read_text()[-500:]}")
    try:
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        client.close()
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture
def fresh_redis(redis_url):
    """The session's Redis server, emptied for this test."""
    import redis

    with redis.Redis.from_url(redis_url) as client:
        client.flushall()
    return redis_url
