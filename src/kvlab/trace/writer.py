"""Write trace files: GGUF through the `gguf` package, in ggml conventions.

Each tensor is stored with `ne` = its torch shape reversed (what `GGUFWriter` does with a numpy
array), in the dtype it was recorded in, with its torch shape and dtype in `kvlab.tensor.*`
metadata. A tensor can be stored the way a ggml graph holds it instead: as the contiguous
source of a `ggml_permute` view (the axes are recorded), or quantized to a ggml block format.
ggml tensors have at most 4 dimensions: a tensor with more (a quantized cache's blocks,
`[batch, kv_heads, n_blocks, tokens, bytes]`) is stored with its outer torch dimensions merged
into `ne[3]`, and the reader restores it from its recorded torch shape. The file appears at
its path only once it is complete, and only after its header has passed the reader's own checks.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kvlab.trace import ggml
from kvlab.trace.format import ARCHITECTURE, FORMAT, TraceError, tensor_key

# torch dtypes GGUF holds natively (numpy dtype GGUFWriter maps to a ggml type)
_NATIVE = {
    torch.float32: np.float32,
    torch.float16: np.float16,
    torch.float64: np.float64,
    torch.int8: np.int8,
    torch.int16: np.int16,
    torch.int32: np.int32,
    torch.int64: np.int64,
}
# ggml types a float tensor can be converted to on write
STORE_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0")


def block_size(qtype) -> int:
    from gguf.constants import GGML_QUANT_SIZES

    return GGML_QUANT_SIZES[qtype][0]


def _ggml_type(name: str):
    from gguf import GGMLQuantizationType

    return GGMLQuantizationType[name.upper()]


class TraceWriter:
    """Collects tensors and metadata, then writes one GGUF file atomically (`write()`)."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self._meta: dict[str, Any] = {"kvlab.format": FORMAT}
        self._tensors: dict[str, tuple[np.ndarray, Any]] = {}

    # ---- metadata --------------------------------------------------------------------------
    def add_meta(self, key: str, value: Any) -> None:
        """A `kvlab.*` value: str, bool, int, float, or a non-empty list of ints, floats or strs."""
        if not key.startswith("kvlab."):
            raise ValueError(f"trace metadata keys live under 'kvlab.', got {key!r}")
        self._meta[key] = value

    # ---- tensors ---------------------------------------------------------------------------
    def add_tensor(
        self,
        name: str,
        tensor: torch.Tensor,
        *,
        store: str | None = None,
        permute: Sequence[int] | None = None,
    ) -> None:
        """Add `tensor` (the torch tensor a reader gets back) under `name`.

        store: convert a float tensor to one of STORE_TYPES (q8_0 / q4_0 need the stored
            innermost dimension to be a multiple of 32); default: keep the recorded dtype.
        permute: store the contiguous source S with `ggml_permute(S, *permute) == tensor`,
            the way ggml holds a permuted view (e.g. (0, 2, 1, 3) for an attention output kept
            as `[head_dim, n_head, n_tokens]`); the axes go into the metadata.
        """
        if name in self._tensors:
            raise ValueError(f"tensor {name} added twice")
        tensor = tensor.detach().to("cpu")
        if tensor.dim() == 0 or tensor.numel() == 0:
            raise ValueError(f"{name}: a trace tensor has at least one dimension and one element")
        self.add_meta(tensor_key(name, "torch_shape"), [int(n) for n in tensor.shape])
        self.add_meta(tensor_key(name, "dtype"), str(tensor.dtype).removeprefix("torch."))
        source = tensor
        if permute is not None:
            axes = ggml.check_axes(permute)
            if tensor.dim() > ggml.GGML_MAX_DIMS:
                raise ValueError(f"{name}: a permuted tensor has at most 4 dimensions")
            four = tensor.reshape((1,) * (ggml.GGML_MAX_DIMS - tensor.dim()) + tuple(tensor.shape))
            perm = ggml.torch_permutation(axes)
            inverse = [perm.index(j) for j in range(ggml.GGML_MAX_DIMS)]
            source = four.permute(inverse)
            self.add_meta(tensor_key(name, "ggml_permute"), list(axes))
        array, raw_type = _encode(name, source.contiguous(), store)
        self._tensors[name] = (_within_ggml_dims(array), raw_type)

    def add_raw(self, name: str, data: np.ndarray, ne: Sequence[int], ggml_type: str) -> None:
        """Add a tensor exactly as a ggml program holds it: its bytes, its `ne`, its ggml type.

        No per-tensor metadata is written: a reader lays it out by its role (a role layout such
        as `llama.cpp`, which the file may name under `kvlab.layout`).
        """
        from gguf import GGMLQuantizationType
        from gguf.constants import GGML_QUANT_SIZES

        if name in self._tensors:
            raise ValueError(f"tensor {name} added twice")
        qtype = _ggml_type(ggml_type)
        ne = [int(n) for n in ne]
        block, type_size = GGML_QUANT_SIZES[qtype]
        if ne[0] % block:
            raise ValueError(f"{name}: ne[0]={ne[0]} is not a multiple of the {ggml_type} block ({block})")
        n_rows = int(np.prod(ne[1:], dtype=np.int64)) if len(ne) > 1 else 1
        row_bytes = ne[0] // block * type_size
        raw = np.ascontiguousarray(data).view(np.uint8).reshape(-1)
        if raw.size != n_rows * row_bytes:
            raise ValueError(f"{name}: {raw.size} bytes do not hold a {ggml_type} tensor of ne {ne}")
        numpy_types = {GGMLQuantizationType.F32: np.float32, GGMLQuantizationType.F16: np.float16}
        if qtype in numpy_types:
            self._tensors[name] = (raw.view(numpy_types[qtype]).reshape(tuple(reversed(ne))), None)
        else:
            self._tensors[name] = (raw.reshape(*tuple(reversed(ne[1:])), row_bytes), qtype)

    # ---- output ----------------------------------------------------------------------------
    def write(self) -> Path:
        """Write the file under a temporary name beside `path`, then rename it into place."""
        from gguf import GGUFWriter

        if not self._tensors:
            raise TraceError("nothing to write: the trace has no tensors")
        check_writable(self.path)
        # GGUFWriter opens its file by name: give it a temporary one beside the target
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent)
        os.close(fd)
        try:
            writer = GGUFWriter(tmp, ARCHITECTURE)
            try:
                for key, value in self._meta.items():
                    _add_value(writer, key, value)
                for name, (array, raw_type) in self._tensors.items():
                    writer.add_tensor(name, array, raw_dtype=raw_type)
                writer.write_header_to_file()
                writer.write_kv_data_to_file()
                writer.write_tensors_to_file()
            finally:
                writer.close()
            _check_readable(Path(tmp), self.path)
            with open(tmp, "rb+") as handle:
                os.fsync(handle.fileno())
            os.chmod(tmp, 0o644)
            os.replace(tmp, self.path)
        except BaseException as err:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            if isinstance(err, OSError):
                raise TraceError(f"cannot write {self.path}: {err.strerror or err}") from None
            raise
        return self.path


def check_writable(path: Path) -> None:
    """Fail early, in one line, when a trace cannot be written to `path`."""
    if path.is_dir():
        raise TraceError(f"cannot write the trace to {path}: it is a folder")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise TraceError(f"cannot write the trace to {path}: {err.strerror or err}") from None


def _encode(name: str, tensor: torch.Tensor, store: str | None) -> tuple[np.ndarray, Any]:
    """(numpy array, raw ggml type or None) for GGUFWriter.add_tensor."""
    from gguf import GGMLQuantizationType
    from gguf.quants import QuantError, quantize

    if store is not None:
        if store not in STORE_TYPES:
            raise ValueError(f"{name}: store={store} is not one of {', '.join(STORE_TYPES)}")
        if not tensor.is_floating_point():
            raise ValueError(f"{name}: only float tensors can be stored as {store}")
        qtype = _ggml_type(store)
        array = tensor.to(torch.float32).numpy()
        if array.shape[-1] % block_size(qtype):
            raise ValueError(f"{name}: ne[0]={array.shape[-1]} is not a multiple of the {store} block "
                             f"({block_size(qtype)} elements)")
        try:
            packed = quantize(array, qtype)
        except (ValueError, QuantError) as err:
            raise ValueError(f"{name}: {err}") from None
        if qtype in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):
            return packed, None
        return packed, qtype
    if tensor.dtype == torch.bfloat16:
        # bf16 bits as bytes; ggml's BF16 is the same 16 bits
        return tensor.view(torch.int16).numpy().view(np.uint8), GGMLQuantizationType.BF16
    if tensor.dtype in _NATIVE:
        return tensor.numpy().reshape(tensor.shape), None
    # anything else (uint8 packed codes, bool, float8): its bytes as I8, dtype in the metadata
    raw = tensor.view(torch.uint8).numpy().view(np.int8)
    return raw.reshape(*tensor.shape[:-1], tensor.shape[-1] * tensor.element_size()), None


def _within_ggml_dims(array: np.ndarray) -> np.ndarray:
    """`array` with its outer dimensions merged so that it has at most ggml's 4 (ne[0..2] kept)."""
    if array.ndim <= ggml.GGML_MAX_DIMS:
        return array
    keep = ggml.GGML_MAX_DIMS - 1
    return array.reshape(int(np.prod(array.shape[:-keep], dtype=np.int64)), *array.shape[-keep:])


def _check_readable(tmp: Path, target: Path) -> None:
    """Walk the written header the way the reader will: a file it would refuse is never renamed
    into place."""
    import mmap

    from kvlab.trace.gguf_scan import scan_gguf

    with open(tmp, "rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
        try:
            scan_gguf(target, mapped)
        except TraceError as err:
            raise TraceError(f"refusing to write a trace the reader cannot read: {err}") from None


def _add_value(writer, key: str, value: Any) -> None:
    from gguf import GGUFValueType

    if isinstance(value, bool):
        writer.add_bool(key, value)
    elif isinstance(value, int):
        writer.add_int64(key, value)
    elif isinstance(value, float):
        writer.add_float64(key, value)
    elif isinstance(value, str):
        writer.add_string(key, value)
    elif isinstance(value, (list, tuple)) and value:
        first = value[0]
        if isinstance(first, bool) or not isinstance(first, (int, float, str)):
            raise ValueError(f"metadata {key}: lists hold ints, floats or strings")
        sub = {int: GGUFValueType.INT64, float: GGUFValueType.FLOAT64, str: GGUFValueType.STRING}[type(first)]
        writer.add_key_value(key, list(value), GGUFValueType.ARRAY, sub_type=sub)
    else:
        raise ValueError(f"metadata {key}: cannot store {type(value).__name__} {value!r}")
