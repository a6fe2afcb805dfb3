"""Shared fixtures: tiny models built once per session, the default model for slow tests."""

from __future__ import annotations

import functools

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
