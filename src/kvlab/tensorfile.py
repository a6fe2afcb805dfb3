"""Read one tensor (or a range of its rows) from a safetensors file with plain positioned reads.

`safetensors.safe_open` memory-maps the whole file: every page a reader touches stays mapped
into the process (and counts as its resident memory) until the file is closed, so streaming a
multi-GB cache layer by layer through it ends up holding the whole file. This reader parses the
header itself and copies only the bytes asked for into a fresh buffer, which is freed with the
tensor.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from kvlab.errors import KvlabError

_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
_MAX_HEADER = 100 * 2**20


class TensorFileError(KvlabError):
    """A safetensors file that is truncated, corrupt or lacks a tensor."""


class TensorFile:
    """The tensors of one safetensors file, read on demand without a memory map."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        try:
            with open(self.path, "rb") as handle:
                size = int.from_bytes(handle.read(8), "little")
                if not 0 < size <= _MAX_HEADER:
                    raise TensorFileError(f"{self.path} is not a safetensors file (header size {size})")
                header = json.loads(handle.read(size))
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as err:
            raise TensorFileError(f"{self.path} is truncated or corrupt ({type(err).__name__})") from None
        self.metadata: dict[str, str] = header.pop("__metadata__", None) or {}
        self._entries: dict[str, dict] = header
        self._data_start = 8 + size

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._entry(name)["shape"])

    def dtype(self, name: str) -> torch.dtype:
        code = self._entry(name)["dtype"]
        if code not in _DTYPES:
            raise TensorFileError(f"{self.path}: tensor {name} has unsupported dtype {code}")
        return _DTYPES[code]

    def read(self, name: str, rows: slice | None = None) -> torch.Tensor:
        """Tensor `name`, or only rows `rows` (a step-1 slice of its first dimension)."""
        shape = list(self.shape(name))
        dtype = self.dtype(name)
        begin, end = self._entry(name)["data_offsets"]
        if rows is not None:
            if not shape or rows.step not in (None, 1):
                raise ValueError("rows must be a step-1 slice of a tensor with at least one dimension")
            start, stop, _ = rows.indices(shape[0])
            stop = max(start, stop)
            row_bytes = (end - begin) // shape[0] if shape[0] else 0
            begin, end = begin + start * row_bytes, begin + stop * row_bytes
            shape[0] = stop - start
        nbytes = end - begin
        if nbytes != math.prod(shape) * dtype.itemsize:
            raise TensorFileError(f"{self.path}: tensor {name} has a size that does not match its shape")
        buffer = bytearray(nbytes)
        if nbytes:
            self._read_into(buffer, self._data_start + begin)
            return torch.frombuffer(buffer, dtype=dtype).reshape(shape)
        return torch.empty(shape, dtype=dtype)

    def _read_into(self, buffer: bytearray, offset: int) -> None:
        view = memoryview(buffer)
        with open(self.path, "rb", buffering=0) as handle:
            handle.seek(offset)
            done = 0
            while done < len(view):
                n = handle.readinto(view[done:])
                if not n:
                    raise TensorFileError(f"{self.path} is truncated (expected {len(view)} bytes at {offset})")
                done += n

    def _entry(self, name: str) -> dict:
        entry = self._entries.get(name)
        if entry is None:
            raise TensorFileError(f"{self.path} has no tensor {name}")
        return entry
