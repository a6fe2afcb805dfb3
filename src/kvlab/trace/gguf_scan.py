"""Walk a GGUF file's header with every count and offset checked against the file's size.

`gguf.GGUFReader` trusts the counts it reads: an array length or tensor dimension that a
corrupt or truncated file gets wrong can make it loop for a very long time or ask for a
huge allocation. This walk reads only the header, iteratively, refuses what cannot fit in
the file, and says in one line what is wrong, before GGUFReader reads the file.
"""

from __future__ import annotations

import struct
from pathlib import Path

from kvlab.trace.format import TraceError

_HEADER = 24
_MAX_DIMS = 4
_MAX_NESTING = 4
# GGUF metadata value types: size of a scalar, or STRING (8) / ARRAY (9)
_SCALAR_SIZE = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_STRING, _ARRAY, _UINT32 = 8, 9, 4


class _Walk:
    def __init__(self, data, order: str, path: Path) -> None:
        self.data, self.order, self.path, self.at = data, order, path, _HEADER

    def fail(self, what: str) -> TraceError:
        return TraceError(f"{self.path} is a corrupt or truncated GGUF file: {what}")

    def take(self, fmt: str, what: str):
        size = struct.calcsize(fmt)
        if self.at + size > len(self.data):
            raise self.fail(f"it ends at byte {len(self.data)}, in the middle of {what}")
        value = struct.unpack_from(self.order + fmt, self.data, self.at)
        self.at += size
        return value[0] if len(value) == 1 else value

    def skip(self, n: int, what: str) -> None:
        if n < 0 or self.at + n > len(self.data):
            raise self.fail(f"{what} needs {n} bytes at byte {self.at}, past the end of the file ({len(self.data)})")
        self.at += n

    def string(self, what: str) -> bytes:
        length = self.take("Q", what)
        start = self.at
        self.skip(length, what)
        return self.data[start:self.at]

    def value(self, vtype: int, what: str) -> None:
        """Skip one metadata value of `vtype`, arrays included (iteratively, depth-limited)."""
        pending = [(vtype, 1, 0)]  # (type, how many, nesting)
        while pending:
            kind, count, depth = pending.pop()
            if kind in _SCALAR_SIZE:
                self.skip(_SCALAR_SIZE[kind] * count, what)
            elif kind == _STRING:
                if count * 8 > len(self.data) - self.at:
                    raise self.fail(f"{what} claims {count} strings, more than the file can hold")
                for _ in range(count):
                    self.string(what)
            elif kind == _ARRAY:
                if depth >= _MAX_NESTING:
                    raise self.fail(f"{what} nests arrays more than {_MAX_NESTING} deep")
                if count * 12 > len(self.data) - self.at:
                    raise self.fail(f"{what} claims {count} arrays, more than the file can hold")
                for _ in range(count):
                    item_type = self.take("I", what)
                    n = self.take("Q", what)
                    pending.append((item_type, n, depth + 1))
            else:
                raise self.fail(f"{what} has unknown value type {kind}")


def scan_gguf(path: Path, data) -> None:
    """Raise TraceError unless the header of the GGUF bytes `data` (bytes or an mmap) fits in them.

    Checks the metadata (every length within the file), the tensor infos (at most 4
    dimensions, a known ggml type) and that each tensor's data lie inside the file.
    """
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    version = struct.unpack_from("<I", data, 4)[0]
    order = ">" if version & 0xFFFF == 0 else "<"
    walk = _Walk(data, order, path)
    n_tensors, n_kv = struct.unpack_from(order + "QQ", data, 8)
    if n_tensors * 32 > len(data) or n_kv * 12 > len(data):
        raise walk.fail(f"it claims {n_tensors} tensors and {n_kv} metadata keys, more than {len(data)} bytes can hold")
    alignment = 32
    for index in range(n_kv):
        key = walk.string(f"metadata key {index}")
        vtype = walk.take("I", f"the type of metadata {key[:60]!r}")
        if key == b"general.alignment" and vtype == _UINT32:
            alignment = walk.take("I", "general.alignment")
            if alignment == 0 or alignment & (alignment - 1):
                raise walk.fail(f"general.alignment {alignment} is not a power of two")
        else:
            walk.value(vtype, f"metadata {key[:60]!r}")
    tensors = []
    for index in range(n_tensors):
        name = walk.string(f"the name of tensor {index}")
        label = f"tensor {name[:60].decode('utf-8', 'replace')!r}"
        n_dims = walk.take("I", label)
        if not 1 <= n_dims <= _MAX_DIMS:
            raise walk.fail(f"{label} has {n_dims} dimensions (ggml has 1 to {_MAX_DIMS})")
        dims = [walk.take("Q", label) for _ in range(n_dims)]
        kind = walk.take("I", label)
        offset = walk.take("Q", label)
        try:
            block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(kind)]
        except (ValueError, KeyError):
            raise walk.fail(f"{label} has an unknown ggml type ({kind})") from None
        elements = 1
        for n in dims:
            elements *= n
        if dims[0] % block:
            raise walk.fail(f"{label} has ne[0]={dims[0]}, not a multiple of its {block}-element blocks")
        tensors.append((label, offset, elements // block * type_size))
    start = walk.at + (-walk.at) % alignment
    for label, offset, n_bytes in tensors:
        end = start + offset + n_bytes
        if end > len(data):
            raise walk.fail(f"{label} needs bytes up to {end} but the file has {len(data)} (truncated?)")
