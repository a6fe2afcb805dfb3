"""`kvlab hw`: measure what offloaded decoding depends on, and keep it in hw_metrics.json.

Host-to-device bandwidth (pinned and pageable host memory), device-to-host, device memory
read bandwidth, disk read bandwidth (cold: the file's pages dropped from the page cache first;
and cached), and GEMM throughput per dtype. On a CPU device, device == host: "host-to-device"
is a host memory copy and there is no pinned memory (recorded as null).

The file lives in the kvlab home (`$KVLAB_HOME`, default `~/.cache/kvlab`), one entry per
device (`cpu`, `cuda:0`, ...), written atomically under a lock so two runs never mix. Every
`auto` split reads it; a missing entry is an error that says which command to run.
"""

from __future__ import annotations

import json
import mmap
import os
import platform
import re
import statistics
import tempfile
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from kvlab.atomic import write_text_atomic
from kvlab.errors import KvlabError
from kvlab.filelock import file_lock
from kvlab.paths import kvlab_home

METRICS_FILE = "hw_metrics.json"
FORMAT = "kvlab.hw/1"
GEMM_DTYPES = ("float32", "float16", "bfloat16")


def metrics_path() -> Path:
    return kvlab_home() / METRICS_FILE


def device_key(device: str | torch.device) -> str:
    """`cpu`, or `cuda:N` (plain `cuda` is the current CUDA device)."""
    if not isinstance(device, torch.device) and not re.fullmatch(r"cpu|cuda(:\d+)?", device.strip()):
        raise KvlabError(f"device {device!r}: use cpu, cuda or cuda:N")
    dev = torch.device(device.strip() if isinstance(device, str) else device)
    if dev.type == "cuda":
        index = dev.index if dev.index is not None else (torch.cuda.current_device() if torch.cuda.is_available() else 0)
        return f"cuda:{index}"
    return dev.type


def read_all() -> dict[str, Any]:
    """The whole file (`{"format", "devices": {key: metrics}}`), or an empty one."""
    path = metrics_path()
    if not path.is_file():
        return {"format": FORMAT, "devices": {}}
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise KvlabError(f"{path} is not readable JSON ({err}); run `kvlab hw` again") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("devices"), dict):
        raise KvlabError(f"{path} is not a {FORMAT} file; run `kvlab hw` again")
    return data


def load_metrics(device: str | torch.device, *, need: str | None = None, what: str = "this run") -> dict[str, Any]:
    """The figures measured for `device`; a clear error when there are none."""
    key = device_key(device)
    entry = read_all()["devices"].get(key)
    if entry is None or (need is not None and not entry.get(need)):
        raise KvlabError(f"{what} needs hardware figures for {key}: run `kvlab hw --device {key}` "
                         f"first (it writes {metrics_path()})")
    return entry


def save_metrics(entry: dict[str, Any]) -> Path:
    """Merge one device's figures into the file, atomically, under a lock."""
    path = metrics_path()
    with file_lock(path.with_name(METRICS_FILE + ".lock")):
        data = read_all()
        data["devices"][entry["device"]] = entry
        write_text_atomic(path, json.dumps(data, indent=2, sort_keys=True) + "\n")
    return path


# ---- measuring ----------------------------------------------------------------------------
def measure(device: str | torch.device = "cpu", *, size_mb: int = 256, gemm_n: int | None = None,
            disk_dir: str | os.PathLike | None = None, repeats: int = 3,
            on_step: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run every microbenchmark on `device` and return the figures (bytes/s, FLOP/s)."""
    dev = torch.device(device_key(device))
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise KvlabError(f"--device {dev}: this machine has no CUDA device")
    if size_mb < 1:
        raise KvlabError("--size-mb must be at least 1")
    nbytes = size_mb * 2**20
    step = on_step or (lambda name: None)
    timer = _Timer(dev, repeats)
    result: dict[str, Any] = {
        "device": str(dev),
        "name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else (platform.processor() or platform.machine()),
        "measured": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "size_mb": size_mb,
    }
    step("host-to-device")
    result.update(_transfers(dev, nbytes, timer))
    step("device memory")
    data = torch.ones(nbytes // 4, dtype=torch.float32, device=dev)
    result["device_copy_bytes_per_s"] = nbytes / timer(lambda: data.sum())
    del data
    step("disk read")
    result.update(_disk_read(nbytes, disk_dir, repeats))
    step("GEMM")
    n = gemm_n or (4096 if dev.type == "cuda" else 1024)
    # float16 GEMM on a CPU is a slow emulation: a smaller matrix measures its rate as well
    result["gemm_n"] = {name: min(n, 256) if (dev.type, name) == ("cpu", "float16") else n for name in GEMM_DTYPES}
    result["gemm_flops_per_s"] = {name: _gemm(dev, getattr(torch, name), size, timer)
                                  for name, size in result["gemm_n"].items()}
    result["device_memory_bytes"] = _device_memory(dev)
    return result


class _Timer:
    """Best-of-N seconds of a callable, after one warm-up call, synchronising CUDA around it."""

    def __init__(self, device: torch.device, repeats: int) -> None:
        self.device, self.repeats = device, max(1, repeats)

    def __call__(self, fn: Callable[[], object]) -> float:
        fn()
        times = []
        for _ in range(self.repeats):
            self._sync()
            start = time.perf_counter()
            fn()
            self._sync()
            times.append(time.perf_counter() - start)
        return max(min(times), 1e-9)

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def _transfers(dev: torch.device, nbytes: int, timer: _Timer) -> dict[str, float | None]:
    pageable = torch.empty(nbytes, dtype=torch.uint8).fill_(1)
    target = torch.empty(nbytes, dtype=torch.uint8, device=dev)
    out: dict[str, float | None] = {}
    out["h2d_pageable_bytes_per_s"] = nbytes / timer(lambda: target.copy_(pageable))
    if dev.type == "cuda":
        pinned = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True).fill_(1)
        out["h2d_pinned_bytes_per_s"] = nbytes / timer(lambda: target.copy_(pinned, non_blocking=True))
        out["d2h_bytes_per_s"] = nbytes / timer(lambda: pinned.copy_(target, non_blocking=True))
    else:  # device == host: no pinned memory, and "device-to-host" is the same host copy
        out["h2d_pinned_bytes_per_s"] = None
        out["d2h_bytes_per_s"] = out["h2d_pageable_bytes_per_s"]
    return out


def _disk_read(nbytes: int, directory: str | os.PathLike | None, repeats: int) -> dict[str, Any]:
    """Read a freshly written file through a memory map: cold (pages dropped) and cached."""
    folder = os.fspath(directory) if directory is not None else tempfile.gettempdir()
    if not os.path.isdir(folder):
        raise KvlabError(f"--disk-dir {folder} does not exist")
    fd, path = tempfile.mkstemp(prefix="kvlab-hw-", suffix=".bin", dir=folder)
    try:
        os.unlink(path)
        block = os.urandom(2**20)
        for _ in range(nbytes // len(block)):
            os.write(fd, block)
        os.fsync(fd)
        target = torch.empty(nbytes, dtype=torch.uint8)
        cold, cached = [], []
        for _ in range(max(1, repeats)):
            _drop_pages(fd)
            cold.append(_read_mapped(fd, nbytes, target))
            cached.append(_read_mapped(fd, nbytes, target))
        return {"disk_dir": folder, "disk_read_bytes_per_s": nbytes / statistics.median(cold),
                "disk_read_cached_bytes_per_s": nbytes / min(cached),
                "disk_cold_is_estimate": not hasattr(os, "posix_fadvise")}
    finally:
        os.close(fd)


def _drop_pages(fd: int) -> None:
    if hasattr(os, "posix_fadvise"):
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)


def _read_mapped(fd: int, nbytes: int, target: torch.Tensor) -> float:
    start = time.perf_counter()
    with mmap.mmap(fd, nbytes, access=mmap.ACCESS_COPY) as mapping:
        source = torch.frombuffer(memoryview(mapping), dtype=torch.uint8)
        target.copy_(source)
        del source
    return max(time.perf_counter() - start, 1e-9)


def _gemm(dev: torch.device, dtype: torch.dtype, n: int, timer: _Timer) -> float | None:
    try:
        a = torch.randn(n, n, device=dev).to(dtype)
        b = torch.randn(n, n, device=dev).to(dtype)
        return 2 * n**3 / timer(lambda: a @ b)
    except RuntimeError:  # a dtype the device cannot multiply
        return None


def _device_memory(dev: torch.device) -> int:
    if dev.type == "cuda":
        return int(torch.cuda.get_device_properties(dev).total_memory)
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
