"""Where offloaded cache rows live: host memory (pinned when the device is CUDA) or a
memory-mapped file on disk.

Rows are stored token-major, `[n, *row_shape]`: appending a position writes one contiguous
row, and a range of positions is one contiguous region, so bringing `[a, b)` to the device is
a single copy (one DMA on CUDA; one memcpy, or page-cache reads for a file, on CPU). Growing
a file never moves data: the file is extended and mapped again.
"""

from __future__ import annotations

import math
import mmap
import os
import tempfile
import weakref
from typing import Literal

import torch

from kvlab.errors import KvlabError

Tier = Literal["host", "disk"]
TIERS: tuple[str, ...] = ("host", "disk")
_MIN_ROWS = 64
_GROWTH = 1.5


class RowStore:
    """An append-only (but croppable) sequence of rows of one shape and dtype on the host."""

    tier: str = ""

    def __init__(self, row_shape: tuple[int, ...], dtype: torch.dtype, capacity: int = 0) -> None:
        self.row_shape = tuple(int(s) for s in row_shape)
        self.dtype = dtype
        self.row_numel = math.prod(self.row_shape)
        self.row_bytes = self.row_numel * torch.empty((), dtype=dtype).element_size()
        self.length = 0
        self.bytes_in = 0  # bytes written into the store (device -> host on CUDA)
        self._buffer = torch.empty((0, *self.row_shape), dtype=dtype)
        if capacity:
            self.reserve(capacity)

    # ---- what subclasses provide -------------------------------------------------------
    def _allocate(self, capacity: int) -> torch.Tensor:
        """A `[capacity, *row_shape]` host tensor holding the first `length` rows of the old one."""
        raise NotImplementedError

    @property
    def pinned(self) -> bool:
        return False

    # ---- rows --------------------------------------------------------------------------
    def __len__(self) -> int:
        return self.length

    @property
    def capacity(self) -> int:
        return self._buffer.shape[0]

    @property
    def nbytes(self) -> int:
        return self.length * self.row_bytes

    def reserve(self, capacity: int) -> None:
        if capacity > self.capacity:
            self._buffer = self._allocate(capacity)

    def append(self, rows: torch.Tensor) -> None:
        """Write `rows` (`[n, *row_shape]`, on any device) after the last row."""
        n = rows.shape[0]
        if tuple(rows.shape[1:]) != self.row_shape:
            raise ValueError(f"row shape {tuple(rows.shape[1:])} does not match the store's {self.row_shape}")
        need = self.length + n
        if need > self.capacity:
            self.reserve(max(need, int(self.capacity * _GROWTH), _MIN_ROWS))
        self._write(self._buffer[self.length:need], rows)
        self.length = need
        self.bytes_in += n * self.row_bytes

    def _write(self, target: torch.Tensor, rows: torch.Tensor) -> None:
        target.copy_(rows, non_blocking=self.pinned and rows.is_cuda)

    def rows(self, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """A host view of rows `[start, stop)`; on CUDA call `sync()` before reading it on the host."""
        stop = self.length if stop is None else stop
        if not 0 <= start <= stop <= self.length:
            raise IndexError(f"rows [{start}, {stop}) outside [0, {self.length})")
        return self._buffer[start:stop]

    def truncate(self, length: int) -> None:
        self.length = max(0, min(length, self.length))

    def sync(self) -> None:
        """Wait for copies still in flight into this store (asynchronous device-to-host)."""
        if self.pinned and torch.cuda.is_available():
            torch.cuda.synchronize()


class HostStore(RowStore):
    """Rows in host memory; page-locked (pinned) when `pin`, so CUDA copies run asynchronously."""

    tier = "host"

    def __init__(self, row_shape, dtype, *, pin: bool = False, capacity: int = 0) -> None:
        self._pin = pin
        super().__init__(row_shape, dtype, capacity)

    @property
    def pinned(self) -> bool:
        return self._pin

    def _allocate(self, capacity: int) -> torch.Tensor:
        self.sync()  # an asynchronous copy may still be writing into the old buffer
        new = torch.empty((capacity, *self.row_shape), dtype=self.dtype, pin_memory=self._pin)
        if self.length:
            new[: self.length].copy_(self._buffer[: self.length])
        return new


class DiskStore(RowStore):
    """Rows in a memory-mapped file that has no name: it is unlinked as soon as it is opened,
    so nothing is left on disk when the cache goes away, even after a crash."""

    tier = "disk"

    def __init__(self, row_shape, dtype, *, directory: str | os.PathLike | None = None, capacity: int = 0) -> None:
        folder = os.fspath(directory) if directory is not None else tempfile.gettempdir()
        if not os.path.isdir(folder):
            raise KvlabError(f"tier=disk: folder {folder} does not exist")
        try:
            fd, path = tempfile.mkstemp(prefix="kvlab-kv-", suffix=".rows", dir=folder)
        except OSError as err:
            raise KvlabError(f"tier=disk: cannot create a file in {folder}: {err.strerror}") from None
        os.unlink(path)
        self._fd = fd
        self.directory = folder
        self._closer = weakref.finalize(self, os.close, fd)
        super().__init__(row_shape, dtype, capacity)

    def _allocate(self, capacity: int) -> torch.Tensor:
        size = capacity * self.row_bytes
        try:
            # Reserve the blocks now: writing through a mapping into a full disk kills the process.
            if hasattr(os, "posix_fallocate"):
                os.posix_fallocate(self._fd, 0, size)
            else:  # pragma: no cover - platforms without fallocate
                os.ftruncate(self._fd, size)
        except OSError as err:
            raise KvlabError(f"tier=disk: cannot grow the cache file in {self.directory} to {size} bytes: "
                             f"{err.strerror}") from None
        mapping = mmap.mmap(self._fd, size)  # shared: the file's data, the old rows included
        return torch.frombuffer(mapping, dtype=self.dtype, count=capacity * self.row_numel).view(
            capacity, *self.row_shape
        )

    def _write(self, target: torch.Tensor, rows: torch.Tensor) -> None:
        # From CUDA this waits for the copy to the host: a mapped page is written by the CPU.
        target.copy_(rows.to("cpu") if rows.device.type != "cpu" else rows)

    def close(self) -> None:
        self._buffer = torch.empty((0, *self.row_shape), dtype=self.dtype)
        self._closer()


def make_store(tier: str, row_shape: tuple[int, ...], dtype: torch.dtype, *, device: torch.device,
               directory: str | os.PathLike | None = None, capacity: int = 0) -> RowStore:
    """A store on `tier` for rows computed on `device` (host rows are pinned for a CUDA device)."""
    if tier == "host":
        return HostStore(row_shape, dtype, pin=device.type == "cuda", capacity=capacity)
    if tier == "disk":
        return DiskStore(row_shape, dtype, directory=directory, capacity=capacity)
    raise KvlabError(f"unknown tier {tier!r}; allowed: {', '.join(TIERS)}")
